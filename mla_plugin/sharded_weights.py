"""One rank's sharded-latent up-projection, folded once from the checkpoint's weights.

Framework-neutral (torch and ``mla_plugin.ops``, no vLLM): the vLLM layer calls it after
loading, and any other integration can. What the attention reads afterwards is exactly
this: W_UK and W_UV per head for this rank's slices, with γ, the basis rotation Q and the
slice logit scale λ folded in, and Q itself for rotating the latent (None for the identity).
Symbols as in docs/design.md (Glossary; sections 4 and 5).
"""

from dataclasses import dataclass

import torch

from mla_plugin.gla_options import ShardingPlan
from mla_plugin.ops.latent_basis import fold_latent_weights


@dataclass(frozen=True)
class RankUpProjection:
    rotation: torch.Tensor | None  # [d_c, d_c] Q (float64); None for the identity basis
    w_uk: torch.Tensor  # [H, d_nope, d_loc] this rank's slices, λ folded in
    w_uv: torch.Tensor  # [H, d_v, d_loc]


def fold_rank_up_projection(
    plan: ShardingPlan,
    kv_b: torch.Tensor,  # [H * (d_nope + d_v), d_c]  kv_b_proj weight as loaded
    gamma: torch.Tensor,  # [d_c]                      kv_a_layernorm weight
    *,
    nope_dim: int,
    v_dim: int,
) -> RankUpProjection:
    """Fold γ, Q and λ into W_UK / W_UV (float64), keep this rank's columns, cast to kv_b's dtype."""
    if kv_b.shape != (plan.num_heads * (nope_dim + v_dim), plan.latent_dim):
        raise ValueError(
            f"kv_b_proj weight {tuple(kv_b.shape)} does not match the plan: expected "
            f"[{plan.num_heads} heads * ({nope_dim} + {v_dim}), d_c {plan.latent_dim}]"
        )
    rotation, _, w_uk, w_uv = fold_latent_weights(
        kv_b, gamma, num_heads=plan.num_heads, nope_dim=nope_dim, v_dim=v_dim, basis=plan.basis,
        logit_scale=plan.logit_scale)  # [d_c, d_c], -, [H, d_nope, d_c], [H, d_v, d_c]
    cols = plan.local_columns
    return RankUpProjection(
        rotation=None if plan.basis == "identity" else rotation,
        w_uk=w_uk[..., cols].to(kv_b.dtype).contiguous(),  # [H, d_nope, d_loc]
        w_uv=w_uv[..., cols].to(kv_b.dtype).contiguous(),  # [H, d_v, d_loc]
    )
