"""DeepSeek-V2 attention with the latent sharded over TP ranks, for SGLang (``mla_plugin_gla``).

Replaces SGLang's ``DeepseekV2AttentionMLA`` where ``--attention-backend mla_plugin_gla``
is asked for (gla_registration.py). The math is vLLM's sharded-latent module's
(``mla_plugin/vllm/gla_attention.py``; docs/design.md sections 4-5, symbols as in its
Glossary) and shares its pieces: the plan (``gla_options.plan_for``), the latent RMSNorm
(``ops.latent_rmsnorm``), the weight fold (``sharded_weights.fold_rank_up_projection``) and
the attention (``ops.paged_latent_attention``, called by ``gla_backend``):

    q        = W_Q x                      all heads, replicated weights (grouped: this rank's heads)
               (low rank, q_lora_rank = d_q: q = W_UQ rmsnorm(W_DQ x); W_DQ and its norm replicated,
               W_UQ = q_b_proj split by heads like W_Q)
    c        = W_DKV x                    replicated; the whole latent on every rank
    ĉ        = norm(Qᵀ c)                 global RMSNorm or per slice (local); γ folded into W_UK, W_UV
    ĉ^loc    = this rank's slices         written to the pool with k^R: d_loc + d_R values per token
                                          (latent_projection: z^loc = P_loc ĉ instead)
    ō_h^loc  = attention over the slices  (exact / partitioned / grouped; exact all-reduces logits)
    out      = W_O [W_UV,h^loc ō_h^loc]_h  a partial sum: SGLang's layer communicator all-reduces it

Grouped softmax splits the heads with the latent (``plan.heads_split``), as the vLLM module
does: a rank holds the H_loc = H / n_TP heads of its groups, W_Q is SGLang's
``ColumnParallelLinear``, W_O its ``RowParallelLinear`` (the partial sum as above), and
kv_b_proj only those heads' rows and this rank's columns, narrowed from the checkpoint tensor
by a weight loader of ours (``sharded_weights.rank_up_projection_block``).

The low-rank query (DeepSeek-V2, V3/R1, Kimi-K2: ``q_lora_rank`` set; ``gla_options.QueryProjection``)
is built with SGLang's own names and loading: ``fused_qkv_a_proj_with_mqa`` (rows
[q_a_proj; kv_a_proj_with_mqa], [d_q + d_c + d_R, d_model], replicated; SGLang's DeepSeek loader
concatenates the two checkpoint tensors into it), ``q_a_layernorm`` (replicated) and
``q_b_proj``, split by heads in grouped mode exactly as ``q_proj`` is. ``prepare_qkv_latent``
(the hook SGLang's decoder layer is built with) gives the fused rows, as SGLang's module does.

The attention layer (``attn_mqa``, a ``RadixAttention``) has the rank's heads (H, or H_loc),
head width d_loc + d_R and value width d_loc; SGLang's MLA pool for this model is sized to
that width per rank (gla_pool.py), so each rank's pool holds d_loc + d_R values per token.
"""

import torch
from torch import nn

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.gla_options import QueryProjection, ShardingPlan, plan_for, query_projection_of
from mla_plugin.ops import latent_rmsnorm
from mla_plugin.sharded_weights import (
    fold_rank_up_projection,
    narrowed_weight_loader,
    rank_latent_projection_block,
    rank_up_projection_block,
    rank_up_projection_shape,
)
from mla_plugin.sglang import gla_compat as sg

GLA_BACKEND = GLA_BACKEND_NAME.lower()  # "mla_plugin_gla", the SGLang --attention-backend name



