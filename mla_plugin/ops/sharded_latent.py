"""The sharded latent (the GLA-style TP variant): which slices a rank holds, and their RMSNorm.

Symbols as in docs/design.md (Glossary; section 4, "Sharded latent"). The normalised
latent ĉ_t (d_c values) is cut into ``num_shards`` = g equal contiguous slices
ĉ^(0) … ĉ^(g−1) of d_s = d_c / g values (slice j, 0 ≤ j < g); the absorbed query q̃_h
and the latent output ō_h are cut the same way. A rank holds ``shards_local`` consecutive
slices starting at global slice ``shard_offset``, plus the full rope key k^R (d_R values,
shared by all heads). Its cache rows are ``[ĉ_local | k^R]`` (d_loc + d_R values,
d_loc = shards_local · d_s), paged as in ``latent_cache.py``. With λ_{h,j} a per-(head,
slice) multiplier on the partial latent logit (``logit_scale``, default 1) and τ the
softmax scale:

- ``exact``: s_h,t = τ(Σ_j λ_{h,j} q̃_h^(j)·ĉ_t^(j) + q^R_h·k^R_t), the partial sums of
  all ranks combined by an all-reduce before one softmax; ō_h = Σ_t p_h,t ĉ_t^local.
  With λ = 1 this is unsharded MLA to rounding; MLA itself is one slice, exact.
- ``partitioned``: every slice j runs its own softmax over
  τ(λ_{h,j} q̃_h^(j)·ĉ_t^(j) + q^R_h·k^R_t) for every head, and fills output slice j.
- ``grouped``: heads are split into g consecutive groups; head h (group
  j = h // (H/g)) attends only over slice j, as in ``partitioned``, and fills slice j;
  its other slices are zero. A rank without slice j outputs zeros for those heads.

Outputs of the ranks are summed later (after W_UV / o_proj), so no communication is
needed except the logit all-reduce of ``exact``. ``LatentSlices`` describes one rank's
share in these terms (framework-neutral); ``paged_attention.paged_latent_attention``
computes it.

RMSNorm before the cache (weightless, γ folded elsewhere): ``global`` divides c by the
RMS over all d_c dims (exact); ``local`` by each slice's own RMS (GLA-trained models).
"""

from dataclasses import dataclass

import torch

# The one vocabulary of the options (framework-neutral, no torch).
from mla_plugin.gla_options import RMSNORM_MODES as NORM_MODES
from mla_plugin.gla_options import SOFTMAX_MODES


def check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def shard_width(d_c: int, num_shards: int) -> int:
    """d_s = d_c / num_shards, or a ValueError when it does not divide."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if d_c % num_shards:
        raise ValueError(f"latent width d_c={d_c} is not divisible by num_shards={num_shards}")
    return d_c // num_shards


def check_grouped_heads(heads: int, num_shards: int) -> None:
    if heads % num_shards:
        raise ValueError(
            f"grouped mode needs the head count ({heads}) divisible by num_shards ({num_shards})"
        )


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of every latent op: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class LatentSlices:
    """The latent slices one rank holds and how their softmax combines.

    The default is MLA: one slice, held here, exact softmax. ``logit_scale`` is
    λ as ``[H, num_shards]`` by global slice (None: all ones).
    """

    num_shards: int = 1  # g
    shard_offset: int = 0  # first global slice on this rank
    shards_local: int = 1  # slices on this rank
    softmax: str = "exact"  # exact / partitioned / grouped
    logit_scale: torch.Tensor | None = None  # [H, num_shards]

    def __post_init__(self) -> None:
        check_choice(self.softmax, SOFTMAX_MODES, "softmax mode")
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if (
            self.shards_local < 1
            or self.shard_offset < 0
            or self.shard_offset + self.shards_local > self.num_shards
        ):
            raise ValueError(
                f"shards {self.shard_offset}..{self.shard_offset + self.shards_local - 1} are not "
                f"within 0..{self.num_shards - 1} (shard_offset={self.shard_offset}, "
                f"shards_local={self.shards_local})"
            )

    @property
    def holds_all(self) -> bool:
        """True when this rank holds every slice (no all-reduce in exact mode)."""
        return self.shards_local == self.num_shards

    def check(self, heads: int, d_loc: int) -> None:
        """Raise a ValueError that says what to fix when H or d_loc do not fit these slices."""
        if d_loc % self.shards_local:
            raise ValueError(
                f"local latent width {d_loc} is not divisible by shards_local={self.shards_local} "
                f"(d_c must be divisible by num_shards={self.num_shards})"
            )
        if self.softmax == "grouped":
            check_grouped_heads(heads, self.num_shards)
        if self.logit_scale is not None and tuple(self.logit_scale.shape) != (heads, self.num_shards):
            raise ValueError(
                f"logit_scale must be [H, num_shards] = [{heads}, {self.num_shards}], "
                f"got {tuple(self.logit_scale.shape)}"
            )

    def local_logit_scale(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """λ of this rank's slices, ``[H, shards_local]`` (None when all ones)."""
        if self.logit_scale is None:
            return None
        local = slice(self.shard_offset, self.shard_offset + self.shards_local)
        return self.logit_scale[:, local].to(device=device, dtype=dtype)

    def stream_heads(self, heads: int, device: torch.device) -> torch.Tensor:
        """Heads that read each local slice, ``[shards_local, H_k]`` (all heads unless grouped)."""
        if self.softmax != "grouped":
            return torch.arange(heads, device=device).expand(self.shards_local, heads)
        per_group = heads // self.num_shards
        groups = torch.arange(self.shard_offset, self.shard_offset + self.shards_local, device=device)
        return groups.unsqueeze(1) * per_group + torch.arange(per_group, device=device)  # [S, H/g]


# MLA: one slice, held here, exact softmax.
ONE_SLICE = LatentSlices()


def slices_for_plan(plan) -> LatentSlices:
    """The slices a rank of a sharding plan (``gla_options.ShardingPlan``) attends over.

    λ is folded into W_UK by the layers, so there is no logit_scale here. With the heads
    split over ranks, the rank's H_loc heads and its g_loc slices are a grouped model of their
    own (local head i is in local group i // (H_loc / g_loc), which reads local slice i of it)."""
    if plan.heads_split:
        return LatentSlices(num_shards=plan.shards_local, shard_offset=0, shards_local=plan.shards_local,
                            softmax="grouped")
    return LatentSlices(num_shards=plan.shards, shard_offset=plan.shard_offset, shards_local=plan.shards_local,
                        softmax=plan.softmax)


def latent_rmsnorm(
    c: torch.Tensor,  # [..., d_c]
    num_shards: int,
    mode: str,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weightless RMSNorm of the latent, ``global`` (over all d_c) or ``local`` (per slice).

    Computed in float32 (float64 for float64 input), returned in ``c``'s dtype.
    """
    check_choice(mode, NORM_MODES, "norm mode")
    d_c = c.shape[-1]
    d_s = shard_width(d_c, num_shards)
    x = c.to(compute_dtype_for(c.dtype))
    if mode == "global":
        out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        shards = x.reshape(*x.shape[:-1], num_shards, d_s)  # [..., g, d_s]
        out = (shards * torch.rsqrt(shards.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)
    return out.to(c.dtype)
