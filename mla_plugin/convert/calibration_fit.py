"""Calibration math for mla-to-gla: activation PCA and per-(head, slice) scales.

Plain torch on tensors, any float dtype; no transformers, no vLLM. The activations come
from ``calibration_capture.py``. Symbols as in docs/design.md (Glossary; sections 5,
"Bases", and 6, "Calibration of slice scales"); slices j = 0 … g−1.

- ``pca-act``: the basis rotation Q whose columns are the eigenvectors, by descending
  eigenvalue, of the second moment ``E[ĉ ĉᵀ]`` of the weightless normalised latent
  ``ĉ = c / rms(c)`` (the tensor that is cached and sliced once γ is folded into the
  up-projections). Energy concentrates in the leading slices.
- calibrated scales: under the approximate softmax modes slice j of head h computes
  ``softmax_t(τ(λ_{h,j} q̃_h^(j)·ĉ_t^(j) + q^R_h·k^R_t))`` and its output is multiplied
  by ``μ_{h,j}``:

      ô_h = Σ_j μ_{h,j} W_UV,h^(j) Σ_t p^(j)_{h,t} ĉ_t^(j)

  λ (initialised at the uncalibrated scale, g for partitioned) and optionally μ
  (initialised at 1) are fitted to minimise, per head, the relative squared error of ô_h
  against the exact (full-softmax, global-RMSNorm) head output ``W_UV,h Σ_t p_{h,t} ĉ_t``
  on the captured activations. Both fold into the weights (λ into the columns of W_UK,h
  for slice j, μ into those of W_UV,h), so serving costs nothing extra. After ``group-pca``
  (grouped softmax, per-group projections; ops/latent_basis.group_subspace_projection) the
  runtime side reads z = P ĉ through its own up-projections (``calibrate_layer``'s
  ``group_subspace``) while the target stays the exact MLA output.

Shape letters: N calibration windows, T keys (tokens) per window, P query rows per window
(at the sampled ``positions``), H heads, g slices.
"""

import math
from dataclasses import dataclass, field

import torch

from mla_plugin.ops.pca import descending_eigenvectors
from mla_plugin.ops.sharded_latent import latent_rmsnorm

DEFAULT_QUERIES_PER_WINDOW = 64  # query rows kept per window for the fit (keys: all)
DEFAULT_FIT_STEPS = 60
DEFAULT_FIT_LR = 0.1


# --------------------------------------------------------------------------------------
# What the fit reads


@dataclass
class LayerCapture:
    """One layer's activations on the calibration windows: what the fit reads."""

    latent: torch.Tensor  # [N, T, d_c]  raw c (input of kv_a_layernorm), float32
    k_rope: torch.Tensor  # [N, T, d_R]  post-RoPE
    q_nope: torch.Tensor  # [N, P, H, d_nope]  at ``positions``
    q_rope: torch.Tensor  # [N, P, H, d_R]     post-RoPE, at ``positions``
    scale: float  # τ (softmax scale, yarn mscale included)
    eps: float  # kv_a_layernorm epsilon


def query_positions(windows: int, window: int, per_window: int | None, seed: int = 0) -> torch.Tensor:
    """[N, P] sorted distinct positions per window (all of them when ``per_window`` is None or >= window)."""
    if per_window is None or per_window >= window:
        return torch.arange(window).expand(windows, window).clone()
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.randperm(window, generator=gen)[:per_window].sort().values for _ in range(windows)]
    return torch.stack(picks)


# --------------------------------------------------------------------------------------
# Activation PCA


