"""Sharded-latent attention, latent RMSNorm and latent bases, against float64 oracles."""

import math
import threading

import pytest
import torch

from mla_plugin.ops.latent_basis import (
    basis_matrix,
    fold_gamma_and_rotate,
    hadamard_matrix,
    pca_basis_from_weights,
)
from mla_plugin.ops.paged_attention import paged_latent_attention
from mla_plugin.ops.reference import absorbed_attention, sharded_latent_attention
from mla_plugin.ops.sharded_latent import LatentSlices, latent_rmsnorm
from tests.unit.paged_cases import (
    MIXED_REQUESTS,
    make_batch,
    mla_reference,
    per_request,
    random_logit_scale,
    rank_view,
)

ATOL = {torch.float32: 2e-5, torch.float64: 1e-10}

SHAPES = [  # (d_c, d_R, heads, block_size)
    (32, 16, 4, 8),
    (64, 0, 8, 1),
    (48, 16, 4, 16),
]


def run_paged(case, q_lat, q_rope, qsl, scale, *, chunk_tokens=None, hints=False, all_reduce=None, **slices):
    """The seam over a whole case; ``hints`` passes the host-side bounds a backend would."""
    bounds = {}
    if hints:
        q_lens = (qsl[1:] - qsl[:-1]).tolist()
        bounds = dict(max_query_len=max(q_lens), max_seq_len=max(case.seq_lens.tolist()))
    return paged_latent_attention(
        q_lat, q_rope, case.cache, qsl, case.seq_lens, case.block_table, scale,
        slices=LatentSlices(**slices), all_reduce=all_reduce, chunk_tokens=chunk_tokens, **bounds,
    )


@pytest.mark.parametrize("d_c,d_r,heads,block_size", SHAPES)
@pytest.mark.parametrize("num_shards", [1, 2, 4])
@pytest.mark.parametrize("mode", ["exact", "partitioned", "grouped"])
def test_paged_matches_float64_reference(mode, num_shards, d_c, d_r, heads, block_size, rng):
    dtype = torch.float32
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, dtype, rng)
    scale = 1.0 / math.sqrt(d_c + d_r)
    lam = random_logit_scale(heads, num_shards, rng)
    expected = sharded_latent_attention(
        per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents, case.rope_keys, scale,
        num_shards=num_shards, softmax_mode=mode, logit_scale=lam,
    )
    # small chunks: the split-context merge; hints: the bounds a backend passes
    for chunk, hints in ((None, False), (None, True), (block_size, False), (3 * block_size, True)):
        out = run_paged(
            case, q_lat, q_rope, qsl, scale, num_shards=num_shards, shard_offset=0,
            shards_local=num_shards, softmax=mode, logit_scale=lam.float(), chunk_tokens=chunk, hints=hints,
        )
        assert out.shape == q_lat.shape and out.dtype == dtype
        assert torch.isfinite(out).all()
        assert (out[int(qsl[-1]) :] == 0).all(), "padded query rows must stay zero"
        for got, want in zip(per_request(out, qsl), expected):
            torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=ATOL[dtype])


