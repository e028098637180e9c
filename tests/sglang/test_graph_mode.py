"""Graph mode of the SGLang backends (issue 23): capture once, replay changing batches, equal to
eager, for mla_plugin and every mla_plugin_gla mode, through the CUDA graph runner's contract
(out_graph / in_graph) and the CPU graph runner's (capture_cpu_graph, then
init_forward_metadata); the chain verify step equal to float64 causal attention; refusals in one
line. Run in ``.venv-sglang`` (tests/sglang/in_venv/checks_graph.py) by its pytest.

SGLang's own CPU graph runner cannot start here: it runs only with --enable-torch-compile, and
then registers fake kernels for SGLang's CPU sgl_kernel build, which this machine lacks
(``RuntimeError: operator sgl_kernel::shm_allreduce does not exist``); docs/sglang.md."""

import re
import subprocess

from tests.sglang.helpers import REPO, sglang_env, sglang_python

CHECKS = "tests/sglang/in_venv/checks_graph.py"


def test_captured_batches_replay_equal_to_eager():
    proc = subprocess.run(
        [str(sglang_python()), "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", CHECKS],
        cwd=REPO, env=sglang_env(), capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-8000:]
    assert "10 passed" in report and "skipped" not in report, report[-3000:]
    replays = re.findall(r"(\w+) q_len=(\d) (CUDA|CPU) runner: replays \[([\d, ]+)\] on one capture, "
                         r"max \|replay - eager\| ([\d.e+-]+)", report)
    assert len(replays) == 9, report[-3000:]  # 4 modes x 2 runners (decode) + chain verify
    assert all(float(diff) <= 1e-5 for *_, diff in replays), replays
    print("\n".join(" ".join(r) for r in replays))