def latent_second_moment(latent: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``Σ_t ĉ_t ĉ_tᵀ`` (float64, [d_c, d_c]) of ``ĉ = c / rms(c)`` over all rows of ``latent`` [..., d_c]."""
    c = latent.reshape(-1, latent.shape[-1]).to(torch.float64)
    normed = c * torch.rsqrt(c.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed.T @ normed


def activation_pca_basis(second_moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q [d_c, d_c] (float64): eigenvectors of the second moment, descending, sign-fixed.

    Used like the other bases: the cached latent becomes ``ĉ_rows @ Q``, so slice 0
    holds the directions with the most energy.
    """
    if second_moment.dim() != 2 or second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError(f"second moment must be square, got {tuple(second_moment.shape)}")
    return descending_eigenvectors(second_moment)


# --------------------------------------------------------------------------------------
# Scales: the objective, the fit, the fold


def active_slices(heads: int, num_shards: int, softmax_mode: str, device=None) -> torch.Tensor:
    """[H, g] bool: which slices each head reads (all for partitioned, its group's for grouped)."""
    if softmax_mode == "partitioned":
        return torch.ones(heads, num_shards, dtype=torch.bool, device=device)
    if softmax_mode == "grouped":
        if heads % num_shards:
            raise ValueError(f"grouped softmax needs {heads} heads divisible by {num_shards} shards")
        group = torch.arange(heads, device=device) // (heads // num_shards)
        return group.unsqueeze(1) == torch.arange(num_shards, device=device).unsqueeze(0)
    raise ValueError(f"only partitioned and grouped softmax have slice scales to fit, got {softmax_mode!r}")


@dataclass
class ShardFitProblem:
    """Everything the objective needs, precomputed once. Sizes: g slices, N windows,
    H heads, P query rows per window, T keys per window, d_s = d_c / g, d_v value width."""

    partial: torch.Tensor  # [g, N, H, P, T]  τ q̃_h^(j)·ĉ_t^(j) (runtime-normalised latent), 0 where masked
    rope: torch.Tensor  # [N, H, P, T]  τ q^R_h·k^R_t, -inf where masked (causal)
    latent: torch.Tensor  # [g, N, 1, T, d_s]  the runtime's latent slices ĉ^(j)
    w_uv: torch.Tensor  # [g, H, d_v, d_s]  W_UV,h^(j)
    target: torch.Tensor  # [N, H, P, d_v]  exact head outputs
    active: torch.Tensor  # [H, g] bool

    @property
    def num_shards(self) -> int:
        return self.partial.shape[0]


def build_fit_problem(
    q_latent: torch.Tensor,  # [N, P, H, d_c]  absorbed queries q̃ (basis applied, no slice scale)
    q_rope: torch.Tensor,  # [N, P, H, d_R]  post-RoPE
    positions: torch.Tensor,  # [N, P] long   window positions of the query rows
    latent: torch.Tensor,  # [N, T, d_c]    exact ĉ (global RMSNorm, basis applied)
    k_rope: torch.Tensor,  # [N, T, d_R]    post-RoPE
    w_uv: torch.Tensor,  # [H, d_v, d_c]  value up-projection (basis applied)
    scale: float,
    *,
    num_shards: int,
    softmax_mode: str = "partitioned",
    runtime_latent: torch.Tensor | None = None,  # [N, T, d_c] what the sharded runtime caches (default: latent)
    runtime_q_latent: torch.Tensor | None = None,  # [N, P, H, d_c] the runtime's absorbed queries (default: q_latent)
    runtime_w_uv: torch.Tensor | None = None,  # [H, d_v, d_c] the runtime's value up-projection (default: w_uv)
) -> ShardFitProblem:
    """The fixed tensors of the fit, computed in the inputs' dtype.

    The target is the exact head output from ``q_latent``, ``latent`` and ``w_uv``; the
    sliced outputs read the ``runtime_*`` tensors (a per-group latent projection caches
    z = P ĉ and reads it through its own up-projections, so all three differ there)."""
    n, q_rows, heads, d_c = q_latent.shape
    t_len = latent.shape[1]
    if d_c % num_shards:
        raise ValueError(f"d_c {d_c} is not divisible by {num_shards} shards")
    d_s = d_c // num_shards
    active = active_slices(heads, num_shards, softmax_mode, q_latent.device)
    runtime = latent if runtime_latent is None else runtime_latent
    allowed = torch.arange(t_len, device=q_latent.device).view(1, 1, t_len) <= positions.unsqueeze(-1)  # [N, P, T]
    allowed = allowed.unsqueeze(1)  # [N, 1, P, T]

    rope = scale * torch.einsum("nqhr,ntr->nhqt", q_rope, k_rope)
    exact = scale * torch.einsum("nqhc,ntc->nhqt", q_latent, latent) + rope
    probs = torch.softmax(exact.masked_fill(~allowed, float("-inf")), dim=-1)  # [N, H, P, T]
    target = torch.einsum("nhqc,hvc->nhqv", probs @ latent.unsqueeze(1), w_uv)  # [N, H, P, d_v]

    q_runtime = q_latent if runtime_q_latent is None else runtime_q_latent
    w_uv_runtime = w_uv if runtime_w_uv is None else runtime_w_uv
    q_sl = q_runtime.reshape(n, q_rows, heads, num_shards, d_s)
    r_sl = runtime.reshape(n, t_len, num_shards, d_s)
    partial = scale * torch.einsum("nqhgd,ntgd->gnhqt", q_sl, r_sl)
    partial = partial.masked_fill(~allowed.unsqueeze(0), 0.0)
    return ShardFitProblem(partial=partial, rope=rope.masked_fill(~allowed, float("-inf")),
                           latent=r_sl.permute(2, 0, 1, 3).unsqueeze(2).contiguous(),
                           w_uv=w_uv_runtime.reshape(heads, -1, num_shards, d_s).permute(2, 0, 1, 3).contiguous(),
                           target=target, active=active)


def sliced_head_outputs(problem: ShardFitProblem, logit_scale: torch.Tensor,
                        output_scale: torch.Tensor | None = None) -> torch.Tensor:
    """ô_h = Σ_j μ_{h,j} W_UV,h^(j) Σ_t p^(j)_{h,t} ĉ_t^(j) for every query row: [N, H, P, d_v].

    ``logit_scale`` λ and ``output_scale`` μ are [H, g]; slices a head does not read
    (grouped) contribute nothing.
    """
    lam = logit_scale.to(problem.partial.dtype).T.reshape(problem.num_shards, 1, -1, 1, 1)  # [g, 1, H, 1, 1]
    weight = problem.active.to(problem.partial.dtype)
    if output_scale is not None:
        weight = weight * output_scale.to(problem.partial.dtype)
    weight = weight.T.reshape(problem.num_shards, 1, -1, 1, 1)
    probs = torch.softmax(problem.partial * lam + problem.rope.unsqueeze(0), dim=-1)  # [g, N, H, P, T]
    mixed = probs @ problem.latent  # [g, N, H, P, d_s]
    return (torch.einsum("gnhqs,ghvs->gnhqv", mixed, problem.w_uv) * weight).sum(dim=0)


def relative_head_errors(problem: ShardFitProblem, logit_scale: torch.Tensor,
                         output_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per head ``Σ‖ô_h − o_h‖² / Σ‖o_h‖²`` over all query rows: [H]."""
    diff = sliced_head_outputs(problem, logit_scale, output_scale) - problem.target
    return diff.pow(2).sum(dim=(0, 2, 3)) / problem.target.pow(2).sum(dim=(0, 2, 3)).clamp_min(1e-30)


@dataclass
class ShardScaleFit:
    logit_scale: torch.Tensor  # [H, g] λ
    output_scale: torch.Tensor  # [H, g] μ (ones unless fitted)
    error_before: torch.Tensor  # [H] relative error at the initial scales
    error_after: torch.Tensor  # [H] relative error at the fitted scales (<= before, per head)
    steps: int = 0
    history: list[float] = field(default_factory=list)


def fit_shard_scales(
    problem: ShardFitProblem,
    *,
    init_logit_scale: float | torch.Tensor,
    fit_output: bool = False,
    steps: int = DEFAULT_FIT_STEPS,
    lr: float = DEFAULT_FIT_LR,
) -> ShardScaleFit:
    """Fit λ (and μ with ``fit_output``) by Adam on their logs, full batch, cosine-decayed lr.

    Heads are independent (each has its own scales and error), so the objective is the
    sum of the per-head relative errors and each head keeps its best scales seen
    (including the initial ones): ``error_after <= error_before`` head by head.
    """
    heads, g = problem.active.shape
    dtype = problem.partial.dtype
    device = problem.partial.device
    init = torch.as_tensor(init_logit_scale, dtype=dtype, device=device).expand(heads, g).clone()
    if not bool((init > 0).all()):
        raise ValueError("initial logit scales must be positive")
    log_lam = init.log().requires_grad_(True)
    log_mu = torch.zeros(heads, g, dtype=dtype, device=device, requires_grad=fit_output)
    params = [log_lam] + ([log_mu] if fit_output else [])
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(steps, 1))))

    with torch.no_grad():
        error_before = relative_head_errors(problem, init, None)
    best_err = error_before.clone()
    best_lam, best_mu = init.clone(), torch.ones(heads, g, dtype=dtype, device=device)
    history = [float(error_before.mean())]
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        lam, mu = log_lam.exp(), log_mu.exp()
        err = relative_head_errors(problem, lam, mu)  # [H], at the current (pre-step) params
        with torch.no_grad():
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lam = torch.where(better.unsqueeze(1), lam, best_lam)
            best_mu = torch.where(better.unsqueeze(1), mu, best_mu)
        history.append(float(err.detach().mean()))
        err.sum().backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # the last step's parameters too
        lam, mu = log_lam.exp(), log_mu.exp()
        err = relative_head_errors(problem, lam, mu)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lam = torch.where(better.unsqueeze(1), lam, best_lam)
        best_mu = torch.where(better.unsqueeze(1), mu, best_mu)
    return ShardScaleFit(logit_scale=best_lam.detach(), output_scale=best_mu.detach(),
                         error_before=error_before, error_after=best_err.detach(), steps=steps,
                         history=history)


def fold_shard_scales(
    w_uk: torch.Tensor,  # [H, d_nope, d_c]
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    logit_scale: torch.Tensor,  # [H, g]
    output_scale: torch.Tensor | None = None,  # [H, g]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_UK,h^(j) λ_{h,j}, W_UV,h^(j) μ_{h,j})``: the scales folded into the slice columns.

    q̃_h^(j) = W_UK,h^(j)ᵀ q^C_h is then λ times larger (its partial logit too), and the
    slice's value output μ times larger: the runtime needs logit scale 1.
    """
    heads, _, d_c = w_uk.shape
    g = logit_scale.shape[-1]
    if logit_scale.shape != (heads, g) or d_c % g or (output_scale is not None and output_scale.shape != (heads, g)):
        raise ValueError(f"scales {tuple(logit_scale.shape)} do not fit {heads} heads and d_c {d_c}")
    d_s = d_c // g
    lam = logit_scale.to(w_uk.dtype).repeat_interleave(d_s, dim=1).unsqueeze(1)  # [H, 1, d_c]
    new_uk = w_uk * lam
    if output_scale is None:
        return new_uk, w_uv
    mu = output_scale.to(w_uv.dtype).repeat_interleave(d_s, dim=1).unsqueeze(1)
    return new_uk, w_uv * mu


# --------------------------------------------------------------------------------------
# One layer, end to end


def calibrate_layer(
    capture: LayerCapture,
    positions: torch.Tensor,  # [N, P]
    w_uk: torch.Tensor,  # [H, d_nope, d_c]  γ and the basis folded in, no slice scale
    w_uv: torch.Tensor,  # [H, d_v, d_c]
    rotation: torch.Tensor,  # [d_c, d_c]  the basis rotation Q (the cache holds rows ĉ @ Q)
    *,
    num_shards: int,
    softmax_mode: str,
    rmsnorm: str,
    init_logit_scale: float,
    fit_output: bool,
    steps: int = DEFAULT_FIT_STEPS,
    lr: float = DEFAULT_FIT_LR,
    device: str | torch.device | None = None,
    group_subspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> ShardScaleFit:
    """Fit one layer's slice scales on its captured activations (float32).

    ``group_subspace`` = (P [d_c, d_c], W_UK' [H, d_nope, d_c], W_UV' [H, d_v, d_c]): the
    runtime caches z = P ĉ (global RMSNorm) and reads it through W_UK', W_UV'
    (ops/latent_basis.group_subspace_projection); ``w_uk``, ``w_uv`` and ``rotation`` then
    describe the exact model the target comes from.
    Runs on ``device`` (default: CUDA when available, else CPU); returns CPU tensors.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def f32(t):
        return t.to(device=device, dtype=torch.float32)

    c = f32(capture.latent) @ f32(rotation)  # [N, T, d_c]: rotated raw latent (rms unchanged)
    exact = latent_rmsnorm(c, 1, "global", capture.eps)
    runtime = latent_rmsnorm(c, num_shards, rmsnorm, capture.eps)
    q_latent = torch.einsum("nqhd,hdc->nqhc", f32(capture.q_nope), f32(w_uk))
    runtime_q_latent = runtime_w_uv = None
    if group_subspace is not None:
        projection, sub_uk, sub_uv = group_subspace
        runtime = exact @ f32(projection).T  # [N, T, d_c]: rows z = P ĉ
        runtime_q_latent = torch.einsum("nqhd,hdc->nqhc", f32(capture.q_nope), f32(sub_uk))
        runtime_w_uv = f32(sub_uv)
    problem = build_fit_problem(q_latent, f32(capture.q_rope), positions.to(device), exact, f32(capture.k_rope),
                                f32(w_uv), capture.scale, num_shards=num_shards, softmax_mode=softmax_mode,
                                runtime_latent=runtime, runtime_q_latent=runtime_q_latent,
                                runtime_w_uv=runtime_w_uv)
    fit = fit_shard_scales(problem, init_logit_scale=init_logit_scale, fit_output=fit_output, steps=steps, lr=lr)
    for name in ("logit_scale", "output_scale", "error_before", "error_after"):
        setattr(fit, name, getattr(fit, name).cpu())
    return fit
