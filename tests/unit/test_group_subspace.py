"""Per-group latent subspaces (ops/latent_basis.group_subspace_projection, `--basis group-pca`):
the reduced-rank fit of each head group's keys and values, plain torch float64 on random weights."""

import pytest
import torch

from mla_plugin.convert.calibration_fit import build_fit_problem, query_positions, relative_head_errors
from mla_plugin.ops.latent_basis import group_subspace_projection

F64 = torch.float64


def _moment(rng, d_c: int) -> torch.Tensor:
    """A positive definite second moment with unequal directions, [d_c, d_c]."""
    x = torch.randn(4 * d_c, d_c, generator=rng, dtype=F64) * (torch.rand(d_c, generator=rng, dtype=F64) + 0.2)
    return x.T @ x


def _low_rank_per_group(rng, heads, rows, d_c, groups, rank) -> torch.Tensor:
    """[H, rows, d_c] weights where each group's heads together span only ``rank`` latent directions."""
    per = heads // groups
    blocks = [torch.randn(per * rows, rank, generator=rng, dtype=F64) @ torch.randn(rank, d_c, generator=rng, dtype=F64)
              for _ in range(groups)]
    return torch.cat(blocks).reshape(heads, rows, d_c)


def _weighted_error(w_uk, w_uv, projection, new_uk, new_uv, moment) -> float:
    """Σ_h E‖(W_h − W_h' P) ĉ‖² / Σ_h E‖W_h ĉ‖² over keys and values (E under the second moment)."""
    err = tot = 0.0
    for w, new in ((w_uk, new_uk), (w_uv, new_uv)):
        diff = w - new @ projection  # [H, rows, d_c]
        err += torch.einsum("hic,cd,hid->", diff, moment, diff).item()
        tot += torch.einsum("hic,cd,hid->", w, moment, w).item()
    return err / tot


