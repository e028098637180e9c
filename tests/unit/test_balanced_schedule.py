"""The balanced schedule of the Triton decode kernels (``triton_paged_attention.py``):
``_plan_rows`` (request, context and running cost of every query row, on the device),
``_balanced_attention`` (workers over equal shares of the batch's key tiles) and
``_merge_pieces`` (rows cut between workers), against plain-torch integers and the float64
references, with NaN-poisoned caches and lengths from 1 to a few hundred keys in one batch.

On CPU in Triton's interpreter; with ``-m gpu`` compiled on a CUDA machine.
"""

import math

import pytest
import torch

from mla_plugin.ops.reference import sharded_latent_attention
from mla_plugin.ops.sharded_latent import LatentSlices
from tests.unit.paged_cases import (
    SimulatedAllReduce,
    make_batch,
    make_paged_case,
    mla_reference,
    per_request,
    random_logit_scale,
    rank_view,
)
from tests.unit.test_triton_kernels import DEVICES, HAS_CUDA, _CountingKernel, on

# (q_len, seq_len): a long decode next to short ones, a 3-token verify, a prefill on a cached
# prefix, a one-key request: lengths 10x apart, as a real decode batch.
VARIED = [(1, 300), (1, 7), (3, 41), (1, 1), (6, 70), (1, 130)]


@pytest.fixture(scope="module")
def kernels():
    import triton.runtime.interpreter as interpreter

    import mla_plugin.ops.triton_paged_attention as module

    assert isinstance(module._balanced_attention, interpreter.InterpretedFunction) == (not HAS_CUDA)
    return module


def counted(kernels, monkeypatch, *names) -> dict:
    """Wrap kernels so their launches are counted (the proof of what ran)."""
    wrapped = {name: _CountingKernel(getattr(kernels, name)) for name in names}
    for name, kernel in wrapped.items():
        monkeypatch.setattr(kernels, name, kernel)
    return wrapped


@pytest.mark.parametrize("device", DEVICES)
def test_plan_matches_torch(kernels, device, rng):
    """b(t), ctx_t and cost_start from one program, over more rows than its block (the carry
    between blocks), with padding rows and a request without queries."""
    q_lens = [1] * 300 + [0] + [400, 5] + [1] * 200
    seq_lens = torch.randint(1, 500, (len(q_lens),), generator=rng, dtype=torch.int32)
    seq_lens = torch.maximum(seq_lens, torch.tensor(q_lens, dtype=torch.int32))
    starts = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    tokens = int(starts[-1]) + 3  # three padding rows
    block_n = 16
    request, context, cost_start = kernels._plan_of_tokens(*on(device, starts, seq_lens), tokens, len(q_lens),
                                                           block_n)
    want_request = torch.searchsorted(starts, torch.arange(tokens, dtype=torch.int32), right=True) - 1
    want_request = want_request.clamp(max=len(q_lens) - 1)
    t = torch.arange(tokens)
    want_context = seq_lens[want_request] - (starts[want_request + 1] - t) + 1
    want_context = torch.where(t >= starts[-1], 0, want_context.clamp(min=0))
    row_cost = math.ceil(kernels.ROW_COST_KEYS / block_n)
    cost = (want_context + block_n - 1) // block_n + row_cost
    assert torch.equal(request.cpu()[: int(starts[-1])], want_request[: int(starts[-1])].int())
    assert torch.equal(context.cpu(), want_context.int())
    assert torch.equal(cost_start.cpu(), torch.cat([torch.zeros(1), cost.cumsum(0)]).int())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("workers", [1, 2, 5, 64, 2000])