class ShardedLatentDeepseekAttention(nn.Module):
    """``DeepseekV2AttentionMLA``'s constructor, call and checkpoint names; the latent sharded over ranks."""

    def __init__(self, config, hidden_size: int, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int,
                 v_head_dim: int, q_lora_rank, kv_lora_rank: int, rope_theta: float = 10000,
                 rope_scaling=None, max_position_embeddings: int = 8192, quant_config=None,
                 reduce_results: bool = True, layer_id: int | None = None, prefix: str = "", **_unused) -> None:
        super().__init__()
        if quant_config is not None:
            raise NotImplementedError(f"{GLA_BACKEND}: quantised checkpoints are not supported")
        self.plan: ShardingPlan = plan_for(config, tp_size=sg.get_tensor_model_parallel_world_size(),
                                           tp_rank=sg.get_tensor_model_parallel_rank())
        if kv_lora_rank != self.plan.latent_dim:
            raise ValueError(f"kv_lora_rank {kv_lora_rank} disagrees with the config's {self.plan.latent_dim}")
        self.query: QueryProjection = query_projection_of(config)
        if q_lora_rank != self.query.low_rank:
            raise ValueError(f"q_lora_rank {q_lora_rank} disagrees with the config's {self.query.low_rank}")
        self.layer_id = layer_id
        self.reduce_results = reduce_results  # False under DeepseekV2DecoderLayer: its communicator all-reduces
        self.num_heads = num_heads
        self.local_heads = self.plan.local_heads  # H_loc: H / n_TP in grouped mode, else H
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.q_lora_rank, self.kv_lora_rank = self.query.low_rank, kv_lora_rank
        self.eps = config.rms_norm_eps

        self._build_query_heads_and_output(hidden_size, prefix)
        self._build_down_projections(hidden_size, prefix)
        self._build_up_projections(prefix)
        self._build_rope(config, rope_theta, rope_scaling, max_position_embeddings)
        self._build_attention(layer_id, prefix)

    # -- construction (checkpoint names as DeepseekV2's loader expects them) ---------------

    def _build_query_heads_and_output(self, hidden_size: int, prefix: str) -> None:
        """The per-head query weight (q_proj, or q_b_proj when low rank) and ``o_proj``. Heads split
        (grouped): the query by heads, W_O by its head inputs (a partial sum, reduced in forward or
        by the layer communicator); otherwise both whole on every rank."""
        per_head_name = self.query.per_head_weight  # "q_proj" or "q_b_proj"
        per_head_in = self.query.per_head_input_dim(hidden_size)  # d_model or d_q
        heads_out, o_in = self.num_heads * self.qk_head_dim, self.num_heads * self.v_head_dim
        if self.plan.heads_split:
            per_head = sg.ColumnParallelLinear(per_head_in, heads_out, bias=False, prefix=f"{prefix}.{per_head_name}")
            self.o_proj = sg.RowParallelLinear(o_in, hidden_size, bias=False, input_is_parallel=True,
                                               reduce_results=False, prefix=f"{prefix}.o_proj")
        else:
            per_head = sg.ReplicatedLinear(per_head_in, heads_out, bias=False, prefix=f"{prefix}.{per_head_name}")
            self.o_proj = sg.ReplicatedLinear(o_in, hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        setattr(self, per_head_name, per_head)  # [H_loc (d_nope + d_R), d_model or d_q]

    def _build_down_projections(self, hidden_size: int, prefix: str) -> None:
        """W_DKV and W_KR (replicated; fused with W_DQ for a low-rank query), the query's norm and γ."""
        latent_rows = self.plan.latent_dim + self.qk_rope_head_dim  # d_c + d_R
        if self.query.is_low_rank:
            # SGLang's loader stacks q_a_proj and kv_a_proj_with_mqa into this one (replicated) weight.
            self.fused_qkv_a_proj_with_mqa = sg.ReplicatedLinear(
                hidden_size, self.query.low_rank + latent_rows, bias=False,
                prefix=f"{prefix}.fused_qkv_a_proj_with_mqa")  # [d_q + d_c + d_R, d_model]
            self.q_a_layernorm = sg.RMSNorm(self.query.low_rank, eps=self.eps)
        else:
            self.kv_a_proj_with_mqa = sg.ReplicatedLinear(hidden_size, latent_rows, bias=False,
                                                          prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = sg.RMSNorm(self.plan.latent_dim, eps=self.eps)  # γ, folded into W_UK / W_UV

    def _build_up_projections(self, prefix: str) -> None:
        """This rank's block of kv_b_proj and (group-pca checkpoints) its rows of P, each narrowed
        from the checkpoint tensor by a weight loader of ours."""
        plan, nope_dim, v_dim = self.plan, self.qk_nope_head_dim, self.v_head_dim
        # This rank's block of kv_b_proj only: [H_loc (d_nope + d_v), d_c or d_loc].
        kv_b_rows, kv_b_cols = rank_up_projection_shape(plan, nope_dim=nope_dim, v_dim=v_dim)
        self.kv_b_proj = sg.ReplicatedLinear(kv_b_cols, kv_b_rows, bias=False, prefix=f"{prefix}.kv_b_proj")
        self.kv_b_proj.weight.weight_loader = narrowed_weight_loader(
            lambda w: rank_up_projection_block(plan, w, nope_dim=nope_dim, v_dim=v_dim), GLA_BACKEND)
        if plan.latent_projection:  # this rank's rows of P: [d_loc, d_c]
            self.latent_projection = sg.ReplicatedLinear(plan.latent_dim, plan.local_latent_dim, bias=False,
                                                         prefix=f"{prefix}.latent_projection")
            self.latent_projection.weight.weight_loader = narrowed_weight_loader(
                lambda w: rank_latent_projection_block(plan, w), GLA_BACKEND)
        else:
            self.latent_projection = None

    def _build_rope(self, config, rope_theta: float, rope_scaling, max_position_embeddings: int) -> None:
        """SGLang's DeepSeek rope, the same construction as its MLA module (forward uses its
        plain-torch forward), and the softmax scale with yarn's mscale."""
        if rope_scaling:
            rope_scaling["rope_type"] = "deepseek_yarn"
        self.rotary_emb = sg.get_rope(self.qk_rope_head_dim, rotary_dim=self.qk_rope_head_dim,
                                      max_position=max_position_embeddings, base=rope_theta,
                                      rope_scaling=rope_scaling,
                                      is_neox_style=not getattr(config, "rope_interleave", True))
        self.scaling = self.qk_head_dim ** -0.5
        if rope_scaling and rope_scaling.get("apply_yarn_scaling", True):
            self.scaling = sg.compute_mla_mscale_scaling(rope_scaling, self.scaling)

    def _build_attention(self, layer_id: int | None, prefix: str) -> None:
        """The rank's RadixAttention and the state the weight fold fills in."""
        latent_dim, local_dim = self.plan.latent_dim, self.plan.local_latent_dim  # d_c, d_loc
        # The rank's heads; each query row [q̃^loc | q^R], each cache row [ĉ^loc | k^R].
        self.attn_mqa = sg.RadixAttention(self.local_heads, local_dim + self.qk_rope_head_dim, self.scaling,
                                          num_kv_heads=1, layer_id=layer_id, v_head_dim=local_dim,
                                          prefix=f"{prefix}.attn_mqa")
        self.attn_mqa.mla_plugin_plan = self.plan  # read by gla_backend
        self.register_buffer("latent_basis", torch.eye(latent_dim), persistent=False)  # Q
        self.rotate_latent = False
        self.w_uk: torch.Tensor | None = None  # [H_loc, d_nope, d_loc], after the fold
        self.w_uv: torch.Tensor | None = None  # [H_loc, d_v, d_loc]
        # Set by SGLang's DeepSeek post_load_weights (it splits any kv_b_proj it finds); unused here.
        self.w_kc = self.w_vc = None
        self.w_scale = None

    # -- what SGLang's decoder layer calls besides forward ---------------------------------

    def prepare_qkv_latent(self, hidden_states, forward_batch):
        """Low rank only (as SGLang's): the fused rows ``[T, d_q + d_c + d_R]`` = [W_DQ x | W_DKV x]."""
        if not self.query.is_low_rank:
            raise ValueError(f"{GLA_BACKEND}: prepare_qkv_latent is for q_lora_rank models; this layer has q_proj")
        return self.fused_qkv_a_proj_with_mqa(hidden_states)[0]

    def query_and_latent(self, hidden_states, forward_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-head queries ``[T, H_loc (d_nope + d_R)]`` and ``[c | k^R]`` rows ``[T, d_c + d_R]``."""
        if self.query.is_low_rank:
            q_low, latent_rope = self.prepare_qkv_latent(hidden_states, forward_batch).split(
                [self.query.low_rank, self.plan.latent_dim + self.qk_rope_head_dim], dim=-1)  # [T, d_q], [T, d_c + d_R]
            return self.q_b_proj(self.q_a_layernorm(q_low.contiguous()))[0], latent_rope
        return self.q_proj(hidden_states)[0], self.kv_a_proj_with_mqa(hidden_states)[0]

    def maybe_use_decode_attn_tp(self, forward_batch):
        import contextlib

        return contextlib.nullcontext()

    # -- weights ---------------------------------------------------------------------------

    @torch.no_grad()
    def fold_weights(self) -> None:
        """Fold γ, Q and λ into this rank's W_UK / W_UV once, after SGLang has loaded the checkpoint."""
        if self.w_uk is not None:
            return
        weight = self.kv_b_proj.weight.detach()  # this rank's block, narrowed by the loader
        if self.plan.latent_projection and not bool((self.kv_a_layernorm.weight == 1).all()):
            raise ValueError(f"{GLA_BACKEND}: a latent_projection checkpoint has γ folded into kv_b_proj and "
                             "kv_a_layernorm.weight all ones; this one's is not (convert it again)")
        folded = fold_rank_up_projection(self.plan, weight, self.kv_a_layernorm.weight.detach(),
                                         nope_dim=self.qk_nope_head_dim, v_dim=self.v_head_dim)
        if folded.rotation is not None:
            self.latent_basis.copy_(folded.rotation.to(self.latent_basis.dtype))
            self.rotate_latent = True
        self.w_uk, self.w_uv = folded.w_uk, folded.w_uv
        # kv_b_proj lives on only as this rank's folded slices.
        self.kv_b_proj.weight = nn.Parameter(weight.new_empty(0), requires_grad=False)
        self.w_kc = self.w_vc = None

    def local_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """What this rank caches from the latent ``[T, d_c]``: ``[T, d_loc]``."""
        if self.rotate_latent:
            latent = latent @ self.latent_basis.to(latent.dtype)  # rows: c' = c @ Q
        normed = latent_rmsnorm(latent, self.plan.shards, self.plan.rmsnorm, self.eps)  # [T, d_c]
        if self.latent_projection is not None:  # z^loc = P_loc ĉ, rows: ĉ @ P_locᵀ (the norm is global)
            return nn.functional.linear(normed, self.latent_projection.weight.to(normed.dtype))  # [T, d_loc]
        return normed[:, self.plan.local_columns]  # [T, d_loc]

    # -- forward ---------------------------------------------------------------------------

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch, zero_allocator=None,
                input_on_attn_tp_slices: bool = False, llama_4_scaling=None, prev_topk_indices=None):
        tokens = hidden_states.shape[0]
        if tokens == 0:
            return hidden_states
        self.fold_weights()
        heads, local_dim = self.local_heads, self.plan.local_latent_dim  # H_loc, d_loc
        q, latent_rope = self.query_and_latent(hidden_states, forward_batch)
        q = q.view(tokens, heads, self.qk_head_dim)  # [T, H_loc, d_nope + d_R]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)  # [T, H, d_nope], [T, H, d_R]
        latent, k_pe = latent_rope.split([self.plan.latent_dim, self.qk_rope_head_dim], dim=-1)  # [T, d_c], [T, d_R]
        local = self.local_latent(latent)  # [T, d_loc]
        q_pe, k_pe = self.rotary_emb.forward_native(positions, q_pe.contiguous(),
                                                    k_pe.contiguous().unsqueeze(1))  # [T, H, d_R], [T, 1, d_R]
        q_latent = torch.einsum("thn,hnc->thc", q_nope, self.w_uk.to(q_nope.dtype))  # [T, H, d_loc]
        query = torch.cat([q_latent, q_pe.view(tokens, heads, -1)], dim=-1)  # [T, H, d_loc + d_R]
        if llama_4_scaling is not None:
            query = query * llama_4_scaling
        key = torch.cat([local, k_pe.view(tokens, -1)], dim=-1).unsqueeze(1)  # [T, 1, d_loc + d_R]
        value = local.unsqueeze(1)  # [T, 1, d_loc]
        latent_out = self.attn_mqa(query, key, value, forward_batch)  # [T, H * d_loc]
        latent_out = latent_out.view(tokens, heads, local_dim)
        out = torch.einsum("thc,hvc->thv", latent_out, self.w_uv.to(latent_out.dtype))  # [T, H, d_v]
        out = self.o_proj(out.reshape(tokens, heads * self.v_head_dim))[0]  # [T, hidden]: this rank's part
        # (row-parallel o_proj is built with reduce_results=False: one all-reduce either way)
        if self.reduce_results and self.plan.tp_size > 1:
            out = sg.tensor_model_parallel_all_reduce(out)
        return out