def _metrics(rng, heads, width):
    """[H, width, width] positive semi-definite metrics, one of them singular."""
    x = torch.randn(heads, width, width, generator=rng, dtype=F64)
    metric = x @ x.transpose(1, 2)
    metric[0, :, 0] = metric[0, 0, :] = 0.0  # a direction head 0's queries never take
    return metric


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("balance,metrics", [(True, True), (True, False), (False, False)])
def test_exact_when_each_group_uses_at_most_d_s_directions(rng, groups, balance, metrics):
    heads, nope, d_v, d_c = 8, 6, 5, 32
    d_s = d_c // groups
    rank = d_s - 1 if groups > 1 else d_c  # below d_s: the spare eigenvectors must not matter
    w = _low_rank_per_group(rng, heads, nope + d_v, d_c, groups, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
    moment = _moment(rng, d_c)
    extra = dict(key_metric=_metrics(rng, heads, nope), value_metric=_metrics(rng, heads, d_v)) if metrics else {}
    projection, new_uk, new_uv = group_subspace_projection(w_uk, w_uv, moment, groups, balance=balance, **extra)
    assert projection.shape == (d_c, d_c) and new_uk.shape == w_uk.shape and new_uv.shape == w_uv.shape
    # head h of group r reads only slice r of z = P ĉ, and reproduces its keys and values exactly
    torch.testing.assert_close(new_uk @ projection, w_uk, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new_uv @ projection, w_uv, rtol=1e-9, atol=1e-9)
    group = torch.arange(heads) // (heads // groups)
    outside = (torch.arange(d_c) // d_s)[None, :] != group[:, None]  # [H, d_c]
    assert not new_uk.abs().amax(dim=1)[outside].any() and not new_uv.abs().amax(dim=1)[outside].any()


def test_error_falls_as_g_falls_and_beats_other_subspaces(rng):
    """A generic (full-rank) layer: the fit loses less as the groups grow (g = 8 > 4 > 2 > 1 = 0),
    and for each group no other d_s-dimensional subspace (with its best read-out) does better."""
    heads, nope, d_v, d_c = 8, 16, 16, 32
    w_uk = torch.randn(heads, nope, d_c, generator=rng, dtype=F64)
    w_uv = torch.randn(heads, d_v, d_c, generator=rng, dtype=F64) * 0.5
    moment = _moment(rng, d_c)
    errors = {}
    for groups in (8, 4, 2, 1):
        proj, new_uk, new_uv = group_subspace_projection(w_uk, w_uv, moment, groups, balance=False)
        errors[groups] = _weighted_error(w_uk, w_uv, proj, new_uk, new_uv, moment)
    assert errors[8] > errors[4] > errors[2] > errors[1] and errors[1] < 1e-20, errors
    assert errors[8] > 0.05  # the model really is lossy at g = 8

    # optimality at g = 4 (unbalanced): a random B_r with its least-squares read-out D_r is never better
    groups, d_s = 4, d_c // 4
    proj, new_uk, new_uv = group_subspace_projection(w_uk, w_uv, moment, groups, balance=False)
    root = torch.linalg.cholesky(moment)  # S = L Lᵀ: E‖M ĉ‖² = ‖M L‖²_F
    for r in range(groups):
        heads_r = slice(2 * r, 2 * r + 2)
        a = torch.cat([w_uk[heads_r].reshape(-1, d_c), w_uv[heads_r].reshape(-1, d_c)])  # [m, d_c]
        fitted = torch.cat([new_uk[heads_r].reshape(-1, d_c), new_uv[heads_r].reshape(-1, d_c)]) @ proj
        best = torch.linalg.matrix_norm((a - fitted) @ root).item()
        for _ in range(5):
            b = torch.randn(d_s, d_c, generator=rng, dtype=F64)
            z = b @ root  # [d_s, d_c]: the cached values' square root of covariance
            read = (a @ root) @ torch.linalg.pinv(z)  # least-squares D_r
            assert torch.linalg.matrix_norm(a @ root - read @ z).item() >= best - 1e-9


def test_balance_weighs_keys_and_values_equally(rng):
    """With values 100x smaller than keys, the unbalanced fit spends the subspace on keys; the
    balanced one keeps the values' relative error comparable to the keys'."""
    heads, nope, d_v, d_c, groups = 4, 16, 16, 32, 2
    w_uk = torch.randn(heads, nope, d_c, generator=rng, dtype=F64)
    w_uv = torch.randn(heads, d_v, d_c, generator=rng, dtype=F64) * 0.01
    moment = _moment(rng, d_c)

    def value_error(balance):
        proj, _, new_uv = group_subspace_projection(w_uk, w_uv, moment, groups, balance=balance)
        diff = w_uv - new_uv @ proj
        return (torch.einsum("hic,cd,hid->", diff, moment, diff) / torch.einsum("hic,cd,hid->", w_uv, moment, w_uv)).item()

    assert value_error(True) < 0.7 * value_error(False)


def test_fit_problem_reads_the_runtime_weights(rng):
    """calibration_fit's problem with a group subspace: target from the exact model; the sliced
    outputs from z = P ĉ and the new up-projections. Exact subspaces give zero error at λ = μ = 1."""
    windows, window, heads, nope, d_v, d_r, d_c, groups = 2, 10, 4, 6, 5, 4, 16, 2
    w = _low_rank_per_group(rng, heads, nope + d_v, d_c, groups, d_c // groups)
    w_uk, w_uv = w[:, :nope] * 0.5, w[:, nope:]
    moment = _moment(rng, d_c)
    proj, new_uk, new_uv = group_subspace_projection(w_uk, w_uv, moment, groups)
    latent = torch.randn(windows, window, d_c, generator=rng, dtype=F64)
    q_nope = torch.randn(windows, window, heads, nope, generator=rng, dtype=F64)
    q_rope = torch.randn(windows, window, heads, d_r, generator=rng, dtype=F64)
    k_rope = torch.randn(windows, window, d_r, generator=rng, dtype=F64)
    positions = query_positions(windows, window, None)
    problem = build_fit_problem(
        torch.einsum("nqhd,hdc->nqhc", q_nope, w_uk), q_rope, positions, latent, k_rope, w_uv, 0.5,
        num_shards=groups, softmax_mode="grouped", runtime_latent=latent @ proj.T,
        runtime_q_latent=torch.einsum("nqhd,hdc->nqhc", q_nope, new_uk), runtime_w_uv=new_uv)
    ones = torch.ones(heads, groups, dtype=F64)
    assert float(relative_head_errors(problem, ones, ones).max()) < 1e-20
    # the naive grouped read of slice r of ĉ (no projection) is far from exact on the same model
    naive = build_fit_problem(torch.einsum("nqhd,hdc->nqhc", q_nope, w_uk), q_rope, positions, latent, k_rope, w_uv,
                              0.5, num_shards=groups, softmax_mode="grouped")
    assert float(relative_head_errors(naive, ones, ones).min()) > 1e-3


def test_bad_shapes_are_refused(rng):
    w_uk = torch.randn(6, 4, 16, generator=rng, dtype=F64)
    w_uv = torch.randn(6, 4, 16, generator=rng, dtype=F64)
    with pytest.raises(ValueError, match="divisible by 4 groups"):
        group_subspace_projection(w_uk, w_uv, torch.eye(16, dtype=F64), 4)
    with pytest.raises(ValueError, match="do not fit"):
        group_subspace_projection(w_uk, w_uv, torch.eye(8, dtype=F64), 2)
