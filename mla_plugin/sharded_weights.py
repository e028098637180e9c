"""One rank's sharded-latent up-projection, folded once from the checkpoint's weights.

Framework-neutral (torch and ``mla_plugin.ops``, no vLLM): the vLLM layer calls it after
loading, and any other integration can. The loader narrows the checkpoint's tensors to
this rank's blocks first (``rank_up_projection_block``: in grouped mode only its heads'
rows and, without a basis rotation, only its slices' columns). What the attention reads
afterwards is exactly this: W_UK and W_UV per (local) head for this rank's slices, with γ,
the basis rotation Q and the slice logit scale λ folded in, and Q itself for rotating the
latent (None for the identity).
Symbols as in docs/design.md (Glossary; sections 4 and 5).
"""

from dataclasses import dataclass

import torch

from mla_plugin.gla_options import ShardingPlan
from mla_plugin.ops.latent_basis import fold_latent_weights


@dataclass(frozen=True)
class RankUpProjection:
    rotation: torch.Tensor | None  # [d_c, d_c] Q (float64); None for the identity basis
    w_uk: torch.Tensor  # [H_loc, d_nope, d_loc] this rank's heads and slices, λ folded in
    w_uv: torch.Tensor  # [H_loc, d_v, d_loc]


def rank_up_projection_shape(plan: ShardingPlan, *, nope_dim: int, v_dim: int) -> tuple[int, int]:
    """kv_b_proj's shape on this rank: its heads' rows, the columns it loads (plan.up_projection_columns)."""
    cols = plan.up_projection_columns
    return plan.local_heads * (nope_dim + v_dim), cols.stop - cols.start


def rank_up_projection_block(
    plan: ShardingPlan,
    kv_b: torch.Tensor,  # [H * (d_nope + d_v), d_c]  the checkpoint's whole kv_b_proj
    *,
    nope_dim: int,
    v_dim: int,
) -> torch.Tensor:
    """This rank's block of the checkpoint's kv_b_proj, a view (a loader copies it without
    materialising the whole matrix anywhere else): rows of heads
    head_offset … head_offset + H_loc − 1, columns plan.up_projection_columns."""
    if kv_b.shape != (plan.num_heads * (nope_dim + v_dim), plan.latent_dim):
        raise ValueError(
            f"kv_b_proj weight {tuple(kv_b.shape)} does not match the plan: expected "
            f"[{plan.num_heads} heads * ({nope_dim} + {v_dim}), d_c {plan.latent_dim}]"
        )
    per_head = nope_dim + v_dim
    rows = kv_b.narrow(0, plan.head_offset * per_head, plan.local_heads * per_head)
    cols = plan.up_projection_columns
    return rows.narrow(1, cols.start, cols.stop - cols.start)  # [H_loc (d_nope + d_v), d_c or d_loc]


def fold_rank_up_projection(
    plan: ShardingPlan,
    kv_b: torch.Tensor,  # [H_loc * (d_nope + d_v), d_c or d_loc]  kv_b_proj as loaded on this rank
    gamma: torch.Tensor,  # [d_c]                                  kv_a_layernorm weight
    *,
    nope_dim: int,
    v_dim: int,
) -> RankUpProjection:
    """Fold γ, Q and λ into W_UK / W_UV (float64), keep this rank's columns, cast to kv_b's dtype."""
    expected = rank_up_projection_shape(plan, nope_dim=nope_dim, v_dim=v_dim)
    if tuple(kv_b.shape) != expected:
        raise ValueError(
            f"kv_b_proj weight {tuple(kv_b.shape)} does not match the plan: expected {list(expected)} "
            f"({plan.local_heads} heads * ({nope_dim} + {v_dim}), the loaded latent columns)"
        )
    loaded = plan.up_projection_columns
    whole = loaded.stop - loaded.start == plan.latent_dim
    rotation, _, w_uk, w_uv = fold_latent_weights(
        kv_b, gamma[loaded], num_heads=plan.local_heads, nope_dim=nope_dim, v_dim=v_dim,
        basis=plan.basis if whole else "identity",
        logit_scale=plan.logit_scale)  # [d, d], -, [H_loc, d_nope, d], [H_loc, d_v, d]; d = d_c or d_loc
    cols = plan.local_columns if whole else slice(None)
    return RankUpProjection(
        rotation=None if plan.basis == "identity" else rotation,
        w_uk=w_uk[..., cols].to(kv_b.dtype).contiguous(),  # [H_loc, d_nope, d_loc]
        w_uv=w_uv[..., cols].to(kv_b.dtype).contiguous(),  # [H_loc, d_v, d_loc]
    )


def rank_latent_projection_block(plan: ShardingPlan, projection: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the per-group latent projection P = [B_0; …; B_{g−1}] ([d_c, d_c]):
    the rows of its slices, [d_loc, d_c] (a view)."""
    if projection.shape != (plan.latent_dim, plan.latent_dim):
        raise ValueError(f"latent_projection weight {tuple(projection.shape)} is not "
                         f"[d_c, d_c] = [{plan.latent_dim}, {plan.latent_dim}]")
    cols = plan.local_columns
    return projection.narrow(0, cols.start, cols.stop - cols.start)  # [d_loc, d_c]


def narrowed_weight_loader(block_of, owner: str):
    """A weight loader (vLLM's and SGLang's ``param.weight_loader(param, loaded)`` convention)
    that copies ``block_of(checkpoint tensor)``, this rank's block (a view), into the parameter:
    the whole tensor is never copied into the rank. ``owner`` names the backend in the error."""

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor) -> None:
        block = block_of(loaded_weight)
        if block.shape != param.shape:
            raise ValueError(f"{owner}: checkpoint block {tuple(block.shape)} does not fit the "
                             f"parameter {tuple(param.shape)}")
        param.data.copy_(block)

    return weight_loader


def stacked_rows_weight_loader(row_sizes: tuple[int, ...], owner: str):
    """A weight loader for a parameter that stacks several checkpoint tensors by rows, e.g. a
    fused [q_a_proj; kv_a_proj_with_mqa] ([d_q + d_c + d_R, d_model]): the loader calls it once
    per tensor with the tensor's index as the shard id (vLLM's ``weight_loader(param, loaded,
    shard_id)`` convention for stacked parameters), and it copies the tensor into its rows.
    Every rank loads every shard whole (replicated). ``owner`` names the backend in the error."""
    offsets = [sum(row_sizes[:i]) for i in range(len(row_sizes))]

    def weight_loader(param: torch.nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if not isinstance(shard_id, int) or isinstance(shard_id, bool) or not 0 <= shard_id < len(row_sizes):
            raise ValueError(f"{owner}: a stacked parameter of {len(row_sizes)} tensors got shard id {shard_id!r} "
                             "(the checkpoint tensor was not mapped to one of its parts)")
        rows = param.data.narrow(0, offsets[shard_id], row_sizes[shard_id])  # [rows of this part, d_in]
        if loaded_weight.shape != rows.shape:
            raise ValueError(f"{owner}: checkpoint tensor {tuple(loaded_weight.shape)} does not fit part "
                             f"{shard_id} {tuple(rows.shape)} of the stacked parameter {tuple(param.shape)}")
        rows.copy_(loaded_weight)

    return weight_loader
