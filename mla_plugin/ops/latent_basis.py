"""Orthogonal bases for the latent, and folding the RMSNorm weight into the weights.

Symbols as in docs/design.md (Glossary; section 5, "Bases"). Before the latent is cut
into slices, an orthogonal ``Q`` (d_c x d_c) may rotate it. Weights have the shape of
``nn.Linear.weight``, ``[out, in]`` (``c_t = W_DKV x_t``, rows = latent dims); with the
norm weight γ folded into the up-projections the layer becomes

    W_DKV'   = Qᵀ W_DKV
    W_UK,h'  = W_UK,h diag(γ) Q
    W_UV,h'  = W_UV,h diag(γ) Q

and the cache holds the weightless ``ĉ'_t = c'_t / rms(c'_t) = Qᵀ c_t / rms(c_t)`` (for
latents kept in rows: ``c_rows @ Q``). Under the global RMSNorm this is exact, since
``‖Qᵀc‖ = ‖c‖``: ``W_UK,h' ĉ'_t = W_UK,h diag(γ) c_t / rms(c_t)``, the original key, and
likewise the value.

Bases: ``identity``; ``hadamard`` (spreads energy evenly over the slices);
``pca`` of the up-projection weights (concentrates it in the leading slices).
"""

import torch

from mla_plugin.gla_options import BASES  # the one vocabulary (framework-neutral, no torch)
from mla_plugin.ops.pca import descending_eigenvectors


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix ``[n, n]`` with entries ±1/sqrt(n).

    ``n`` must be a power of two (1, 2, 4, ...).
    """
    if not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"hadamard_matrix needs a power of two n >= 1, got {n!r}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return (h / n**0.5).to(dtype)


def pca_basis_from_weights(w_uk: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Principal axes of the latent as seen by the up-projections, ``[d_c, d_c]`` float64.

    ``w_uk`` [H, d_nope, d_c], ``w_uv`` [H, d_v, d_c]. Columns are the eigenvectors of
    ``M = Σ_h (W_UK,hᵀ W_UK,h + W_UV,hᵀ W_UV,h)`` by descending eigenvalue, each with
    its largest-magnitude entry made positive, so the result is deterministic.
    """
    if w_uk.dim() != 3 or w_uv.dim() != 3:
        raise ValueError(
            f"w_uk and w_uv must be [H, d_nope or d_v, d_c], got {tuple(w_uk.shape)} and {tuple(w_uv.shape)}"
        )
    if w_uk.shape[-1] != w_uv.shape[-1]:
        raise ValueError(f"w_uk d_c {w_uk.shape[-1]} != w_uv d_c {w_uv.shape[-1]}")
    uk, uv = w_uk.to(torch.float64), w_uv.to(torch.float64)
    gram = torch.einsum("hnc,hnd->cd", uk, uk) + torch.einsum("hvc,hvd->cd", uv, uv)  # [d_c, d_c]
    return descending_eigenvectors(gram)


def basis_matrix(
    name: str,
    d_c: int,
    w_uk: torch.Tensor | None = None,
    w_uv: torch.Tensor | None = None,
) -> torch.Tensor:
    """The orthogonal basis rotation ``Q`` [d_c, d_c] (float64) for a basis name in ``BASES``.

    ``pca`` needs ``w_uk`` and ``w_uv`` (see ``pca_basis_from_weights``).
    """
    if name == "identity":
        return torch.eye(d_c, dtype=torch.float64)
    if name == "hadamard":
        return hadamard_matrix(d_c)
    if name == "pca":
        if w_uk is None or w_uv is None:
            raise ValueError("basis 'pca' needs w_uk and w_uv")
        basis = pca_basis_from_weights(w_uk, w_uv)
        if basis.shape[0] != d_c:
            raise ValueError(f"weights have d_c {basis.shape[0]}, expected {d_c}")
        return basis
    raise ValueError(f"unknown basis {name!r}; valid: {', '.join(BASES)}")


