"""MLA through the paged seam (one slice, exact), the cache write, and the no-host-sync rule."""

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mla_plugin.ops import LatentSlices, gather_sequence, latent_cache, paged_latent_attention, write_latent_cache
from mla_plugin.ops.kernel_choice import KERNEL_CALLS
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, is_fp8_cache, quantize_fp8
from mla_plugin.ops.reference import absorbed_attention, expanded_attention
from tests.unit.decode_step import MODES, decode_step, fill, make_buffers
from tests.unit.paged_cases import MIXED_REQUESTS, make_batch, make_paged_case, mla_reference, per_request

HAS_CUDA = torch.cuda.is_available()


def paged_decode(q_lat, q_rope, cache, block_table, seq_lens, scale, **kwargs):
    """One query per request through the seam, as MLA_PLUGIN's forward_mqa calls it."""
    starts = torch.arange(q_lat.shape[0] + 1, dtype=torch.int32)
    return paged_latent_attention(
        q_lat, q_rope, cache, starts, seq_lens, block_table, scale, return_lse=True, **kwargs
    )

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

SHAPES = [  # (d_c, d_R, heads, block_size)
    (512, 64, 4, 16),
    (256, 32, 3, 8),
    (96, 16, 2, 1),
    (64, 0, 2, 32),  # NoPE latent
    (128, 64, 16, 64),
]


@pytest.mark.parametrize("d_c,d_r,heads,block_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_decode_matches_float64_reference(d_c, d_r, heads, block_size, dtype, rng):
    gen = rng
    seq_lens = [1, 37, block_size, 3 * block_size + 5, 70]
    case = make_paged_case(seq_lens, d_c, d_r, block_size, dtype, gen)
    q_lat = torch.randn(len(seq_lens), heads, d_c, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(len(seq_lens), heads, d_r, generator=gen, dtype=torch.float64)
    q_lat_d, q_rope_d = q_lat.to(dtype), q_rope.to(dtype)
    scale = 1.0 / math.sqrt(d_c + d_r)

    # Small chunks force the split-context merge path as well; hints are what vLLM passes.
    hints = dict(max_query_len=1, max_seq_len=max(seq_lens))
    for chunk, bounds in ((None, {}), (None, hints), (max(1, block_size), {}), (max(1, block_size), hints)):
        out, lse = paged_decode(
            q_lat_d, q_rope_d, case.cache, case.block_table, case.seq_lens, scale, chunk_tokens=chunk, **bounds
        )
        assert out.shape == (len(seq_lens), heads, d_c) and out.dtype == dtype
        assert lse.shape == (len(seq_lens), heads)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        for b in range(len(seq_lens)):
            ref_out, ref_lse = absorbed_attention(
                q_lat_d[b].double(), q_rope_d[b].double(), case.latents[b], case.rope_keys[b], scale
            )
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(out[b].double(), ref_out, atol=tol, rtol=tol)
            torch.testing.assert_close(lse[b].double(), ref_lse, atol=tol, rtol=tol)


def test_absorbed_equals_expanded(rng):
    gen = rng
    heads, d_nope, d_v, d_c, d_r, length = 4, 24, 20, 48, 8, 29
    f64 = dict(dtype=torch.float64, generator=gen)
    q_nope, q_rope = torch.randn(heads, d_nope, **f64), torch.randn(heads, d_r, **f64)
    latent, k_rope = torch.randn(length, d_c, **f64), torch.randn(length, d_r, **f64)
    w_uk, w_uv = torch.randn(heads, d_nope, d_c, **f64), torch.randn(heads, d_v, d_c, **f64)
    scale = 0.11
    ref_out, ref_lse = expanded_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale)
    q_latent = torch.einsum("hn,hnc->hc", q_nope, w_uk)  # [H, d_c] absorbed query
    lat_out, lse = absorbed_attention(q_latent, q_rope, latent, k_rope, scale)
    out = torch.einsum("hc,hvc->hv", lat_out, w_uv)  # [H, d_v]
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)

    # and through the paged fast path
    block_size = 4
    case = make_paged_case([length], d_c, d_r, block_size, torch.float64, gen)
    case_latent, case_rope = case.latents[0], case.rope_keys[0]
    ref_out, ref_lse = expanded_attention(q_nope, q_rope, case_latent, case_rope, w_uk, w_uv, scale)
    paged_out, paged_lse = paged_decode(
        q_latent[None], q_rope[None], case.cache, case.block_table, case.seq_lens, scale
    )
    torch.testing.assert_close(torch.einsum("hc,hvc->hv", paged_out[0], w_uv), ref_out)
    torch.testing.assert_close(paged_lse[0], ref_lse)


