"""The fp8 latent cache in the ops: one byte per value, stored as value / σ, read as value · σ.

Both implementations of the seam (plain torch; Triton in its interpreter on CPU, compiled
with ``-m gpu``) against the float64 references run on the dequantised cache, so the only
error left is the kernels' own; and the write path against e4m3's rounding and saturation.
"""

import math

import pytest
import torch

from mla_plugin.ops import paged_latent_attention, write_latent_cache
from mla_plugin.ops.kernel_choice import KERNEL_CALLS
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, FP8_MAX, fp8_cache_refusal, quantize_fp8
from mla_plugin.ops.reference import sharded_latent_attention
from mla_plugin.ops.sharded_latent import LatentSlices
from tests.unit.paged_cases import MIXED_REQUESTS, make_batch, per_request, random_logit_scale

HAS_CUDA = torch.cuda.is_available()
# Why this GPU cannot run the fp8 kernels (below compute capability 8.9), or None.
GPU_REFUSAL = fp8_cache_refusal(torch.cuda.get_device_capability(), "the backends refuse it") if HAS_CUDA else None
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA"),
          pytest.mark.skipif(GPU_REFUSAL is not None, reason=str(GPU_REFUSAL))]
KERNELS = [
    pytest.param("torch", "cpu"),
    pytest.param("triton", "cpu", marks=pytest.mark.skipif(
        HAS_CUDA, reason="this process compiles the kernels for CUDA; the interpreter cases run on CPU-only machines")),
    pytest.param("triton", "cuda", marks=ON_GPU),
]


def fp8_case(requests, d_c, d_r, heads, block_size, sigma, gen, q_dtype=torch.float32):
    """A NaN-poisoned paged case whose cache is fp8 (value / σ); the truth is the dequantised cache."""
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, gen)
    case.cache = quantize_fp8(case.cache * 3.0, sigma)  # NaN stays NaN in unused slots
    assert case.cache.dtype == FP8_CACHE_DTYPE and case.cache.element_size() == 1
    case.latents = [(quantize_fp8(x * 3.0, sigma).double() * sigma) for x in case.latents]
    case.rope_keys = [(quantize_fp8(x * 3.0, sigma).double() * sigma) for x in case.rope_keys]
    return case, q_lat.to(q_dtype), q_rope.to(q_dtype), qsl


def test_write_stores_value_over_sigma_and_saturates(rng):
    d_c, d_r, sigma = 32, 8, 0.05
    cache = torch.full((3, 4, d_c + d_r), float("nan")).to(FP8_CACHE_DTYPE)
    latent = torch.randn(5, d_c, generator=rng, dtype=torch.float64).float() * 2.0
    rope = torch.randn(5, 1, d_r, generator=rng, dtype=torch.float64).float()
    latent[0, 0] = 1000.0  # / σ = 20000: past e4m3's 448, must saturate (not inf, not NaN)
    slots = torch.tensor([0, 5, -1, 11, 6])
    write_latent_cache(latent, rope, cache, slots, scale=torch.tensor([sigma]))
    flat = cache.view(-1, d_c + d_r)
    assert flat[0, 0].float() == FP8_MAX
    read = flat[[5, 11, 6]].double() * sigma
    want = torch.cat([latent, rope.squeeze(1)], dim=-1)[[1, 3, 4]].double()
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 (normal range)
    big = want.abs() > 2 ** -6 * sigma
    assert ((read - want).abs()[big] <= want.abs()[big] * 2 ** -4 + 1e-12).all()
    assert torch.isnan(flat[[1, 2, 3, 4]].float()).all(), "slot -1 and unused slots untouched"
    with pytest.raises(ValueError, match="fp8 cache only"):
        write_latent_cache(latent, rope, torch.zeros(3, 4, d_c + d_r), slots, scale=torch.tensor([sigma]))


