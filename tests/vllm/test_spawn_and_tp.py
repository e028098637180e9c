"""Selection survives vLLM's spawned processes; TP=2 equals TP=1."""

import re

import pytest

from tests.vllm.engines import assert_same_logprobs, run_engine_subprocess

pytestmark = pytest.mark.slow


def _trace_pids(trace_file) -> set[str]:
    lines = trace_file.read_text().splitlines() if trace_file.exists() else []
    assert all(line.startswith("MLA_PLUGIN ") for line in lines), lines
    return {re.search(r"pid=(\d+)", line).group(1) for line in lines}


def test_tp2_spawn_equals_tp1(ours_576, tiny_ds_576, tmp_path):
    """TP=2 over gloo, workers started by spawn: our backend in both ranks, same logprobs."""
    trace = tmp_path / "trace.txt"
    result, log = run_engine_subprocess(
        tmp_path,
        env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "MLA_PLUGIN_TRACE_FILE": str(trace)},
        model=tiny_ds_576, backend="mla_plugin",
        tensor_parallel_size=2, distributed_executor_backend="mp",
    )
    assert len(_trace_pids(trace)) == 2, "expected our decode in both TP ranks"
    assert "Using CPU_MLA backend" not in log
    assert_same_logprobs(result, ours_576, atol=1e-4)
