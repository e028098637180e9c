"""The Triton kernels of the attention seam against the float64 references.

On CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set here before the
kernels are defined); with ``-m gpu`` on a CUDA machine the same cases run compiled on the
GPU, plus a CUDA-graph capture. Caches are NaN-poisoned with permuted block tables
(``paged_cases.py``); interpreter cases stay small (about 0.5 s per call).
"""

import math

import pytest
import torch

from mla_plugin.ops.kernel_choice import KERNEL_CALLS
from mla_plugin.ops.paged_attention import paged_latent_attention
from mla_plugin.ops.reference import absorbed_attention, sharded_latent_attention
from mla_plugin.ops.sharded_latent import LatentSlices
from tests.unit.paged_cases import (
    MIXED_REQUESTS,
    SimulatedAllReduce,
    make_batch,
    make_paged_case,
    mla_reference,
    per_request,
    random_logit_scale,
    rank_view,
)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        HAS_CUDA, reason="this process compiles the kernels for CUDA; the interpreter cases run on CPU-only machines")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]),
]


@pytest.fixture(scope="module")
def kernels():
    """The kernel module: interpreted on a CPU-only machine (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is imported), compiled on a GPU."""
    import triton.runtime.interpreter as interpreter

    import mla_plugin.ops.triton_paged_attention as module

    assert isinstance(module._split_attention, interpreter.InterpretedFunction) == (not HAS_CUDA)
    return module


def tolerance(dtype, device):
    if dtype == torch.float32:
        return dict(atol=2e-5, rtol=2e-5)
    if device == "cpu":  # interpreter: float32 math, one rounding of the output
        return dict(atol=1e-5, rtol=8e-3)
    return dict(atol=2e-2, rtol=2e-2)  # GPU: bf16 products, float32 accumulation


def on(device, *tensors):
    return [t.to(device) for t in tensors]


def run(case, q_lat, q_rope, qsl, scale, device, **kwargs):
    cache, table, lens = on(device, case.cache, case.block_table, case.seq_lens)
    q_lat, q_rope, qsl = on(device, q_lat, q_rope, qsl)
    before = KERNEL_CALLS["triton"]
    result = paged_latent_attention(q_lat, q_rope, cache, qsl, lens, table, scale, kernel="triton", **kwargs)
    assert KERNEL_CALLS["triton"] == before + 1, "the Triton path did not run"
    return result


# (d_c, d_R, heads, block_size): the widths, each with one of the block sizes.
MLA_SHAPES = [(512, 64, 8, 16), (256, 64, 4, 64), (128, 32, 16, 1), (200, 56, 4, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_c,d_r,heads,block_size", MLA_SHAPES)
def test_mla_matches_float64_reference(kernels, d_c, d_r, heads, block_size, dtype, device, rng):
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, dtype, rng)
    scale = 1.0 / math.sqrt(192)
    out, lse = run(case, q_lat, q_rope, qsl, scale, device, return_lse=True, max_query_len=9, max_seq_len=40)
    assert out.dtype == dtype and lse.dtype == torch.float32
    out, lse = out.cpu(), lse.cpu()
    assert (out[int(qsl[-1]):] == 0).all() and (lse[int(qsl[-1]):] == float("-inf")).all(), "padded rows"
    bounds = qsl.tolist()
    for b, (a, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        length = case.latents[b].shape[0]
        for i in range(e - a):
            visible = length - (e - a) + i + 1
            want_out, want_lse = absorbed_attention(q_lat[a + i].double(), q_rope[a + i].double(),
                                                    case.latents[b][:visible], case.rope_keys[b][:visible], scale)
            torch.testing.assert_close(out[a + i].double(), want_out, **tolerance(dtype, device))
            torch.testing.assert_close(lse[a + i].double(), want_lse, atol=2e-5, rtol=2e-5)


SHARDED_SHAPES = [(512, 64, 8, 16), (128, 32, 4, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("mode", ["exact", "partitioned", "grouped"])
@pytest.mark.parametrize("d_c,d_r,heads,block_size", SHARDED_SHAPES)
def test_sharded_modes_match_float64_reference(kernels, mode, num_shards, d_c, d_r, heads, block_size, device, rng):
    """Every slice on one rank, with a random per-(head, slice) logit scale λ."""
    dtype = torch.float32
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, dtype, rng)
    scale = 1.0 / math.sqrt(192)
    lam = random_logit_scale(heads, num_shards, rng)
    slices = LatentSlices(num_shards=num_shards, shards_local=num_shards, softmax=mode, logit_scale=lam.float())
    out = run(case, q_lat, q_rope, qsl, scale, device, slices=slices, max_query_len=9, max_seq_len=40).cpu()
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=num_shards, softmax_mode=mode,
                                        logit_scale=lam)
    assert (out[int(qsl[-1]):] == 0).all()
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,ranks", [("exact", [(0, 1), (1, 1)]), ("exact", [(0, 2), (2, 2)]),
                                        ("partitioned", [(0, 2), (2, 2)]), ("grouped", [(0, 1), (1, 3)])])
