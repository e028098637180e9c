"""Our MLA backend inside vLLM on CPU, against transformers and vLLM's CPU_MLA."""

import pytest

from mla_plugin.vllm.mla_backend import DECODE_CALLS, LAST_CACHE_SHAPE
from tests.vllm.engines import (
    PROMPTS,
    assert_matches_transformers,
    assert_same_logprobs,
    logprob_spread,
    run_engine,
)

MAX_TOKENS = 32


def test_ours_ran_and_matches_transformers_576(ours_576, tiny_ds_576):
    # Proof that our decode ran, not CPU_MLA under another name: our own counter.
    # 4 requests x 31 decode steps x 2 layers, one call per step per layer.
    assert ours_576["decode_calls"] == (MAX_TOKENS - 1) * 2
    assert all(len(t) == MAX_TOKENS for t in ours_576["tokens"])
    assert logprob_spread(ours_576) > 3.0  # a 1e-4 agreement is not a trivial one
    assert_matches_transformers(ours_576, tiny_ds_576, atol=1e-4)


def test_ours_matches_cpu_mla_576(ours_576, tiny_ds_576):
    # vLLM's own CPU MLA named: on a CPU with AMX tiles vLLM's default is AMX_MLA, which takes no fp32.
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    cpu_mla = run_engine(tiny_ds_576, backend="CPU_MLA")
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) == before, "our decode ran for CPU_MLA"
    assert_same_logprobs(ours_576, cpu_mla, atol=1e-4)


def test_no_backend_named_leaves_vllm_choice(tiny_ds_576):
    # No --attention-backend: the installed plugin must not change vLLM's choice (CPU_MLA, or
    # AMX_MLA on a CPU with AMX tiles; bf16, which both take).
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    default = run_engine(tiny_ds_576, backend=None, dtype="bfloat16", prompts=PROMPTS[:1], max_tokens=4)
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) == before, "plugin ran without being asked"
    assert len(default["tokens"][0]) == 4


@pytest.mark.parametrize("block_size", [16, 8])
def test_latent_width_cpu_mla_cannot_serve(tiny_ds_288, block_size):
    """256 + 32 latent, 6 heads, and a block size CPU_MLA does not take."""
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    ours = run_engine(tiny_ds_288, backend="MLA_plugin", block_size=block_size)
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) - before == (MAX_TOKENS - 1) * 2
    assert LAST_CACHE_SHAPE["MLA_PLUGIN"][1:] == (block_size, 256 + 32)
    assert logprob_spread(ours) > 3.0
    assert_matches_transformers(ours, tiny_ds_288, atol=1e-4)