def test_balanced_mla_matches_float64_reference(kernels, workers, device, monkeypatch, rng):
    """One worker (every row whole), a few (rows cut between workers, several pieces of the
    long row), more workers than the batch has cost units (empty workers); the output, the
    lse and the padding rows; the balanced kernels ran and split-K did not."""
    monkeypatch.setattr(kernels, "choose_workers", lambda stream_programs, device: workers)
    counts = counted(kernels, monkeypatch, "_plan_rows", "_balanced_attention", "_merge_pieces")
    d_c, d_r, heads, block_size = 64, 16, 4, 16
    case, q_lat, q_rope, qsl = make_batch(VARIED, d_c, d_r, heads, block_size, torch.float32, rng)
    args = on(device, q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table)
    before = dict(kernels.SCHEDULE_CALLS)
    out, lse = kernels.triton_paged_latent_attention(*args, 0.2, LatentSlices(), None, 300, True)
    assert kernels.SCHEDULE_CALLS["balanced"] == before.get("balanced", 0) + 1
    assert kernels.SCHEDULE_CALLS["split"] == before.get("split", 0)
    assert {name: kernel.launches for name, kernel in counts.items()} == {
        "_plan_rows": 1, "_balanced_attention": 1, "_merge_pieces": 1}
    out, lse = out.cpu(), lse.cpu()
    for got, want in zip(per_request(out, qsl), mla_reference(q_lat, q_rope, qsl, case, 0.2)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    padding = int(qsl[-1])
    assert (out[padding:] == 0).all() and (lse[padding:] == float("-inf")).all()
    split_out, split_lse = kernels.triton_paged_latent_attention(*args, 0.2, LatentSlices(), None, 300, True,
                                                                 num_splits=3)
    torch.testing.assert_close(lse, split_lse.cpu(), atol=1e-5, rtol=1e-5)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,num_shards,local", [("partitioned", 2, 2), ("grouped", 4, 2), ("grouped", 2, 1)])
def test_balanced_streams_match_float64_reference(kernels, mode, num_shards, local, device, monkeypatch, rng):
    """Several local slices (one softmax each) and grouped heads, whose other slices' columns
    must be 0; with λ per (head, slice), on the ranks' views concatenated."""
    monkeypatch.setattr(kernels, "choose_workers", lambda stream_programs, device: 4)
    d_c, d_r, heads, block_size = 64, 16, 4, 8
    case, q_lat, q_rope, qsl = make_batch(VARIED, d_c, d_r, heads, block_size, torch.float32, rng)
    lam = random_logit_scale(heads, num_shards, rng)
    parts = []
    for offset in range(0, num_shards, local):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, offset, local)
        slices = LatentSlices(num_shards=num_shards, shard_offset=offset, shards_local=local, softmax=mode,
                              logit_scale=lam.float())
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        before = kernels.SCHEDULE_CALLS["balanced"]
        parts.append(kernels.triton_paged_latent_attention(*args, 0.2, slices, None, 300, False).cpu())
        assert kernels.SCHEDULE_CALLS["balanced"] == before + 1
    out = torch.cat(parts, dim=-1)
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, 0.2, num_shards=num_shards, softmax_mode=mode,
                                        logit_scale=lam)
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (out[int(qsl[-1]):] == 0).all()


