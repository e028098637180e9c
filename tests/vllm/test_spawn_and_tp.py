"""Selection survives vLLM's spawned processes; TP=2 equals TP=1."""

import re

import pytest

from tests.vllm.engines import assert_same_logprobs

pytestmark = pytest.mark.slow


def trace_lines(trace_file) -> list[str]:
    return trace_file.read_text().splitlines() if trace_file.exists() else []


def trace_pids(trace_file) -> set[str]:
    return {re.search(r"pid=(\d+)", line).group(1) for line in trace_lines(trace_file)}


def test_tp2_spawn_equals_tp1(ours_576, tp2_runs):
    """TP=2 over gloo, workers started by spawn: our backend in both ranks, same logprobs."""
    result, log, trace = tp2_runs["mla_random"]
    assert all(line.startswith("MLA_PLUGIN ") for line in trace_lines(trace))
    assert len(trace_pids(trace)) == 2, "expected our decode in both TP ranks"
    assert "Using CPU_MLA backend" not in log
    assert_same_logprobs(result, ours_576, atol=1e-4)