def test_write_latent_cache_skips_padding_slots(rng):
    gen = rng
    d_c, d_r, block_size, num_blocks = 20, 6, 4, 5
    cache = torch.full((num_blocks, block_size, d_c + d_r), float("nan"))
    tokens = 6
    latent = torch.randn(tokens, d_c, generator=gen)
    k_pe = torch.randn(tokens, 1, d_r, generator=gen)  # vLLM passes [T, 1, d_R]
    slots = torch.tensor([13, -1, 2, 7, -1, 19, 5, 6])  # longer than T: padded mapping
    write_latent_cache(latent, k_pe, cache, slots)
    flat = cache.view(-1, d_c + d_r)
    for t, s in enumerate(slots[:tokens].tolist()):
        if s >= 0:
            torch.testing.assert_close(flat[s], torch.cat([latent[t], k_pe[t, 0]]))
    written = {s for s in slots[:tokens].tolist() if s >= 0}
    for s in range(flat.shape[0]):
        if s not in written:
            assert torch.isnan(flat[s]).all(), f"slot {s} was written"


def test_write_then_decode_round_trip(rng):
    gen = rng
    d_c, d_r, block_size, heads = 32, 8, 16, 2
    cache = torch.full((6, block_size, d_c + d_r), float("nan"))
    block_table = torch.tensor([[4, 1, 0]], dtype=torch.int32)
    length = 20
    latent = torch.randn(length, d_c, generator=gen)
    k_pe = torch.randn(length, d_r, generator=gen)
    slots = torch.tensor([int(block_table[0, p // block_size]) * block_size + p % block_size for p in range(length)])
    write_latent_cache(latent, k_pe, cache, slots)
    torch.testing.assert_close(
        gather_sequence(cache, block_table[0], length), torch.cat([latent, k_pe], dim=-1)
    )
    q_lat, q_rope = torch.randn(1, heads, d_c, generator=gen), torch.randn(1, heads, d_r, generator=gen)
    out, lse = paged_decode(q_lat, q_rope, cache, block_table, torch.tensor([length]), 0.2)
    ref_out, ref_lse = absorbed_attention(q_lat[0], q_rope[0], latent.double(), k_pe.double(), 0.2)
    torch.testing.assert_close(out[0].double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_shape_errors_are_clear():
    cache = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match="row width"):
        paged_decode(
            torch.zeros(1, 2, 8), torch.zeros(1, 2, 4), cache, torch.zeros(1, 2, dtype=torch.int32),
            torch.tensor([3]), 1.0,
        )
    with pytest.raises(ValueError, match="cache row width"):
        write_latent_cache(torch.zeros(2, 8), torch.zeros(2, 4), cache, torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_requests_and_padded_rows(dtype, rng):
    """An empty request (L = 0, a CUDA-graph pad) gives out 0, lse -inf; padded rows stay 0."""
    d_c, d_r, heads, block_size = 32, 8, 2, 4
    seq_lens = [6, 0, 9, 0]
    case = make_paged_case([max(n, 1) for n in seq_lens], d_c, d_r, block_size, dtype, rng)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tokens = len(seq_lens) + 3  # three padded query rows
    q_lat = torch.randn(tokens, heads, d_c, generator=rng, dtype=torch.float64).to(dtype)
    q_rope = torch.randn(tokens, heads, d_r, generator=rng, dtype=torch.float64).to(dtype)
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    for bounds in ({}, dict(max_query_len=1, max_seq_len=max(seq_lens))):
        out, lse = paged_latent_attention(
            q_lat, q_rope, case.cache, starts, lens, case.block_table, 0.3, return_lse=True, **bounds
        )
        assert out.dtype == dtype and lse.dtype == dtype  # float32 LSE for float32, float64 for float64
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        for b, n in enumerate(seq_lens):
            if n == 0:
                assert (out[b] == 0).all() and (lse[b] == float("-inf")).all()
            else:
                ref_out, ref_lse = absorbed_attention(
                    q_lat[b].double(), q_rope[b].double(), case.latents[b][:n], case.rope_keys[b][:n], 0.3
                )
                tol = 2e-5 if dtype == torch.float32 else 1e-10
                torch.testing.assert_close(out[b].double(), ref_out, atol=tol, rtol=tol)
                torch.testing.assert_close(lse[b].double(), ref_lse, atol=tol, rtol=tol)
        assert (out[len(seq_lens) :] == 0).all() and (lse[len(seq_lens) :] == float("-inf")).all()


def test_mixed_prefill_and_decode_lse(rng):
    """Several queries per request (a prefill over a cached prefix) with the log-sum-exp."""
    d_c, d_r, heads, block_size = 32, 16, 4, 8
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, torch.float64, rng)
    scale = 1.0 / math.sqrt(d_c + d_r)
    out, lse = paged_latent_attention(
        q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table, scale, return_lse=True,
        max_query_len=9, max_seq_len=40, chunk_tokens=block_size,
    )
    for got, want in zip(per_request(out, qsl), mla_reference(q_lat, q_rope, qsl, case, scale)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    bounds = qsl.tolist()
    for b, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        length = case.latents[b].shape[0]
        for i in range(e - a):
            visible = length - (e - a) + i + 1
            _, ref_lse = absorbed_attention(
                q_lat[a + i], q_rope[a + i], case.latents[b][:visible], case.rope_keys[b][:visible], scale
            )
            torch.testing.assert_close(lse[a + i], ref_lse, atol=1e-10, rtol=1e-10)


# ---- no host synchronisation ---------------------------------------------------------

# aten ops that read a tensor's value on the host (or whose output size does: a sync on CUDA).
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "masked_select", "unique", "_unique2"}


# Indexing with a boolean mask has a data-dependent size too (nonzero on CUDA).
MASK_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


class HostSync(Exception):
    """A tensor's value was needed on the host (raised by the detectors below)."""


class HostSyncDetector(TorchDispatchMode):
    """Fails on any aten op that needs a tensor's value on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_SYNC_OPS:
            raise HostSync(f"host synchronisation: aten.{name}")
        if name in MASK_INDEX_OPS and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            raise HostSync(f"host synchronisation: aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def forbid_host_reads(monkeypatch):
    """Python-level reads of tensor values (``.item()``, ``.tolist()``, ``bool``/``int``/index)."""

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"host synchronisation: Tensor.{name}")

        return method

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))


def test_host_sync_detectors_work(monkeypatch):
    x = torch.tensor([1.0, 0.0])
    with HostSyncDetector(), pytest.raises(HostSync, match="aten._local_scalar_dense"):
        x.max().item()
    with HostSyncDetector(), pytest.raises(HostSync, match="aten.index with a boolean mask"):
        x[x > 0]
    with HostSyncDetector(), pytest.raises(HostSync, match="aten.index_put_ with a boolean mask"):
        x[x > 0] = 2.0
    with HostSyncDetector(), pytest.raises(HostSync, match="aten.nonzero"):
        torch.nonzero(x)
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with pytest.raises(HostSync, match="Tensor.tolist"):
            x.tolist()
        with pytest.raises(HostSync, match="Tensor.__bool__"):
            bool(x[0])
        with pytest.raises(HostSync, match="Tensor.__int__"):
            int(x[0])


CALLS = [  # (softmax, num_shards, shards_local, with an all-reduce, queries per request)
    ("exact", 1, 1, False, "decode"),  # MLA_PLUGIN's forward_mqa
    ("exact", 1, 1, False, "mixed"),
    ("exact", 2, 1, True, "decode"),  # a TP rank of MLA_PLUGIN_GLA
    ("exact", 2, 1, True, "mixed"),
    ("partitioned", 2, 2, False, "decode"),
    ("grouped", 2, 1, False, "mixed"),
    # speculative verify rows (1 + k per request, k varying) as our vLLM decode gets them
    ("exact", 1, 1, False, "verify"),
    ("exact", 2, 1, True, "verify"),
    ("partitioned", 2, 2, False, "verify"),
    ("grouped", 2, 1, False, "verify"),
]
VERIFY_REQUESTS = [(4, 9), (1, 5), (2, 13), (4, 4)]  # (query rows, cached length)


@pytest.mark.parametrize("softmax,num_shards,shards_local,reduce,queries", CALLS)
@pytest.mark.parametrize("hints", [True, False])
def test_no_host_synchronisation(softmax, num_shards, shards_local, reduce, queries, hints, monkeypatch, rng):
    """No tensor value is read on the host, so a GPU never stalls and CUDA graphs can capture it."""
    d_c, d_r, heads, block_size = 32, 8, 4, 4
    requests = {"decode": [(1, n) for n in (5, 1, 13, 8)], "verify": VERIFY_REQUESTS}.get(queries, MIXED_REQUESTS)
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng)
    d_loc = d_c * shards_local // num_shards
    cache = torch.cat([case.cache[..., :d_loc], case.cache[..., d_c:]], dim=-1)
    slices = LatentSlices(num_shards=num_shards, shards_local=shards_local, softmax=softmax)
    bounds = dict(max_query_len=max(q for q, _ in requests), max_seq_len=max(n for _, n in requests))
    reduce_calls = []
    kwargs = dict(
        slices=slices, chunk_tokens=2 * block_size, return_lse=softmax == "exact",
        all_reduce=(lambda t: reduce_calls.append(t.shape)) if reduce else None, **(bounds if hints else {}),
    )
    args = (q_lat[..., :d_loc], q_rope, cache, qsl, case.seq_lens, case.block_table, 0.25)
    expected = paged_latent_attention(*args, **kwargs)
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with HostSyncDetector():
            result = paged_latent_attention(*args, **kwargs)
    for got, want in zip(result if isinstance(result, tuple) else (result,),
                         expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert not reduce or reduce_calls


def test_cache_must_be_slot_rows():
    cache = torch.zeros(4, 3, 10).transpose(0, 1)  # [3 blocks, 4 slots, 10]: slots not one run of rows
    with pytest.raises(ValueError, match="one run of rows"):
        paged_decode(torch.zeros(1, 2, 8), torch.zeros(1, 2, 2), cache, torch.zeros(1, 2, dtype=torch.int32),
                     torch.tensor([3]), 1.0)


# ---- the whole decode step: cache write + attention + merge ----------------------------

STEP_KERNELS = [
    pytest.param("torch"),
    pytest.param("triton", marks=pytest.mark.skipif(
        HAS_CUDA, reason="this process compiles the kernels for CUDA; the interpreter cases run on CPU-only machines")),
]
CACHE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": FP8_CACHE_DTYPE}


def step_case(mode, cache_dtype, rng):
    """Three decode requests and two padded rows (slot -1); the sharded ranks hold 16 of 32 latent columns."""
    d_loc = 16 if mode in ("exact_tp", "grouped") else 32
    query_dtype = torch.bfloat16 if cache_dtype == torch.bfloat16 else torch.float32
    buffers = make_buffers(batch=3, padded=2, heads=4, d_loc=d_loc, d_r=8, block_size=4, width=4,
                           cache_dtype=cache_dtype, query_dtype=query_dtype)
    fill(buffers, seq_lens=[5, 16, 1], prefix_lens=[9, 3, 0], gen=rng)
    return buffers


def cache_bytes(cache):
    """The cache's bytes (NaN-safe equality; fp8 as stored)."""
    return cache.view(torch.uint8) if is_fp8_cache(cache) else cache.view(-1).view(torch.uint8)


def run_checked(step, monkeypatch):
    with monkeypatch.context() as m:
        forbid_host_reads(m)
        with HostSyncDetector():
            return step()


@pytest.mark.parametrize("kernel", STEP_KERNELS)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_whole_decode_step_reads_nothing_on_the_host(mode, cache_dtype, kernel, monkeypatch, rng):
    """The step a captured CUDA graph replays (write with padded slots, attention, LSE merge),
    for every backend mode, cache dtype and implementation: no tensor value read on the host,
    and the same bytes as the unwatched run."""
    buffers = step_case(mode, CACHE_DTYPES[cache_dtype], rng)
    unwatched = copy.deepcopy(buffers)
    expected = decode_step(unwatched, mode, kernel, max_seq_len=16)
    before = KERNEL_CALLS[kernel]
    result = run_checked(lambda: decode_step(buffers, mode, kernel, max_seq_len=16), monkeypatch)
    assert KERNEL_CALLS[kernel] - before == (2 if mode in ("mla", "exact_tp") else 1), f"{kernel} did not run"
    assert torch.equal(cache_bytes(buffers.cache), cache_bytes(unwatched.cache))
    for got, want in zip(result, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        assert torch.isfinite(got[:3]).all()


def masked_write(kv_c_normed, k_pe, cache, slot_mapping, scale=None):
    """The write as it was before (boolean-mask indexing: a nonzero, a host sync on CUDA)."""
    rows = torch.cat([kv_c_normed, k_pe.reshape(k_pe.shape[0], -1)], dim=-1)
    slots = slot_mapping[: rows.shape[0]].to(torch.long)
    valid = slots >= 0
    stored = quantize_fp8(rows[valid], scale) if is_fp8_cache(cache) else rows[valid].to(cache.dtype)
    cache.view(-1, cache.shape[-1])[slots[valid]] = stored


def test_planted_mask_in_the_write_is_caught(monkeypatch, rng):
    buffers = step_case("mla", torch.float32, rng)
    run_checked(lambda: decode_step(copy.deepcopy(buffers), "mla", "torch", max_seq_len=16), monkeypatch)
    monkeypatch.setattr(latent_cache, "write_latent_cache", masked_write)
    with pytest.raises(HostSync, match="aten.index with a boolean mask"):
        run_checked(lambda: decode_step(buffers, "mla", "torch", max_seq_len=16), monkeypatch)


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_write_without_a_valid_row_changes_nothing(cache_dtype, rng):
    """A batch of padding only (slot -1 everywhere): every byte of the cache stays as it was."""
    dtype = CACHE_DTYPES[cache_dtype]
    cache = torch.randn(3, 4, 12, generator=rng)
    cache[0, 0, :5] = float("nan")  # slot 0, the redirect target, holds NaN and values
    cache = quantize_fp8(cache, 0.1) if dtype == FP8_CACHE_DTYPE else cache.to(dtype)
    before = cache.clone()
    scale = torch.tensor([0.1]) if dtype == FP8_CACHE_DTYPE else None
    write_latent_cache(torch.randn(3, 8, generator=rng), torch.randn(3, 1, 4, generator=rng), cache,
                       torch.tensor([-1, -1, -1]), scale=scale)
    assert torch.equal(cache_bytes(cache), cache_bytes(before))


def test_padded_rows_write_the_same_bytes_as_the_masked_write(rng):
    """Padded rows in front of, between and after valid ones: the cache equals the boolean-mask write."""
    cache = torch.full((4, 4, 12), float("nan"))
    latent, rope = torch.randn(6, 8, generator=rng), torch.randn(6, 1, 4, generator=rng)
    slots = torch.tensor([-1, 9, -1, 2, 14, -1])
    expected = cache.clone()
    masked_write(latent, rope, expected, slots)
    write_latent_cache(latent, rope, cache, slots)
    assert torch.equal(cache_bytes(cache), cache_bytes(expected))
