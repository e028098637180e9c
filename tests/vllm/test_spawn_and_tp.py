"""Selection survives vLLM's spawned processes; TP=2 equals TP=1."""

import pytest

from tests.vllm.engines import assert_same_logprobs
from tests.vllm.helpers import trace_lines, trace_pids

pytestmark = pytest.mark.slow


def test_tp2_spawn_equals_tp1(ours_576, tp2_runs):
    """TP=2 over gloo, workers started by spawn: our backend in both ranks, same logprobs."""
    result, log, trace = tp2_runs["mla_random"]
    assert all(line.startswith("MLA_PLUGIN ") for line in trace_lines(trace))
    assert len(trace_pids(trace)) == 2, "expected our decode in both TP ranks"
    assert "Using CPU_MLA backend" not in log
    assert_same_logprobs(result, ours_576, atol=1e-4)
