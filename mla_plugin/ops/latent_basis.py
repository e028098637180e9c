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
