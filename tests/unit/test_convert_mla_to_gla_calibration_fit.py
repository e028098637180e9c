"""mla-to-gla calibration math (convert/calibration_fit.py): slice scales and activation PCA,
plain torch on random tensors."""

import pytest
import torch

from mla_plugin.convert.calibration_fit import (
    activation_pca_basis,
    build_fit_problem,
    fit_shard_scales,
    fold_shard_scales,
    latent_second_moment,
    query_positions,
    relative_head_errors,
    sliced_head_outputs,
)
from mla_plugin.ops.reference import sharded_latent_attention as reference_sharded_latent_attention
from mla_plugin.ops.sharded_latent import latent_rmsnorm

F64 = torch.float64


def _case(rng, *, windows=3, window=12, heads=4, d_c=16, nope=6, d_v=5, d_r=4, queries=None, dtype=F64):
    """Random per-layer activations and weights. The queries are strong enough that the
    attention is far from uniform, so the slice scales matter."""
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=rng, dtype=F64) * std).to(dtype)

    return dict(
        q_nope=randn(windows, window, heads, nope, std=1.5),
        q_rope=randn(windows, window, heads, d_r),
        c=randn(windows, window, d_c) * (torch.rand(d_c, generator=rng, dtype=F64) * 2 + 0.1).to(dtype),
        k_rope=randn(windows, window, d_r),
        w_uk=randn(heads, nope, d_c, std=0.8),
        w_uv=randn(heads, d_v, d_c),
        positions=query_positions(windows, window, queries, seed=int(torch.randint(1 << 30, (1,), generator=rng))),
        scale=0.7,
    )


def _problem(case, num_shards, softmax="partitioned", rmsnorm="global"):
    c = case["c"]
    exact = latent_rmsnorm(c, 1, "global")
    runtime = latent_rmsnorm(c, num_shards, rmsnorm)
    pos = case["positions"]
    q_nope = torch.stack([case["q_nope"][n, pos[n]] for n in range(pos.shape[0])])
    q_rope = torch.stack([case["q_rope"][n, pos[n]] for n in range(pos.shape[0])])
    q_latent = torch.einsum("nqhd,hdc->nqhc", q_nope, case["w_uk"])
    return build_fit_problem(q_latent, q_rope, pos, exact, case["k_rope"], case["w_uv"], case["scale"],
                             num_shards=num_shards, softmax_mode=softmax, runtime_latent=runtime)


def _reference_head_outputs(case, num_shards, softmax, rmsnorm, w_uk, w_uv, logit_scale=None, output_scale=None):
    """[N, T, H, d_v] through the runtime's oracle (every query row), scales applied explicitly."""
    latents = list(latent_rmsnorm(case["c"], num_shards, rmsnorm))
    q_lat = list(torch.einsum("ntha,hac->nthc", case["q_nope"], w_uk))
    outs = reference_sharded_latent_attention(q_lat, list(case["q_rope"]), latents, list(case["k_rope"]),
                                              case["scale"], num_shards=num_shards, softmax_mode=softmax,
                                              logit_scale=logit_scale)
    latent_out = torch.stack(outs)  # [N, T, H, d_c]
    if output_scale is not None:
        d_s = latent_out.shape[-1] // num_shards
        latent_out = latent_out * output_scale.repeat_interleave(d_s, dim=1)
    return torch.einsum("nthc,hvc->nthv", latent_out, w_uv)


@pytest.mark.parametrize("num_shards,softmax,rmsnorm", [(2, "partitioned", "global"), (4, "partitioned", "local"),
                                                        (2, "grouped", "local")])