def fold_gamma_and_rotate(
    w_dkv: torch.Tensor | None,  # [d_c, d_model]  latent rows of kv_a_proj_with_mqa (or None)
    gamma: torch.Tensor,  # [d_c]            kv_a_layernorm weight
    w_uk: torch.Tensor,  # [H, d_nope, d_c]
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    rotation: torch.Tensor,  # [d_c, d_c] orthogonal Q
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Return ``(Qᵀ W_DKV, W_UK diag(γ) Q, W_UV diag(γ) Q)`` in the inputs' dtypes.

    Computed in float64. Afterwards the latent norm must be weightless. ``w_dkv=None``
    (the latent is rotated at run time instead) gives None in its place.
    """
    d_c = gamma.shape[0]
    if gamma.shape != (d_c,) or rotation.shape != (d_c, d_c) or (
        w_dkv is not None and w_dkv.shape[0] != d_c
    ):
        raise ValueError(
            f"gamma {tuple(gamma.shape)} / rotation {tuple(rotation.shape)} / w_dkv "
            f"{None if w_dkv is None else tuple(w_dkv.shape)} do not match d_c {d_c}"
        )
    if w_uk.shape[-1] != d_c or w_uv.shape[-1] != d_c:
        raise ValueError(
            f"w_uk {tuple(w_uk.shape)} / w_uv {tuple(w_uv.shape)} do not end in d_c {d_c}"
        )
    f64 = torch.float64
    rot, g = rotation.to(f64), gamma.to(f64)
    new_dkv = None if w_dkv is None else (rot.T @ w_dkv.to(f64)).to(w_dkv.dtype)  # [d_c, d_model]
    new_uk = (w_uk.to(f64) * g) @ rot  # [H, d_nope, d_c]
    new_uv = (w_uv.to(f64) * g) @ rot  # [H, d_v, d_c]
    return new_dkv, new_uk.to(w_uk.dtype), new_uv.to(w_uv.dtype)


def fold_latent_weights(
    kv_b: torch.Tensor,  # [H * (d_nope + d_v), d_c]  kv_b_proj weight
    gamma: torch.Tensor,  # [d_c]                      kv_a_layernorm weight
    *,
    num_heads: int,
    nope_dim: int,
    v_dim: int,
    basis: str,
    logit_scale: float = 1.0,
    w_dkv: torch.Tensor | None = None,  # [d_c, d_model], rotated too when given
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The sharded-latent weight preparation shared by the runtime and the converter.

    Splits kv_b_proj per head, picks the basis rotation Q for ``basis`` from the γ-folded
    up-projections, folds γ and Q in, and multiplies W_UK by the slice logit scale λ.
    Returns ``(Q, Qᵀ W_DKV or None, W_UK', W_UV')``, all float64.
    """
    f64 = torch.float64
    d_c = kv_b.shape[-1]
    per_head = kv_b.to(f64).reshape(num_heads, nope_dim + v_dim, d_c)
    w_uk, w_uv = per_head[:, :nope_dim], per_head[:, nope_dim:]  # [H, d_nope, d_c], [H, d_v, d_c]
    gamma = gamma.to(f64)
    rotation = basis_matrix(basis, d_c, w_uk * gamma, w_uv * gamma)
    w_dkv = None if w_dkv is None else w_dkv.to(f64)
    w_dkv, w_uk, w_uv = fold_gamma_and_rotate(w_dkv, gamma, w_uk, w_uv, rotation)
    return rotation, w_dkv, w_uk * logit_scale, w_uv


# --------------------------------------------------------------------------------------
# Per-group latent subspaces (grouped softmax, ``group-pca``; docs/design.md section 5)


def group_subspace_projection(
    w_uk: torch.Tensor,  # [H, d_nope, d_c]  γ folded in (W_UK,h diag(γ)), no rotation
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    second_moment: torch.Tensor,  # [d_c, d_c]  S = Σ_t ĉ_t ĉ_tᵀ of the weightless ĉ (any positive multiple)
    num_groups: int,
    *,
    balance: bool = True,
    key_metric: torch.Tensor | None = None,  # [H, d_nope, d_nope] PSD, e.g. E[q^C_h q^C_hᵀ]
    value_metric: torch.Tensor | None = None,  # [H, d_v, d_v] PSD, e.g. W_O,hᵀ W_O,h
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per head group r a projection B_r [d_s, d_c] and its heads' new up-projections.

    Group r's heads' no-rope keys and values are y = A_r ĉ with A_r = [W̄_UK,h; W̄_UV,h]
    stacked over its heads ([m, d_c], m = (H/g)(d_nope + d_v)). The group caches
    z = B_r ĉ (d_s values) and reads y ≈ D_r z. Minimising E‖A_r ĉ − D_r B_r ĉ‖² over
    rank-d_s products is a reduced-rank regression: with U the top d_s eigenvectors of the
    group's key/value covariance C_r = A_r S A_rᵀ, D_r B_r = U Uᵀ A_r is optimal, so
    B_r = Uᵀ A_r and D_r = U. When rank A_r ≤ d_s, U spans A_r's range (wherever S is
    positive definite) and U Uᵀ A_r = A_r: exact.

    ``key_metric`` / ``value_metric`` measure each head's key / value error in its own metric
    M (‖M^{1/2} e‖²: with M = E[q qᵀ] the key error is the logit error, with W_Oᵀ W_O the
    value error is the output error); ``balance`` then weighs the keys and the values of the
    group equally (each block scaled by one over its root-mean-square output). Any such
    invertible row weighting W is undone in D_r (B_r = Uᵀ W A_r, D_r = W⁻¹ U), so the
    low-rank case stays exact.

    Returns ``(P, W_UK', W_UV')`` in float64: P = [B_0; …; B_{g−1}] [d_c, d_c]; W_UK,h' /
    W_UV,h' [H, ·, d_c] hold head h's rows of D_r in the columns of its group's slice r
    (r·d_s … (r+1)·d_s) and zeros elsewhere.
    """
    heads, nope, d_c = w_uk.shape
    v_dim = w_uv.shape[1]
    if w_uv.shape[0] != heads or w_uv.shape[2] != d_c or second_moment.shape != (d_c, d_c):
        raise ValueError(f"w_uk {tuple(w_uk.shape)}, w_uv {tuple(w_uv.shape)} and second moment "
                         f"{tuple(second_moment.shape)} do not fit")
    if heads % num_groups or d_c % num_groups:
        raise ValueError(f"{heads} heads and d_c {d_c} must both be divisible by {num_groups} groups")
    f64 = torch.float64
    uk, uv, moment = w_uk.to(f64), w_uv.to(f64), second_moment.to(f64)
    moment = moment * (d_c / moment.trace().clamp_min(1e-300))  # E[ĉ ĉᵀ] scale (trace d_c): z's size
    per_group, d_s = heads // num_groups, d_c // num_groups
    projection = torch.zeros(d_c, d_c, dtype=f64)
    new_uk = torch.zeros(heads, nope, d_c, dtype=f64)
    new_uv = torch.zeros(heads, v_dim, d_c, dtype=f64)
    for r in range(num_groups):
        heads_r = slice(r * per_group, (r + 1) * per_group)
        cols = slice(r * d_s, (r + 1) * d_s)
        root_k, inv_k = _block_roots(key_metric, heads_r, nope)  # [(H/g) d_nope] x 2, block-diagonal
        root_v, inv_v = _block_roots(value_metric, heads_r, v_dim)
        keys = root_k @ uk[heads_r].reshape(-1, d_c)  # [(H/g) d_nope, d_c], in the key metric
        values = root_v @ uv[heads_r].reshape(-1, d_c)  # [(H/g) d_v, d_c]
        weight_k = weight_v = 1.0
        if balance:
            weight_k = _inverse_rms_output(keys, moment)
            weight_v = _inverse_rms_output(values, moment)
        a = torch.cat([keys * weight_k, values * weight_v])  # [m, d_c], weighted A_r
        covariance = a @ moment @ a.T  # [m, m]
        rank = min(d_s, a.shape[0])
        u = torch.zeros(a.shape[0], d_s, dtype=f64)
        u[:, :rank] = descending_eigenvectors(covariance)[:, :rank]  # [m, d_s]
        projection[cols] = u.T @ a  # B_r [d_s, d_c]
        d_keys = inv_k @ u[: keys.shape[0]] / weight_k  # [(H/g) d_nope, d_s], D_r unweighted
        d_values = inv_v @ u[keys.shape[0]:] / weight_v  # [(H/g) d_v, d_s]
        new_uk[heads_r, :, cols] = d_keys.reshape(per_group, nope, d_s)
        new_uv[heads_r, :, cols] = d_values.reshape(per_group, v_dim, d_s)
    return projection, new_uk, new_uv


def _block_roots(metric: torch.Tensor | None, heads: slice, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal M_h^{1/2} and M_h^{-1/2} over ``heads`` ([n·width, n·width] each, float64);
    identities without a metric. Eigenvalues are floored at 1e-6 of each head's largest."""
    count = len(range(heads.stop)[heads])
    if metric is None:
        eye = torch.eye(count * width, dtype=torch.float64)
        return eye, eye
    roots, inverses = [], []
    for m in metric[heads].to(torch.float64):
        values, vectors = torch.linalg.eigh(0.5 * (m + m.T))
        values = values.clamp_min(1e-6 * float(values.max().clamp_min(1e-300)))
        roots.append(vectors @ torch.diag(values.sqrt()) @ vectors.T)
        inverses.append(vectors @ torch.diag(values.rsqrt()) @ vectors.T)
    return torch.block_diag(*roots), torch.block_diag(*inverses)


def _inverse_rms_output(block: torch.Tensor, moment: torch.Tensor) -> float:
    """1 / sqrt(tr(A S Aᵀ) / rows): one over the block's root-mean-square output (1 if it is zero)."""
    energy = float(torch.einsum("ic,cd,id->", block, moment, block)) / block.shape[0]
    return 1.0 / energy**0.5 if energy > 0 else 1.0
