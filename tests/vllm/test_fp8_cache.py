"""``--kv-cache-dtype fp8`` through the MLA_PLUGIN backend (vLLM CPU engine, bf16 model).

The latent cache really is one byte per value (both backends) (the cache tensor our decode reads is e4m3,
and vLLM fits twice the tokens of a bf16 cache in the same memory); decode reads it (our
decode ran, on that cache) and its logprobs move by a small, non-zero amount from the bf16
cache's. The kernels' fp8 arithmetic against float64 is tests/unit/test_fp8_cache.py.
"""

import pytest

from mla_plugin.fixtures import trained_fixture
from tests.vllm.engines import run_engine


@pytest.fixture(scope="module")
def bf16_and_fp8():
    import torch

    from mla_plugin.vllm import mla_backend

    model = str(trained_fixture("deepseek-v2-tiny"))
    runs = {}
    for backend in ("mla_plugin", "mla_plugin_gla"):
        name = backend.upper()
        for cache_dtype in ("auto", "fp8"):
            before = mla_backend.DECODE_CALLS.get(name, 0)
            result = run_engine(model, backend=backend, dtype="bfloat16", kv_cache_dtype=cache_dtype,
                                block_size=16, hf_overrides={"mla_plugin": {"shards": 2}} if "gla" in backend else {})
            result["decode_calls"] = mla_backend.DECODE_CALLS.get(name, 0) - before
            result["cache_shape"] = mla_backend.LAST_CACHE_SHAPE[name]
            result["cache_dtype"] = mla_backend.LAST_CACHE_DTYPE[name]
            runs[cache_dtype if backend == "mla_plugin" else f"gla {cache_dtype}"] = result
    assert runs["auto"]["cache_dtype"] == runs["gla auto"]["cache_dtype"] == torch.bfloat16
    return runs


def test_cache_is_one_byte_per_value_and_holds_twice_the_tokens(bf16_and_fp8):
    import torch

    fp8, bf16 = bf16_and_fp8["fp8"], bf16_and_fp8["auto"]
    assert fp8["decode_calls"] > 0, "our decode did not run on the fp8 cache"
    assert fp8["cache_dtype"] == torch.float8_e4m3fn
    assert fp8["cache_shape"][1:] == bf16["cache_shape"][1:] == (16, 576)
    ratio = fp8["cache_shape"][0] / bf16["cache_shape"][0]  # blocks vLLM allocated in the same memory
    assert 1.98 <= ratio <= 2.02, f"fp8 holds {ratio:.3f}x the blocks of bf16, expected 2x"


def test_decode_reads_the_quantised_cache(bf16_and_fp8):
    fp8, bf16 = bf16_and_fp8["fp8"], bf16_and_fp8["auto"]
    # Prefill attends over the step's own (unquantised) latents on this CPU build (no chunked
    # context), so prompt logprobs agree; decode reads e4m3 latents, so its logprobs move a little.
    for a, b in zip(fp8["prompt_logprobs"], bf16["prompt_logprobs"]):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    steps = min(len(fp8["tokens"][0]), len(bf16["tokens"][0]))
    diffs = []
    for i in range(len(fp8["tokens"])):
        same = 0  # compare logprobs while both runs chose the same tokens
        while same < steps and fp8["tokens"][i][same] == bf16["tokens"][i][same]:
            same += 1
        diffs += [abs(x - y) for x, y in zip(fp8["token_logprobs"][i][:same], bf16["token_logprobs"][i][:same])]
    assert len(diffs) >= 32, "the runs diverged too early to compare"
    mean = sum(diffs) / len(diffs)
    assert 0 < mean < 0.05, f"mean |decode logprob diff| fp8 vs bf16 cache = {mean:.4f}"


def test_sharded_latent_stores_and_reads_fp8(bf16_and_fp8):
    """mla_plugin_gla (exact, g = 2, TP = 1): the same one-byte cache of d_c + d_R per token
    (both slices on the one rank), read by prefill and decode."""
    import torch

    fp8, bf16 = bf16_and_fp8["gla fp8"], bf16_and_fp8["gla auto"]
    assert fp8["decode_calls"] > 0 and fp8["cache_dtype"] == torch.float8_e4m3fn
    assert fp8["cache_shape"][1:] == (16, 576)
    assert 1.98 <= fp8["cache_shape"][0] / bf16["cache_shape"][0] <= 2.02
    diffs = [abs(x - y) for a, b in zip(fp8["prompt_logprobs"], bf16["prompt_logprobs"]) for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    assert 0 < mean < 0.05, f"mean |prompt logprob diff| fp8 vs bf16 cache = {mean:.4f} (prefill reads the cache)"


@pytest.mark.parametrize("cache_dtype", ["fp8_e5m2", "fp8_inc"])
def test_fp8_formats_that_are_not_mla_latent_caches_are_refused(cache_dtype):
    model = str(trained_fixture("deepseek-v2-tiny"))
    with pytest.raises(ValueError, match=f"does not support --kv-cache-dtype {cache_dtype}"):
        run_engine(model, backend="mla_plugin", kv_cache_dtype=cache_dtype, max_tokens=1)