@pytest.mark.parametrize("kernel,device", KERNELS)
@pytest.mark.parametrize("mode,num_shards", [("exact", 1), ("exact", 2), ("partitioned", 2), ("grouped", 2)])
def test_fp8_cache_matches_float64_reference(kernel, device, mode, num_shards, rng):
    d_c, d_r, heads, block_size = 128, 32, 4, 16
    sigma = 0.037
    case, q_lat, q_rope, qsl = fp8_case(MIXED_REQUESTS, d_c, d_r, heads, block_size, sigma, rng)
    lam = random_logit_scale(heads, num_shards, rng).float() if mode != "exact" else None
    slices = LatentSlices(num_shards=num_shards, shards_local=num_shards, softmax=mode, logit_scale=lam)
    scale = 1.0 / math.sqrt(96)
    before = KERNEL_CALLS[kernel]
    out = paged_latent_attention(
        q_lat.to(device), q_rope.to(device), case.cache.to(device), qsl.to(device), case.seq_lens.to(device),
        case.block_table.to(device), scale, slices=slices, max_query_len=9, max_seq_len=40, kernel=kernel,
        cache_scale=torch.tensor([sigma], device=device),
    ).cpu()
    assert KERNEL_CALLS[kernel] == before + 1, f"the {kernel} path did not run"
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=num_shards, softmax_mode=mode,
                                        logit_scale=None if lam is None else lam.double())
    assert (out[int(qsl[-1]):] == 0).all()
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.skipif(GPU_REFUSAL is not None, reason=str(GPU_REFUSAL))
def test_fp8_cache_with_bf16_queries_on_gpu(rng):
    """On a GPU, bf16 queries over an fp8 cache multiply in bf16 (float32 accumulation)."""
    d_c, d_r, heads, block_size, sigma = 512, 64, 16, 64, 0.02
    case, q_lat, q_rope, qsl = fp8_case(MIXED_REQUESTS, d_c, d_r, heads, block_size, sigma, rng,
                                        q_dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(192)
    out, lse = paged_latent_attention(
        q_lat.cuda(), q_rope.cuda(), case.cache.cuda(), qsl.cuda(), case.seq_lens.cuda(), case.block_table.cuda(),
        scale, max_query_len=9, max_seq_len=40, kernel="triton", return_lse=True,
        cache_scale=torch.tensor([sigma], device="cuda"),
    )
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=1, softmax_mode="exact")
    # bf16 products of exact e4m3 values (σ folded in float32): the probabilities' bf16 rounding remains
    for got, want in zip(per_request(out.cpu(), qsl), expected):
        torch.testing.assert_close(got, want, atol=6e-2, rtol=3e-2)
    assert torch.isfinite(lse[: int(qsl[-1])]).all()


def test_scale_on_a_non_fp8_cache_is_refused(rng):
    case, q_lat, q_rope, qsl = make_batch([(1, 5)], 32, 8, 2, 4, torch.float32, rng)
    with pytest.raises(ValueError, match="fp8"):
        paged_latent_attention(q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table, 0.1,
                               cache_scale=torch.tensor([0.5]), kernel="torch")


@pytest.mark.parametrize("kernel,device", KERNELS)
def test_fp8_cache_exact_over_two_ranks(kernel, device, rng):
    """Exact softmax with the fp8 latent split over two simulated ranks: the partial logits
    (the Triton partial-logits kernel) read the fp8 slices, are summed, then one softmax."""
    d_c, d_r, heads, block_size, sigma = 64, 16, 4, 8, 0.11
    case, q_lat, q_rope, qsl = fp8_case(MIXED_REQUESTS, d_c, d_r, heads, block_size, sigma, rng)
    scale = 1.0 / math.sqrt(48)
    partial = {}

    def one_rank(rank, collect):
        cols = slice(rank * d_c // 2, (rank + 1) * d_c // 2)
        cache = torch.cat([case.cache[..., cols], case.cache[..., d_c:]], dim=-1).contiguous()  # fp8 rows

        def all_reduce(logits):
            if collect:
                partial[rank] = logits.clone()
                return logits
            return sum(p.to(logits.device) for p in partial.values())

        slices = LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax="exact")
        return paged_latent_attention(
            q_lat[..., cols].contiguous().to(device), q_rope.to(device), cache.to(device), qsl.to(device),
            case.seq_lens.to(device), case.block_table.to(device), scale, slices=slices, all_reduce=all_reduce,
            max_query_len=9, max_seq_len=40, kernel=kernel, cache_scale=torch.tensor([sigma], device=device),
        ).cpu()

    for rank in range(2):
        one_rank(rank, collect=True)
    out = torch.cat([one_rank(rank, collect=False) for rank in range(2)], dim=-1)
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=2, softmax_mode="exact")
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("capability,refused", [((8, 0), True), ((8, 6), True), ((7, 5), True), ((8, 9), False),
                                                ((9, 0), False), ((10, 0), False), (None, False)])
def test_fp8_refusal_below_compute_capability_8_9(capability, refused):
    """e4m3 needs compute capability 8.9 (Ada, Hopper and newer): one line below it, None from it on
    (and None off NVIDIA GPUs: nothing to refuse)."""
    message = fp8_cache_refusal(capability, "Leave out --kv-cache-dtype.")
    assert (message is not None) == refused
    if refused:
        assert "\n" not in message and "8.9 or newer" in message and f"{capability[0]}.{capability[1]}" in message
        assert message.endswith("Leave out --kv-cache-dtype.")
