"""The SGLang backends' decode and extend steps read no tensor value on the host, and an fp8
pool is refused below compute capability 8.9: checks that need SGLang importable, run in
``.venv-sglang`` (tests/sglang/in_venv/checks_decode_sync.py) by its pytest."""

import subprocess

from tests.sglang.helpers import REPO, sglang_env, sglang_python

CHECKS = "tests/sglang/in_venv/checks_decode_sync.py"


def test_sglang_steps_read_nothing_on_the_host():
    proc = subprocess.run(
        [str(sglang_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", CHECKS],
        cwd=REPO, env=sglang_env(), capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-8000:]
    assert "18 passed" in report and "skipped" not in report, report[-3000:]