# (layout, heads, block_size): the tiles gpu_launch_config picks, forced in the interpreter.
GPU_TILE_CASES = [("mla", 16, 64), ("mla", 16, 8), ("partitioned", 16, 16), ("mla", 128, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout,heads,block_size", GPU_TILE_CASES)
def test_balanced_gpu_tiles_match_float64_reference(kernels, layout, heads, block_size, device, monkeypatch, rng):
    """The GPU's tiles for each layout under the balanced schedule (one page lookup per tile
    where BLOCK_N divides the block size, a page per key otherwise)."""
    d_c, d_r = 512, 64
    num_shards = 2 if layout == "partitioned" else 1
    gpu = kernels.gpu_launch_config(d_c // num_shards, heads)
    if device == "cpu":
        monkeypatch.setattr(kernels, "TUNING", {"block_h": gpu["block_h"], "block_n": gpu["block_n"]})
        monkeypatch.setattr(kernels, "choose_workers", lambda stream_programs, device: 3)
    requests = [(1, 37), (2, 20), (1, 5)]
    case, q_lat, q_rope, qsl = make_batch(requests, d_c, d_r, heads, block_size, torch.float32, rng, padded_rows=1)
    lam = random_logit_scale(heads, num_shards, rng).float() if num_shards > 1 else None
    parts = []
    for rank in range(num_shards):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, rank, 1)
        slices = (LatentSlices() if num_shards == 1 else
                  LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax=layout, logit_scale=lam))
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        before = kernels.SCHEDULE_CALLS["balanced"]
        parts.append(kernels.triton_paged_latent_attention(*args, 0.25, slices, None, 37, False).cpu())
        assert kernels.SCHEDULE_CALLS["balanced"] == before + 1
    out = torch.cat(parts, dim=-1)
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, 0.25, num_shards=num_shards,
                                        softmax_mode="exact" if num_shards == 1 else layout,
                                        logit_scale=None if lam is None else lam.double())
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert (out[int(qsl[-1]):] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_split_schedule_is_still_chosen_when_asked(kernels, device, monkeypatch, rng):
    """TUNING's schedule "split" (the benchmark's comparison) runs split-K, with the same result."""
    case, q_lat, q_rope, qsl = make_batch(VARIED[:3], 64, 16, 4, 16, torch.float32, rng)
    args = on(device, q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table)
    balanced = kernels.triton_paged_latent_attention(*args, 0.2, LatentSlices(), None, 300, False)
    monkeypatch.setattr(kernels, "TUNING", {"schedule": "split"})
    before = dict(kernels.SCHEDULE_CALLS)
    split = kernels.triton_paged_latent_attention(*args, 0.2, LatentSlices(), None, 300, False)
    assert kernels.SCHEDULE_CALLS["split"] == before.get("split", 0) + 1
    assert kernels.SCHEDULE_CALLS["balanced"] == before.get("balanced", 0)
    torch.testing.assert_close(balanced, split, atol=2e-5, rtol=2e-5)


# (layout, heads, block_size): the fp8 configurations gpu_launch_config gives TMA tile copies.
TMA_CASES = [("mla", 16, 64), ("partitioned", 16, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("schedule", ["balanced", "split"])
@pytest.mark.parametrize("layout,heads,block_size", TMA_CASES)
def test_tma_tiles_match_float64_reference(kernels, layout, heads, block_size, schedule, cache_dtype, device,
                                           monkeypatch, rng):
    """Key tiles by TMA copies (whole boxes, keys past the context included) under both
    schedules. With a float32 cache the NaN in unused slots is a real NaN inside the boxes, so a
    missing P·V mask shows; the interpreter decodes e4m3 NaN bytes as finite values, so the fp8
    case checks the values path (and, compiled on a GPU, the mask too)."""
    d_c, d_r = 512, 64
    num_shards = 2 if layout == "partitioned" else 1
    gpu = kernels.gpu_launch_config(d_c // num_shards, heads, fp8=True)
    assert gpu["tma"] and block_size % gpu["block_n"] == 0
    monkeypatch.setattr(kernels, "TUNING", {"block_h": gpu["block_h"], "block_n": gpu["block_n"], "tma": True,
                                            "schedule": schedule})
    monkeypatch.setattr(kernels, "choose_workers", lambda stream_programs, device: 3)
    requests = [(1, 37), (2, 70), (1, 5)]
    case = make_paged_case([n for _, n in requests], d_c, d_r, block_size, cache_dtype, rng)
    tokens = sum(q for q, _ in requests) + 1  # one padding row
    q_lat = torch.randn(tokens, heads, d_c, generator=rng)
    q_rope = torch.randn(tokens, heads, d_r, generator=rng)
    qsl = torch.tensor([0] + [q for q, _ in requests]).cumsum(0).to(torch.int32)
    lam = random_logit_scale(heads, num_shards, rng).float() if num_shards > 1 else None
    parts = []
    before = dict(kernels.TILE_LOADS)
    for rank in range(num_shards):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, rank, 1)
        slices = (LatentSlices() if num_shards == 1 else
                  LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax=layout, logit_scale=lam))
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        parts.append(kernels.triton_paged_latent_attention(*args, 0.25, slices, None, 70, False).cpu())
    assert kernels.TILE_LOADS["tma"] == before.get("tma", 0) + num_shards
    assert kernels.TILE_LOADS["pointer"] == before.get("pointer", 0)
    out = torch.cat(parts, dim=-1)
    expected = sharded_latent_attention(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents,
                                        case.rope_keys, 0.25, num_shards=num_shards,
                                        softmax_mode="exact" if num_shards == 1 else layout,
                                        logit_scale=None if lam is None else lam.double())
    tol = dict(atol=2e-5, rtol=2e-5) if device == "cpu" else dict(atol=2e-2, rtol=2e-2)
    for got, want in zip(per_request(out, qsl), expected):
        torch.testing.assert_close(got, want, **tol)
    assert (out[int(qsl[-1]):] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float8_e4m3fn])
def test_tma_tiles_exact_over_ranks(kernels, cache_dtype, device, monkeypatch, rng):
    """The exact softmax over two ranks (split-K over all-reduced partial logits; stage 1 reads
    the latent tile for the output) with the fp8 configuration's TMA tiles."""
    d_c, d_r, heads, block_size = 512, 64, 16, 32
    gpu = kernels.gpu_launch_config(d_c // 2, heads, fp8=True)
    assert gpu["tma"] and block_size % gpu["block_n"] == 0
    monkeypatch.setattr(kernels, "TUNING", {"block_h": gpu["block_h"], "block_n": gpu["block_n"], "tma": True})
    requests = [(1, 70), (2, 33), (1, 5)]
    case = make_paged_case([n for _, n in requests], d_c, d_r, block_size, cache_dtype, rng)
    tokens = sum(q for q, _ in requests) + 1
    q_lat = torch.randn(tokens, heads, d_c, generator=rng)
    q_rope = torch.randn(tokens, heads, d_r, generator=rng)
    qsl = torch.tensor([0] + [q for q, _ in requests]).cumsum(0).to(torch.int32)
    reduce = SimulatedAllReduce()
    before = dict(kernels.TILE_LOADS)

    def one_rank(rank, collect):
        cache, q_part = rank_view(case.cache, q_lat, d_c, 2, rank, 1)
        slices = LatentSlices(num_shards=2, shard_offset=rank, shards_local=1, softmax="exact")
        args = on(device, q_part.contiguous(), q_rope, cache.contiguous(), qsl, case.seq_lens, case.block_table)
        return kernels.triton_paged_latent_attention(*args, 0.25, slices, reduce.of_rank(rank, collect), 70, True)

    for rank in (0, 1):
        one_rank(rank, True)
    parts = [one_rank(rank, False) for rank in (0, 1)]
    assert kernels.TILE_LOADS["tma"] == before.get("tma", 0) + 4 and kernels.SCHEDULE_CALLS["split"] > 0
    out = torch.cat([p[0].cpu() for p in parts], dim=-1)
    want = mla_reference(q_lat, q_rope, qsl, case, 0.25)
    tol = dict(atol=2e-5, rtol=2e-5) if device == "cpu" else dict(atol=2e-2, rtol=2e-2)
    for got, ref in zip(per_request(out, qsl), want):
        torch.testing.assert_close(got, ref, **tol)
    assert (out[int(qsl[-1]):] == 0).all()


class _Recorder:
    """Stands in for a kernel: records that it was launched, runs nothing."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("schedule", ["balanced", "split"])
def test_a_call_launches_no_torch_kernels(kernels, schedule, fp8, monkeypatch, rng):
    """Around its Triton launches a decode call runs no torch compute (only allocations and
    views): the row bookkeeping is a Triton launch, outputs are `empty`, σ is already float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ran = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    launched = {name: _Recorder() for name in ("_plan_rows", "_token_rows", "_balanced_attention", "_merge_pieces",
                                               "_split_attention", "_merge_splits")}
    for name, recorder in launched.items():
        monkeypatch.setattr(kernels, name, recorder)
    monkeypatch.setattr(kernels, "_check_interpreter", lambda device: None)
    monkeypatch.setattr(kernels, "TUNING", {"schedule": schedule})
    case, q_lat, q_rope, qsl = make_batch(VARIED, 64, 16, 4, 16, torch.float32, rng)
    cache = case.cache.to(torch.float8_e4m3fn) if fp8 else case.cache
    sigma = torch.ones(1) if fp8 else None
    with Ops():
        kernels.triton_paged_latent_attention(q_lat, q_rope, cache, qsl, case.seq_lens, case.block_table, 0.2,
                                              LatentSlices(), None, 300, False, cache_scale=sigma)
    assert launched["_plan_rows" if schedule == "balanced" else "_token_rows"].launches == 1
    assert set(ran) <= {"empty", "new_empty", "view", "reshape", "_reshape_alias", "alias", "slice", "detach", "select",
                        "_to_copy", "to"} and "_to_copy" not in ran, ran
