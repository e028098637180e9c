"""The checks that need SGLang importable (touch points, registration, the CPU stand-ins)
run inside ``.venv-sglang`` with its pytest; this test starts them and shows their report."""

import subprocess

from tests.sglang.helpers import REPO, sglang_env, sglang_python

CHECKS = ["tests/sglang/in_venv/checks_touch_points.py", "tests/sglang/in_venv/checks_cpu_support.py",
          "tests/sglang/in_venv/checks_backend.py", "tests/sglang/in_venv/checks_gla.py",
          "tests/sglang/in_venv/checks_registration_scope.py"]


def test_checks_inside_the_sglang_environment():
    proc = subprocess.run(
        [str(sglang_python()), "-m", "pytest", "-q", "-p", "no:cacheprovider", *CHECKS],
        cwd=REPO, env=sglang_env(), capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-8000:]
    assert " passed" in report and "skipped" not in report, report[-3000:]


def test_missing_sglang_environment_fails_and_says_how_to_fix(monkeypatch, tmp_path):
    import pytest

    from tests.sglang import helpers

    monkeypatch.setattr(helpers, "SGLANG_PYTHON", tmp_path / "no-venv" / "bin" / "python")
    with pytest.raises(pytest.fail.Exception, match="run `bash scripts/setup.sh`"):
        helpers.sglang_python()
