"""The scripts in examples/ run on the bundled fixtures and print what their docstrings promise.

Each runs as a user would run it: a fresh process, the example's own vLLM settings.
"""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import trained_fixture
from mla_plugin.serving import free_port
from tests.paths import REPO, wikitext_file

EXAMPLES = REPO / "examples"
PPL_WINDOW, PPL_WINDOWS = 256, 4


def run_example(script: str, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run examples/SCRIPT with ARGS; the environment's bin first on PATH, as a user's shell has it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # set by tests/vllm/conftest.py; the example decides
    path = EXAMPLES / script
    command = ["bash", str(path)] if path.suffix == ".sh" else [sys.executable, str(path)]
    proc = subprocess.Popen([*command, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # a shell example stops its server on the way out
        out, err = proc.communicate(timeout=120)
        pytest.fail(f"{script} ran past {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def explain(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def test_offline_generate():
    proc = run_example("offline_generate.py", "--max-tokens", 8, "--prompt", "The album was released in",
                       "--prompt", "In 1990 the band")
    assert proc.returncode == 0, explain(proc)
    completions = re.findall(r"^completion: '(.*)'$", proc.stdout, re.M)
    assert len(completions) == 2 and all(completions), explain(proc)
    calls = re.search(r"^mla_plugin decode calls in this process: (\d+)$", proc.stdout, re.M)
    assert calls and int(calls.group(1)) > 0, explain(proc)


def test_convert_then_serve():
    proc = run_example("convert_then_serve.py", "--max-tokens", 4)
    assert proc.returncode == 0, explain(proc)
    assert '"layout": "sharded_latent"' in proc.stdout, explain(proc)
    assert "(no attention_backend, no hf_overrides)" in proc.stdout
    assert re.search(r"^completion: '.+'$", proc.stdout, re.M), explain(proc)
    assert re.search(r"^backend selected by the checkpoint: MLA_PLUGIN_GLA \([1-9]\d* decode calls\)$",
                     proc.stdout, re.M), explain(proc)


@pytest.fixture(scope="module")
def ppl_baseline() -> float:
    """The fixture's ppl on the first windows, by transformers (vLLM agrees within 0.1%)."""
    text = wikitext_file("test.raw.txt").read_text(encoding="utf-8")
    return perplexity(str(trained_fixture("deepseek-v2-tiny")), engine="transformers", text=text,
                      window=PPL_WINDOW, max_windows=PPL_WINDOWS, show_progress=False).ppl


def _ppl_check(baseline: float) -> subprocess.CompletedProcess:
    return run_example("ppl_regression_check.py", "--text", wikitext_file("test.raw.txt"),
                       "--baseline", f"{baseline:.4f}", "--window", PPL_WINDOW, "--max-windows", PPL_WINDOWS)


def test_ppl_regression_check_passes_on_the_right_baseline(ppl_baseline):
    proc = _ppl_check(ppl_baseline)
    assert proc.returncode == 0, explain(proc)
    measured = float(re.search(r"\| ppl ([\d.]+)$", proc.stdout, re.M).group(1))
    assert abs(measured / ppl_baseline - 1) < 1e-3, (measured, ppl_baseline)
    assert f"OK: ppl {measured:.4f}" in proc.stdout, explain(proc)


def test_ppl_regression_check_fails_on_a_lower_baseline(ppl_baseline):
    proc = _ppl_check(ppl_baseline * 0.9)
    assert proc.returncode == 1, explain(proc)
    assert "FAIL: ppl" in proc.stderr and "+11." in proc.stderr, explain(proc)
    assert "OK:" not in proc.stdout


@pytest.mark.slow
def test_serve_sharded_latent_tp2():
    """vllm serve at TP=2 (spawned engine and workers): one completion, our decode in both ranks, stopped."""
    proc = run_example("serve_sharded_latent_tp2.sh", "--port", free_port(), "--max-tokens", 8, timeout=900)
    assert proc.returncode == 0, explain(proc)
    assert re.search(r"^ +completion: '.+'$", proc.stdout, re.M), explain(proc)
    pids = re.findall(r"decode ran: MLA_PLUGIN_GLA pid=(\d+)", proc.stdout)
    assert len(set(pids)) == 2, explain(proc)
    assert "MLA_PLUGIN_GLA decode ran in both TP ranks" in proc.stdout
    server_pid = int(re.search(r"server \(pid (\d+)\) stopped", proc.stdout).group(1))
    with pytest.raises(ProcessLookupError):
        os.kill(server_pid, 0)