def test_ranks_concatenate_to_the_whole(kernels, mode, ranks, device, rng):
    """Simulated TP ranks, each with its slices; exact goes through the partial-logits kernel
    and an all-reduce (done here in two passes: collect every rank's partial logits, then sum)."""
    d_c, d_r, heads, block_size = 128, 32, 8, 16
    num_shards = sum(local for _, local in ranks)
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, torch.float32, rng)
    scale = 1.0 / math.sqrt(192)
    lam = random_logit_scale(heads, num_shards, rng).float()
    partial_logits = {}

    def one_rank(rank, offset, local, collect):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, offset, local)
        slices = LatentSlices(num_shards=num_shards, shard_offset=offset, shards_local=local, softmax=mode,
                              logit_scale=lam)
        all_reduce = None
        if mode == "exact":
            def all_reduce(logits):
                if collect:
                    partial_logits[rank] = logits.clone()
                    return logits
                return sum(partial_logits.values())
        case_view = type(case)(cache.contiguous(), case.block_table, case.seq_lens, case.latents, case.rope_keys)
        return run(case_view, q_part, q_rope, qsl, scale, device, slices=slices, all_reduce=all_reduce,
                   max_query_len=9, max_seq_len=40).cpu()

    if mode == "exact":
        for rank, (offset, local) in enumerate(ranks):
            one_rank(rank, offset, local, collect=True)
    parts = [one_rank(rank, offset, local, collect=False) for rank, (offset, local) in enumerate(ranks)]
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=num_shards, softmax_mode=mode,
                                        logit_scale=lam)
    for got, want in zip(per_request(torch.cat(parts, dim=-1), qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["exact", "grouped"])
def test_empty_requests_give_zero_and_minus_inf(kernels, mode, device, rng):
    """A request with no cached token (a CUDA-graph pad): out 0, LSE -inf, never NaN."""
    d_c, d_r, heads, block_size = 64, 16, 4, 4
    seq_lens = [6, 0, 9, 0]
    case = make_paged_case([max(n, 1) for n in seq_lens], d_c, d_r, block_size, torch.float32, rng)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    tokens = len(seq_lens) + 2  # two padded rows
    q_lat = torch.randn(tokens, heads, d_c, generator=rng)
    q_rope = torch.randn(tokens, heads, d_r, generator=rng)
    starts = torch.arange(len(seq_lens) + 1, dtype=torch.int32)
    case = type(case)(case.cache, case.block_table, lens, case.latents, case.rope_keys)
    slices = LatentSlices(num_shards=2, shards_local=2, softmax=mode)
    kwargs = dict(return_lse=True) if mode == "exact" else {}
    result = run(case, q_lat, q_rope, starts, 0.3, device, slices=slices, max_query_len=1, max_seq_len=9, **kwargs)
    out = (result[0] if mode == "exact" else result).cpu()
    assert not torch.isnan(out).any()
    empty = [b for b, n in enumerate(seq_lens) if n == 0] + [4, 5]
    assert (out[empty] == 0).all()
    if mode == "exact":
        lse = result[1].cpu()
        assert (lse[empty] == float("-inf")).all() and torch.isfinite(lse[[0, 2]]).all()
        for b in (0, 2):
            want, _ = absorbed_attention(q_lat[b].double(), q_rope[b].double(), case.latents[b][: seq_lens[b]],
                                         case.rope_keys[b][: seq_lens[b]], 0.3)
            torch.testing.assert_close(out[b].double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_split_count_does_not_change_the_result(kernels, device, rng):
    """1 split, a few, and more splits than a short request has keys (empty splits)."""
    d_c, d_r, heads, block_size = 64, 16, 4, 8
    requests = [(1, 3), (1, 70), (1, 1), (1, 33)]  # very different lengths in one batch
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng)
    args = on(device, q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table)
    results = [kernels.triton_paged_latent_attention(*args, 0.2, LatentSlices(), None, 70, True, num_splits=n)
               for n in (1, 3, 32)]
    want = mla_reference(q_lat, q_rope, qsl, case, 0.2)
    for out, lse in results:
        for got, ref in zip(per_request(out.cpu(), qsl), want):
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, results[0][1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("mode", ["mla", "partitioned"])
def test_cuda_graph_replay_follows_new_inputs(kernels, mode, rng):
    """Captured once for a batch size, replayed after the lengths, tables and queries change:
    the same results as eager calls (so nothing on the path read a value on the host)."""
    d_c, d_r, heads, block_size, batch = 512, 64, 16, 16, 8
    slices = LatentSlices() if mode == "mla" else LatentSlices(num_shards=2, shards_local=2, softmax="partitioned")
    first = make_paged_case([5, 40, 1, 17, 64, 3, 9, 30], d_c, d_r, block_size, torch.bfloat16, rng, spare_blocks=8)
    second = make_paged_case([60, 2, 33, 1, 8, 64, 12, 7], d_c, d_r, block_size, torch.bfloat16, rng, spare_blocks=8)
    width = max(first.block_table.shape[1], second.block_table.shape[1])
    num_blocks = max(first.cache.shape[0], second.cache.shape[0])

    def padded(case):
        cache = torch.full((num_blocks, block_size, d_c + d_r), float("nan"), dtype=torch.bfloat16)
        cache[: case.cache.shape[0]] = case.cache
        table = torch.zeros(batch, width, dtype=torch.int32)
        table[:, : case.block_table.shape[1]] = case.block_table
        return cache.cuda(), table.cuda(), case.seq_lens.cuda()

    cache, table, lens = padded(first)
    q_lat = torch.randn(batch, heads, d_c, generator=rng).to(torch.bfloat16).cuda()
    q_rope = torch.randn(batch, heads, d_r, generator=rng).to(torch.bfloat16).cuda()
    starts = torch.arange(batch + 1, dtype=torch.int32).cuda()

    def call():
        return paged_latent_attention(q_lat, q_rope, cache, starts, lens, table, 0.1, slices=slices,
                                      max_query_len=1, max_seq_len=64, kernel="triton")

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = call()
    for case in (first, second):
        new_cache, new_table, new_lens = padded(case)
        cache.copy_(new_cache), table.copy_(new_table), lens.copy_(new_lens)
        q_lat.normal_(), q_rope.normal_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, call(), atol=0, rtol=0)


# ---- bounded memory of the exact path over ranks ----------------------------------------

def test_partial_logits_bound_at_deepseek_v3_sizes(kernels):
    """The stated bound: at 128 heads the partial logits of one chunk never exceed 256 MiB,
    at any context (163,840 here), for 8192 prefill tokens and for decode batches."""
    budget = 256 << 20
    assert kernels.LOGITS_BUDGET_BYTES == budget
    for tokens, want_keys in ((8192, 64), (64, 8192), (1, 163840)):
        keys = kernels.logits_chunk_keys(tokens, 128, 163840)
        assert keys == want_keys and tokens * 128 * keys * 4 <= budget
    assert 8192 * 128 * 163840 * 4 > 600 * budget  # unchunked: 640 GiB


@pytest.mark.parametrize("device", DEVICES)
def test_exact_over_ranks_chunks_the_context_within_the_budget(kernels, device, rng):
    """Two simulated ranks (one slice each) with a budget smaller than the unchunked partial
    logits: the all-reduce sees one buffer per chunk, each within the budget, and the result
    equals the float64 reference (and the unchunked run)."""
    d_c, d_r, heads, block_size = 64, 16, 4, 16
    requests = [(1, 150), (3, 70), (1, 1), (1, 129)]
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng)
    tokens, length, scale = q_lat.shape[0], 150, 0.2
    budget = tokens * heads * 4 * 64  # one 64-key tile
    assert tokens * heads * length * 4 > 2 * budget
    partial = {0: [], 1: []}
    sizes = []

    def one_rank(rank, collect, budget_bytes):
        cache, q_part = rank_view(case.cache, q_lat, d_c, 2, rank, 1)
        calls = iter(range(10**6))

        def all_reduce(logits):
            sizes.append(logits.numel() * logits.element_size())
            if collect:
                partial[rank].append(logits.clone())
                return None
            i = next(calls)
            return partial[0][i].to(logits.device) + partial[1][i].to(logits.device)

        slices = LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax="exact")
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        return kernels.triton_paged_latent_attention(*args, scale, slices, all_reduce, length, True,
                                                     logits_budget_bytes=budget_bytes)

    for rank in (0, 1):
        one_rank(rank, True, budget)
    chunks = len(partial[0])
    assert chunks == 3 and max(sizes) <= budget, (chunks, sizes)
    sizes.clear()
    parts = [one_rank(rank, False, budget) for rank in (0, 1)]
    out = torch.cat([p[0].cpu() for p in parts], dim=-1)
    lse = parts[0][1].cpu()
    assert len(sizes) == 2 * chunks
    want = mla_reference(q_lat, q_rope, qsl, case, scale)  # exact over all slices = MLA
    for got, ref in zip(per_request(out, qsl), want):
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
    assert (out[int(qsl[-1]):] == 0).all() and (lse[int(qsl[-1]):] == float("-inf")).all()
    torch.testing.assert_close(parts[1][1].cpu(), lse, atol=0, rtol=0)  # both ranks: one softmax