@pytest.mark.parametrize(
    "mode,num_shards",
    [("exact", 1), ("exact", 2), ("exact", 4), ("partitioned", 1), ("grouped", 1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modes_that_equal_mla(mode, num_shards, dtype, rng):
    d_c, d_r, heads, block_size = 32, 16, 4, 8
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, dtype, rng)
    scale = 1.0 / math.sqrt(d_c + d_r)
    expected = mla_reference(q_lat, q_rope, qsl, case, scale)
    for lam in (None, torch.ones(heads, num_shards, dtype=dtype)):
        out = run_paged(
            case, q_lat, q_rope, qsl, scale, num_shards=num_shards, shard_offset=0,
            shards_local=num_shards, softmax=mode, logit_scale=lam,
        )
        for got, want in zip(per_request(out, qsl), expected):
            torch.testing.assert_close(got, want, atol=ATOL[dtype], rtol=ATOL[dtype])


class ThreadAllReduce:
    """An all-reduce between threads that stand in for ranks (same sum order everywhere)."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world
        self.calls = 0

    def for_rank(self, rank: int, in_place: bool):
        def all_reduce(tensor):
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())
            self.barrier.wait()
            if rank == 0:
                self.calls += 1
            if in_place:
                tensor.copy_(total)
                return None
            return total

        return all_reduce


def run_ranks(splits, fn):
    """Run ``fn(rank, offset, local)`` for every rank in its own thread; outputs by rank."""
    results, errors = [None] * len(splits), []

    def target(rank):
        try:
            results[rank] = fn(rank, *splits[rank])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(len(splits))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("splits", [[(0, 2), (2, 2)], [(0, 1), (1, 3)], [(0, 1), (1, 1), (2, 1), (3, 1)]])
@pytest.mark.parametrize("mode", ["exact", "partitioned", "grouped"])
def test_simulated_ranks_concatenate_to_single_rank(mode, splits, rng):
    d_c, d_r, heads, block_size, num_shards = 32, 16, 8, 8, 4
    dtype = torch.float32
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, dtype, rng)
    scale = 1.0 / math.sqrt(d_c + d_r)
    lam = None if mode == "exact" else random_logit_scale(heads, num_shards, rng).float()
    common = dict(num_shards=num_shards, softmax=mode, logit_scale=lam)
    whole = run_paged(case, q_lat, q_rope, qsl, scale, shard_offset=0, shards_local=num_shards, **common)
    reducer = ThreadAllReduce(len(splits))

    def one_rank(rank, offset, local):
        cache, q_part = rank_view(case.cache, q_lat, d_c, num_shards, offset, local)
        all_reduce = reducer.for_rank(rank, in_place=rank % 2 == 0) if mode == "exact" else None
        return paged_latent_attention(
            q_part, q_rope, cache, qsl, case.seq_lens, case.block_table, scale,
            slices=LatentSlices(shard_offset=offset, shards_local=local, **common),
            all_reduce=all_reduce, chunk_tokens=16,
        )

    parts = run_ranks(splits, one_rank)
    torch.testing.assert_close(torch.cat(parts, dim=-1), whole, atol=2e-5, rtol=2e-5)
    if mode == "exact":
        # batched over requests: one all-reduce per 16-token chunk of the table's width
        chunks = -(-case.block_table.shape[1] * block_size // 16)
        assert reducer.calls == chunks > 1, "expected one all-reduce per context chunk"
        for got, want in zip(per_request(torch.cat(parts, dim=-1), qsl), mla_reference(q_lat, q_rope, qsl, case, scale)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_partitioned_and_grouped_differ_from_mla_when_sharded(rng):
    """Sanity: the approximate modes are approximations (g=2), and grouped zeroes other slices."""
    d_c, d_r, heads, block_size = 32, 8, 4, 8
    case, q_lat, q_rope, qsl = make_batch(MIXED_REQUESTS, d_c, d_r, heads, block_size, torch.float64, rng)
    scale = 1.0 / math.sqrt(d_c + d_r)
    exact = run_paged(case, q_lat, q_rope, qsl, scale, num_shards=2, shard_offset=0, shards_local=2, softmax="exact")
    for mode in ("partitioned", "grouped"):
        out = run_paged(case, q_lat, q_rope, qsl, scale, num_shards=2, shard_offset=0, shards_local=2, softmax=mode)
        assert (out - exact).abs().max() > 1e-3
    grouped = run_paged(case, q_lat, q_rope, qsl, scale, num_shards=2, shard_offset=0, shards_local=2, softmax="grouped")
    assert (grouped[:, :2, 16:] == 0).all() and (grouped[:, 2:, :16] == 0).all()


# ---- RMSNorm and bases -------------------------------------------------------------


def random_up_projections(heads, d_nope, d_v, d_c, gen):
    f64 = dict(dtype=torch.float64, generator=gen)
    return torch.randn(heads, d_nope, d_c, **f64), torch.randn(heads, d_v, d_c, **f64)


@pytest.mark.parametrize("basis", ["hadamard", "pca"])
def test_global_rmsnorm_commutes_with_rotation_local_does_not(basis, rng):
    d_c, num_shards = 32, 4
    w_uk, w_uv = random_up_projections(4, 8, 8, d_c, rng)
    rot = basis_matrix(basis, d_c, w_uk, w_uv)
    torch.testing.assert_close(rot.T @ rot, torch.eye(d_c, dtype=torch.float64), atol=1e-12, rtol=0)
    c = torch.randn(6, d_c, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 3.0, d_c, dtype=torch.float64)
    torch.testing.assert_close(
        latent_rmsnorm(c @ rot, num_shards, "global", 1e-6),
        latent_rmsnorm(c, num_shards, "global", 1e-6) @ rot,
        atol=1e-12, rtol=1e-12,
    )
    local_diff = latent_rmsnorm(c @ rot, num_shards, "local", 1e-6) - latent_rmsnorm(c, num_shards, "local", 1e-6) @ rot
    assert local_diff.abs().max() > 1e-3


def test_latent_rmsnorm_values(rng):
    c = torch.randn(3, 5, 12, generator=rng)
    glob = latent_rmsnorm(c, 3, "global", 0.0)
    torch.testing.assert_close(glob.pow(2).mean(-1), torch.ones(3, 5))
    local = latent_rmsnorm(c, 3, "local", 0.0).reshape(3, 5, 3, 4)  # [..., g, d_s]
    torch.testing.assert_close(local.pow(2).mean(-1), torch.ones(3, 5, 3))
    torch.testing.assert_close(latent_rmsnorm(c, 1, "local", 1e-6), latent_rmsnorm(c, 1, "global", 1e-6))
    assert latent_rmsnorm(c.to(torch.bfloat16), 3, "global", 1e-6).dtype == torch.bfloat16


@pytest.mark.parametrize("basis", ["identity", "hadamard", "pca"])
def test_fold_gamma_and_rotate_keeps_logits_and_values(basis, rng):
    heads, d_nope, d_v, d_c, d_model, tokens, eps = 4, 8, 6, 16, 24, 7, 1e-6
    f64 = dict(dtype=torch.float64, generator=rng)
    w_dkv = torch.randn(d_c, d_model, **f64)
    gamma = 0.5 + torch.rand(d_c, **f64)
    w_uk, w_uv = random_up_projections(heads, d_nope, d_v, d_c, rng)
    x, q_nope = torch.randn(tokens, d_model, **f64), torch.randn(tokens, heads, d_nope, **f64)

    # the usual layer: ĉ = γ ⊙ c / rms(c)
    c = x @ w_dkv.T  # [T, d_c]
    c_hat = gamma * c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    logits = torch.einsum("thn,hnc,sc->ths", q_nope, w_uk, c_hat)  # [T, H, T]
    values = torch.einsum("hvc,sc->shv", w_uv, c_hat)  # [T, H, d_v]

    rot = basis_matrix(basis, d_c, w_uk, w_uv)
    new_dkv, new_uk, new_uv = fold_gamma_and_rotate(w_dkv, gamma, w_uk, w_uv, rot)
    c_rot = latent_rmsnorm(x @ new_dkv.T, 4, "global", eps)  # [T, d_c], weightless
    q_tilde = torch.einsum("thn,hnc->thc", q_nope, new_uk)  # [T, H, d_c] absorbed query
    torch.testing.assert_close(torch.einsum("thc,sc->ths", q_tilde, c_rot), logits, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(torch.einsum("hvc,sc->shv", new_uv, c_rot), values, atol=1e-10, rtol=1e-10)

    # and exact sharded attention in the rotated basis is MLA on the original weights
    scale = 0.3
    ref_lat, _ = absorbed_attention(
        torch.einsum("hn,hnc->hc", q_nope[-1], w_uk), torch.zeros(heads, 0, dtype=torch.float64),
        c_hat, torch.zeros(tokens, 0, dtype=torch.float64), scale,
    )
    (sharded,) = sharded_latent_attention(
        [q_tilde[-1:]], [torch.zeros(1, heads, 0, dtype=torch.float64)], [c_rot],
        [torch.zeros(tokens, 0, dtype=torch.float64)], scale, num_shards=4, softmax_mode="exact",
    )
    torch.testing.assert_close(
        torch.einsum("hvc,hc->hv", new_uv, sharded[0]), torch.einsum("hvc,hc->hv", w_uv, ref_lat),
        atol=1e-10, rtol=1e-10,
    )


def test_fold_gamma_and_rotate_keeps_dtypes(rng):
    d_c = 8
    w_dkv = torch.randn(d_c, 12, generator=rng).to(torch.bfloat16)
    w_uk, w_uv = (w.float() for w in random_up_projections(2, 4, 4, d_c, rng))
    outs = fold_gamma_and_rotate(w_dkv, torch.ones(d_c), w_uk, w_uv, hadamard_matrix(d_c))
    assert [o.dtype for o in outs] == [torch.bfloat16, torch.float32, torch.float32]


def test_hadamard_matrix():
    for n in (1, 2, 4, 16, 64):
        h = hadamard_matrix(n)
        assert h.shape == (n, n) and h.dtype == torch.float64
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(h.abs(), torch.full((n, n), n**-0.5, dtype=torch.float64))
    assert hadamard_matrix(8, torch.float32).dtype == torch.float32


def test_pca_basis_sorted_orthogonal_and_deterministic(rng):
    w_uk, w_uv = random_up_projections(3, 6, 5, 12, rng)
    basis = pca_basis_from_weights(w_uk, w_uv)
    gram = torch.einsum("hnc,hnd->cd", w_uk, w_uk) + torch.einsum("hvc,hvd->cd", w_uv, w_uv)
    torch.testing.assert_close(basis.T @ basis, torch.eye(12, dtype=torch.float64), atol=1e-12, rtol=0)
    diag = basis.T @ gram @ basis
    eig = torch.diagonal(diag)
    torch.testing.assert_close(diag, torch.diag(eig), atol=1e-9, rtol=0)
    assert (eig[:-1] >= eig[1:] - 1e-9).all(), "eigenvalues must descend"
    pivots = basis.abs().argmax(dim=0)
    assert (basis[pivots, torch.arange(12)] > 0).all()
    torch.testing.assert_close(pca_basis_from_weights(w_uk.float(), w_uv.float()), basis, atol=1e-4, rtol=0)
    torch.testing.assert_close(basis_matrix("pca", 12, w_uk, w_uv), basis)
    torch.testing.assert_close(basis_matrix("identity", 12), torch.eye(12, dtype=torch.float64))


# ---- errors --------------------------------------------------------------------------


def paged_call(q_lat, all_reduce=None, return_lse=False, **kwargs):
    tokens, heads, d_loc = q_lat.shape
    args = dict(num_shards=2, shard_offset=0, shards_local=2, softmax="partitioned")
    args.update(kwargs)
    cache = torch.zeros(2, 4, d_loc + 2)
    return paged_latent_attention(
        q_lat, torch.zeros(tokens, heads, 2), cache, torch.tensor([0, tokens]), torch.tensor([tokens]),
        torch.zeros(1, 2, dtype=torch.int32), 1.0, slices=LatentSlices(**args), all_reduce=all_reduce, return_lse=return_lse,
    )


def test_errors_are_clear():
    with pytest.raises(ValueError, match="not divisible by num_shards"):
        latent_rmsnorm(torch.zeros(2, 10), 4, "global", 1e-6)
    with pytest.raises(ValueError, match="not divisible by num_shards"):
        sharded_latent_attention(
            [torch.zeros(1, 2, 10)], [torch.zeros(1, 2, 0)], [torch.zeros(3, 10)], [torch.zeros(3, 0)],
            1.0, num_shards=4, softmax_mode="exact",
        )
    with pytest.raises(ValueError, match="d_c must be divisible by num_shards"):
        paged_call(torch.zeros(1, 2, 9), num_shards=2, shards_local=2)
    with pytest.raises(ValueError, match="head count"):
        paged_call(torch.zeros(1, 3, 8), softmax="grouped")
    with pytest.raises(ValueError, match="head count"):
        sharded_latent_attention(
            [torch.zeros(1, 3, 8)], [torch.zeros(1, 3, 0)], [torch.zeros(3, 8)], [torch.zeros(3, 0)],
            1.0, num_shards=2, softmax_mode="grouped",
        )
    with pytest.raises(ValueError, match="unknown softmax mode 'tpla'.*exact, partitioned, grouped"):
        paged_call(torch.zeros(1, 2, 8), softmax="tpla")
    with pytest.raises(ValueError, match="unknown norm mode 'rms'.*global, local"):
        latent_rmsnorm(torch.zeros(2, 8), 2, "rms", 1e-6)
    with pytest.raises(ValueError, match="unknown basis 'svd'.*identity, hadamard, pca"):
        basis_matrix("svd", 8)
    with pytest.raises(ValueError, match="needs w_uk and w_uv"):
        basis_matrix("pca", 8)
    for n in (12, 0, 3):
        with pytest.raises(ValueError, match="power of two"):
            hadamard_matrix(n)
    with pytest.raises(ValueError, match="needs all_reduce"):
        paged_call(torch.zeros(1, 2, 4), softmax="exact", shards_local=1)
    with pytest.raises(ValueError, match="needs all_reduce"):
        paged_call(torch.zeros(1, 2, 8), softmax="exact", all_reduce=lambda t: t)
    with pytest.raises(ValueError, match="not within"):
        paged_call(torch.zeros(1, 2, 4), shard_offset=1, shards_local=2)
    with pytest.raises(ValueError, match="logit_scale"):
        paged_call(torch.zeros(1, 2, 8), logit_scale=torch.ones(2, 3))
    with pytest.raises(ValueError, match="cache row width"):
        paged_latent_attention(
            torch.zeros(1, 2, 8), torch.zeros(1, 2, 2), torch.zeros(2, 4, 9), torch.tensor([0, 1]),
            torch.tensor([1]), torch.zeros(1, 2, dtype=torch.int32), 1.0,
            slices=LatentSlices(num_shards=2, shard_offset=0, shards_local=2, softmax="grouped"),
        )
    with pytest.raises(ValueError, match="return_lse.*softmax='exact' only"):
        paged_call(torch.zeros(1, 2, 8), softmax="partitioned", return_lse=True)