def test_objective_is_the_runtime_math_with_explicit_scales(rng, num_shards, softmax, rmsnorm):
    """sliced_head_outputs (the fit's objective) = the sharded-latent oracle, then W_UV with μ per slice."""
    case = _case(rng, queries=5)
    heads = case["w_uk"].shape[0]
    lam = torch.rand(heads, num_shards, generator=rng, dtype=F64) * 3 + 0.5
    mu = torch.rand(heads, num_shards, generator=rng, dtype=F64) + 0.5
    problem = _problem(case, num_shards, softmax, rmsnorm)
    ours = sliced_head_outputs(problem, lam, mu)  # [N, H, Q, d_v]
    ref = _reference_head_outputs(case, num_shards, softmax, rmsnorm, case["w_uk"], case["w_uv"], lam, mu)
    pos = case["positions"]
    ref = torch.stack([ref[n, pos[n]] for n in range(pos.shape[0])]).transpose(1, 2)  # [N, H, Q, d_v]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # the target is exact MLA: the oracle's exact mode with the global norm
    exact = _reference_head_outputs(case, num_shards, "exact", "global", case["w_uk"], case["w_uv"])
    exact = torch.stack([exact[n, pos[n]] for n in range(pos.shape[0])]).transpose(1, 2)
    torch.testing.assert_close(problem.target, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_folding_the_scales_equals_applying_them(rng, num_shards):
    case = _case(rng)
    heads = case["w_uk"].shape[0]
    lam = torch.rand(heads, num_shards, generator=rng, dtype=F64) * 3 + 0.5
    mu = torch.rand(heads, num_shards, generator=rng, dtype=F64) + 0.5
    explicit = _reference_head_outputs(case, num_shards, "partitioned", "global", case["w_uk"], case["w_uv"],
                                       lam, mu)
    w_uk, w_uv = fold_shard_scales(case["w_uk"], case["w_uv"], lam, mu)
    folded = _reference_head_outputs(case, num_shards, "partitioned", "global", w_uk, w_uv)
    torch.testing.assert_close(folded, explicit, rtol=1e-10, atol=1e-12)
    # without μ, W_UV is untouched
    w_uk_only, w_uv_only = fold_shard_scales(case["w_uk"], case["w_uv"], lam)
    assert w_uv_only is case["w_uv"]
    torch.testing.assert_close(w_uk_only, w_uk)


@pytest.mark.parametrize("num_shards,fit_output", [(2, False), (2, True), (4, True)])
def test_fit_lowers_the_error(rng, num_shards, fit_output):
    case = _case(rng, windows=4, window=16, queries=8)
    problem = _problem(case, num_shards)
    fit = fit_shard_scales(problem, init_logit_scale=float(num_shards), fit_output=fit_output, steps=40)
    heads = case["w_uk"].shape[0]
    assert fit.logit_scale.shape == fit.output_scale.shape == (heads, num_shards)
    assert bool((fit.error_after <= fit.error_before).all())
    assert fit.error_after.sum() < 0.99 * fit.error_before.sum()  # random heads are far from the optimum
    # the reported errors are those of the returned scales
    torch.testing.assert_close(relative_head_errors(problem, fit.logit_scale, fit.output_scale), fit.error_after)
    if not fit_output:
        assert bool((fit.output_scale == 1).all())


def test_fit_keeps_the_start_when_it_is_already_best(rng):
    """g = 1: the sliced softmax is the exact one, λ = 1 is optimal (error 0) and is kept."""
    case = _case(rng, queries=6)
    problem = _problem(case, 1)
    fit = fit_shard_scales(problem, init_logit_scale=1.0, fit_output=True, steps=10)
    assert float(fit.error_before.max()) < 1e-20
    assert bool((fit.logit_scale == 1).all()) and bool((fit.output_scale == 1).all())


def test_activation_pca_basis_is_orthogonal_and_ordered(rng):
    d_c = 24
    mix = torch.randn(d_c, d_c, generator=rng, dtype=F64) * torch.linspace(3, 0.01, d_c, dtype=F64)
    c = torch.randn(5, 40, d_c, generator=rng, dtype=F64) @ mix.T
    moment = latent_second_moment(c)
    rot = activation_pca_basis(moment)
    torch.testing.assert_close(rot.T @ rot, torch.eye(d_c, dtype=F64), rtol=0, atol=1e-12)
    # rows ĉ @ Q have a diagonal second moment, in descending order
    normed = latent_rmsnorm(c, 1, "global").reshape(-1, d_c)
    energy = normed @ rot
    moment_rot = energy.T @ energy
    diag = torch.diagonal(moment_rot)
    torch.testing.assert_close(moment_rot - torch.diag(diag), torch.zeros_like(moment_rot), rtol=0,
                               atol=1e-9 * float(diag.max()))
    assert bool((diag[:-1] >= diag[1:]).all())
    # sign-fixed: the largest-magnitude entry of each column is positive (deterministic)
    cols = torch.arange(d_c)
    assert bool((rot[rot.abs().argmax(dim=0), cols] > 0).all())
    torch.testing.assert_close(activation_pca_basis(moment * 3.0), rot, rtol=0, atol=1e-10)
    # rotating by it before slicing is exact under the global norm: the first slice gets the most energy
    halves = energy.pow(2).reshape(-1, 2, d_c // 2).sum(dim=(0, 2))
    assert halves[0] > halves[1]


def test_query_positions_are_sorted_distinct_samples():
    pos = query_positions(5, 32, 7, seed=3)
    assert pos.shape == (5, 7)
    for row in pos:
        assert row.unique().numel() == 7 and bool((row[1:] > row[:-1]).all()) and int(row.max()) < 32
    assert torch.equal(query_positions(2, 8, None), torch.arange(8).expand(2, 8))
    assert torch.equal(query_positions(2, 8, 100), torch.arange(8).expand(2, 8))