# ---- the GPU's launch configurations for 64+ heads per stream, in the interpreter ----------

V3_CASES = [  # (mode, num_shards, heads per stream): 128 heads as DeepSeek-V3 / R1
    ("mla", 1, 128), ("exact_tp", 2, 128), ("partitioned", 2, 128), ("grouped", 2, 64),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,num_shards,per_stream", V3_CASES)
def test_many_heads_configuration_matches_float64_reference(kernels, mode, num_shards, per_stream, device,
                                                            monkeypatch, rng):
    """The tiles a GPU takes for 64+ heads per stream (BLOCK_H = 64), at 128 heads, d_c 512,
    d_R 64, forced in the interpreter through TUNING; a few tokens over a short context."""
    d_c, d_r, heads, block_size = 512, 64, 128, 16
    gpu = kernels.gpu_launch_config(d_c // num_shards, per_stream)
    assert gpu["block_h"] == 64
    if device == "cpu":
        monkeypatch.setattr(kernels, "TUNING", {"block_h": gpu["block_h"], "block_n": gpu["block_n"]})
    assert kernels.launch_config(d_c // num_shards, per_stream, torch.device(device))["block_h"] == 64
    requests = [(2, 9), (1, 33)]  # few query rows: the merge runs one interpreted program per (row, head)
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng, padded_rows=1)
    scale = 1.0 / math.sqrt(192)
    softmax = "exact" if mode in ("mla", "exact_tp") else mode
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=num_shards, softmax_mode=softmax)
    if mode == "exact_tp":  # two ranks; the all-reduce adds the other rank's partial logits
        reduce = SimulatedAllReduce()

        def rank_out(rank, collect):
            cache, q_part = rank_view(case.cache, q_lat, d_c, 2, rank, 1)
            view = type(case)(cache.contiguous(), case.block_table, case.seq_lens, case.latents, case.rope_keys)
            slices = LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax="exact")
            return run(view, q_part.contiguous(), q_rope, qsl, scale, device, slices=slices,
                       all_reduce=reduce.of_rank(rank, collect), max_query_len=2, max_seq_len=33).cpu()

        for rank in (0, 1):
            rank_out(rank, True)
        out = rank_out(0, False)  # rank 0's half of the latent output
        expected = [want[..., : d_c // 2] for want in expected]
    else:
        slices = LatentSlices(num_shards=num_shards, shards_local=num_shards, softmax=softmax)
        out = run(case, q_lat, q_rope, qsl, scale, device, slices=slices, max_query_len=2, max_seq_len=33).cpu()
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ---- every tile configuration gpu_launch_config picks, in the interpreter ---------------

class _CountingKernel:
    """Wraps a kernel: counts its launches (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


# (layout, heads, block_size): 16 heads per stream at d_s 512 (MLA) and 256 (one slice of a
# 2-way partitioned shard per rank), 128 heads (MLA); a block size BLOCK_N divides (one page
# lookup per tile) and one below BLOCK_N (a page per key).
GPU_TILE_CASES = [("mla", 16, 64), ("mla", 16, 8), ("partitioned", 16, 64), ("partitioned", 16, 16),
                  ("mla", 128, 32), ("mla", 128, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("layout,heads,block_size", GPU_TILE_CASES)
def test_gpu_tiles_match_float64_reference(kernels, layout, heads, block_size, splits, device, monkeypatch, rng):
    """The GPU's tiles (block_h, block_n) for each layout, forced in the interpreter, over the
    paged-tile and per-key page paths; with one split the merge kernel must not run (stage 1
    writes the output and lse itself), with two it runs once."""
    d_c, d_r = 512, 64
    num_shards = 2 if layout == "partitioned" else 1
    gpu = kernels.gpu_launch_config(d_c // num_shards, heads)
    if device == "cpu":
        monkeypatch.setattr(kernels, "TUNING", {"block_h": gpu["block_h"], "block_n": gpu["block_n"]})
    assert (block_size % gpu["block_n"] == 0) == (block_size >= gpu["block_n"])
    merge = _CountingKernel(kernels._merge_splits)
    monkeypatch.setattr(kernels, "_merge_splits", merge)
    requests = [(1, 37), (2, 20)]
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng, padded_rows=1)
    scale = 1.0 / math.sqrt(192)
    lam = random_logit_scale(heads, num_shards, rng).float() if num_shards > 1 else None
    parts, lses = [], []
    for rank in range(num_shards):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, rank, 1)
        slices = (LatentSlices() if num_shards == 1 else
                  LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax=layout, logit_scale=lam))
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        out, lse = kernels.triton_paged_latent_attention(*args, scale, slices, None, 37, True, num_splits=splits)
        parts.append(out.cpu())
        lses.append(lse.cpu())
    assert merge.launches == (0 if splits == 1 else num_shards)
    out = torch.cat(parts, dim=-1)
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, scale, num_shards=num_shards,
                                        softmax_mode="exact" if num_shards == 1 else layout,
                                        logit_scale=None if lam is None else lam.double())
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (out[int(qsl[-1]):] == 0).all() and (lses[0][int(qsl[-1]):] == float("-inf")).all()
    if num_shards == 1:  # the lse against the float64 reference's
        for b, (q_len, seq_len) in enumerate(requests):
            rows = slice(int(qsl[b]), int(qsl[b + 1]))
            _, want_lse = mla_lse(q_lat[rows], q_rope[rows], case, b, seq_len, scale)
            torch.testing.assert_close(lses[0][rows].double(), want_lse, atol=2e-5, rtol=2e-5)


def mla_lse(q_lat, q_rope, case, b, seq_len, scale):
    """Causal float64 output and natural-log LSE of request b's query rows (the last rows of its context)."""
    q_len = q_lat.shape[0]
    keys = case.latents[b][:seq_len]
    logits = (q_lat.double() @ keys.T + q_rope.double() @ case.rope_keys[b][:seq_len].T) * scale  # [q_len, H, L]
    positions = torch.arange(seq_len)
    visible = positions[None, :] <= (seq_len - q_len + torch.arange(q_len))[:, None]  # [q_len, L]
    logits = logits.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [q_len, H]
    return torch.softmax(logits, dim=-1) @ keys, lse
