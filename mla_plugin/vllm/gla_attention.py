"""DeepSeek-V2 attention with the latent sharded over TP ranks (the MLA_PLUGIN_GLA layout).

Replaces vLLM's ``DeepseekV2MLAAttention`` where MLA_PLUGIN_GLA is asked for (or the
checkpoint declares the sharded layout). Unlike vLLM's head-parallel MLA, every rank
computes all heads over its own slices of the latent (docs/design.md, "Sharded latent";
symbols as in its Glossary, weights W x with nn.Linear's [out, in] shape):

    q        = W_Q x                      all heads, replicated weights; a low-rank query
                                          (q_lora_rank) is W_UQ rmsnorm(W_DQ x), W_DQ and its
                                          norm replicated, W_UQ (q_b_proj) held like W_Q
    c        = W_DKV x                    replicated; the whole latent on every rank
    ĉ        = norm(Qᵀ c)                 rows: c @ Q; global RMSNorm or per slice (local);
                                          γ is folded into W_UK, W_UV
    ĉ^loc    = this rank's slices         cached with k^R: d_loc + d_R values, d_loc = d_c · g_loc / g
    ō_h^loc  = attention over the slices  (mode: exact / partitioned / grouped)
    out      = all_reduce(W_O [W_UV,h^loc ō_h^loc]_h)   the one all-reduce o_proj needs anyway

At n_TP = 1 one rank holds all g slices and computes the same function.

Grouped softmax splits the heads with the latent (``plan.heads_split``; GLA's own layout):
a rank holds only the H_loc = H / n_TP heads of its g_loc groups. W_Q (or W_UQ) is
column-parallel and W_O row-parallel as in vLLM's head-parallel TP (o_proj's all-reduce is the
only one), and kv_b_proj holds only those heads' rows and (identity basis) this rank's latent
columns, narrowed from the checkpoint tensor by its weight loader; W_DKV, W_KR and γ (and a
low-rank query's W_DQ and its norm) stay replicated. With ``latent_projection`` (a group-pca
checkpoint) the rank caches z^loc = P_loc ĉ, P_loc its rows of P = [B_0; …; B_{g−1}]
(weightless global RMSNorm first), instead of ĉ^loc.

One :class:`~mla_plugin.gla_options.ShardingPlan`, built here from the config, is shared
by the layer (:class:`ShardedLatentMLAAttention`: latent preparation, weight folding)
and the impl (``gla_backend.ShardedLatentImpl``: attention over the slices). d_c is
``plan.latent_dim``; the latent part of this rank's cache rows is ``plan.local_latent_dim``.
"""

import torch
from torch import nn

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.gla_options import ShardingPlan, plan_for, query_projection_of
from mla_plugin.ops import latent_rmsnorm
from mla_plugin.sharded_weights import (
    fold_rank_up_projection,
    narrowed_weight_loader,
    rank_latent_projection_block,
    rank_up_projection_block,
    rank_up_projection_shape,
    stacked_rows_weight_loader,
)
from mla_plugin.vllm.compat import (
    ColumnParallelLinear,
    MLAAttention,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    get_rope,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    replace_parameter,
    set_default_quant_scales,
    tensor_model_parallel_all_reduce,
    yarn_get_mscale,
)
from mla_plugin.vllm.gla_backend import MLAPluginGLABackend


def _rope_and_scale(config, qk_rope_head_dim: int, max_position: int, scale: float):
    rope = dict(config.rope_parameters)
    if rope.get("rope_type", "default") != "default":
        rope["rope_type"] = ("deepseek_llama_scaling" if rope.get("attention_factor") == 1.0
                             else "deepseek_yarn")
    rotary = get_rope(qk_rope_head_dim, max_position=max_position, rope_parameters=rope,
                      is_neox_style=False)
    if rope.get("rope_type") == "deepseek_yarn":
        mscale = yarn_get_mscale(rope["factor"], float(rope.get("mscale_all_dim", False)))
        scale = scale * mscale * mscale
    return rotary, scale



PROJECTIONS = ("q_proj", "fused_qkv_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
               "kv_b_proj", "o_proj", "latent_projection")


def attention_parameter_count(layer: nn.Module) -> int:
    """Parameters one rank loads for one attention layer (its projections and norms, before the fold)."""
    modules = [getattr(layer, name) for name in PROJECTIONS if getattr(layer, name, None) is not None]
    return sum(p.numel() for m in modules for p in m.parameters())


class ShardedLatentDeepseekAttention(nn.Module):
    """DeepseekV2MLAAttention's interface and checkpoint names; the latent sharded over ranks."""

    def __init__(self, vllm_config, config, hidden_size: int, num_heads: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank, kv_lora_rank: int,
                 max_position_embeddings: int = 8192, cache_config=None, quant_config=None,
                 prefix: str = "", reduce_results: bool = True, **_unused) -> None:
        super().__init__()
        if quant_config is not None:
            raise NotImplementedError(f"{GLA_BACKEND_NAME}: quantised checkpoints are not supported")
        self.plan = plan_for(config, tp_size=get_tensor_model_parallel_world_size(),
                             tp_rank=get_tensor_model_parallel_rank())
        if kv_lora_rank != self.plan.latent_dim:
            raise ValueError(f"kv_lora_rank {kv_lora_rank} disagrees with the config's {self.plan.latent_dim}")
        query = query_projection_of(config)
        if q_lora_rank != query.low_rank:
            raise ValueError(f"q_lora_rank {q_lora_rank} disagrees with the config's {query.low_rank}")
        self.reduce_results = reduce_results  # False: the caller all-reduces o_proj's output
        self.num_heads = num_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.q_lora_rank = q_lora_rank  # d_q, or None for a full-rank W_Q
        self.local_heads = self.plan.local_heads  # H_loc: H / n_TP in grouped mode, else H

        query_heads = self._build_query_heads_and_output(query, hidden_size, prefix)
        self._build_down_projections(query, query_heads, hidden_size, config.rms_norm_eps, prefix)
        self._build_up_projections(prefix)
        self.rotary_emb, self.scaling = _rope_and_scale(
            config, qk_rope_head_dim, max_position_embeddings, self.qk_head_dim ** -0.5)
        self.attn = ShardedLatentMLAAttention(
            plan=self.plan, latent_norm=self.kv_a_layernorm, eps=config.rms_norm_eps,
            num_heads=self.local_heads, scale=self.scaling, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, kv_b_proj=self.kv_b_proj,
            cache_config=cache_config, prefix=f"{prefix}.attn", latent_projection=self.latent_projection,
        )
        # Evidence for tests and logs: what this rank loads for the layer (the decode trace).
        self.attn.impl.rank_attention_params = attention_parameter_count(self)

    def _build_query_heads_and_output(self, query, hidden_size: int, prefix: str) -> nn.Module:
        """``o_proj``, and the per-head query projection (returned: the caller names it q_proj or
        q_b_proj). Checkpoint names as DeepseekV2's loader expects them. Heads split (grouped): the
        per-head query rows by heads, W_O by its head inputs, as vLLM's own TP; otherwise both whole
        on every rank."""
        heads_out, o_in = self.num_heads * self.qk_head_dim, self.num_heads * self.v_head_dim
        query_name = query.per_head_weight
        query_in = query.per_head_input_dim(hidden_size)
        if self.plan.heads_split:
            query_heads = ColumnParallelLinear(query_in, heads_out, bias=False, quant_config=None,
                                               prefix=f"{prefix}.{query_name}")
            self.o_proj = RowParallelLinear(o_in, hidden_size, bias=False, input_is_parallel=True,
                                            reduce_results=self.reduce_results, quant_config=None,
                                            prefix=f"{prefix}.o_proj")
        else:
            query_heads = ReplicatedLinear(query_in, heads_out, bias=False, prefix=f"{prefix}.{query_name}")
            self.o_proj = ReplicatedLinear(o_in, hidden_size, bias=False, prefix=f"{prefix}.o_proj")
        return query_heads

    def _build_down_projections(self, query, query_heads: nn.Module, hidden_size: int, eps: float,
                                prefix: str) -> None:
        """W_DKV and W_KR (replicated; with a low-rank query fused with W_DQ), the query's norm
        and the latent's γ; sets q_proj / q_b_proj to ``query_heads`` and the other to None."""
        latent_dim = self.plan.latent_dim  # d_c
        latent_rows = latent_dim + self.qk_rope_head_dim  # W_DKV and W_KR: [d_c + d_R, d_model]
        if query.is_low_rank:
            # As vLLM's DeepSeek-V2 layer: W_DQ and W_DKV/W_KR in one replicated matmul, rows
            # [q_a_proj; kv_a_proj_with_mqa]; vLLM's loader maps the two checkpoint tensors onto it
            # with shard ids 0 and 1 (touch point "DeepSeek-V2 fused q_a/kv_a loading").
            self.fused_qkv_a_proj = ReplicatedLinear(hidden_size, self.q_lora_rank + latent_rows, bias=False,
                                                     prefix=f"{prefix}.fused_qkv_a_proj")
            self.fused_qkv_a_proj.weight.weight_loader = stacked_rows_weight_loader(
                (self.q_lora_rank, latent_rows), GLA_BACKEND_NAME)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=eps)
            self.q_proj, self.q_b_proj, self.kv_a_proj_with_mqa = None, query_heads, None
        else:
            self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, latent_rows, bias=False,
                                                       prefix=f"{prefix}.kv_a_proj_with_mqa")
            self.q_proj, self.q_b_proj = query_heads, None
            self.fused_qkv_a_proj = self.q_a_layernorm = None
        self.kv_a_layernorm = RMSNorm(latent_dim, eps=eps)  # γ, folded at load

    def _build_up_projections(self, prefix: str) -> None:
        """This rank's block of kv_b_proj and (group-pca checkpoints) its rows of P, each narrowed
        from the checkpoint tensor by its weight loader."""
        plan, nope_dim, v_dim = self.plan, self.qk_nope_head_dim, self.v_head_dim
        # This rank's block of kv_b_proj only: [H_loc (d_nope + d_v), d_c or d_loc].
        kv_b_rows, kv_b_cols = rank_up_projection_shape(plan, nope_dim=nope_dim, v_dim=v_dim)
        self.kv_b_proj = ReplicatedLinear(kv_b_cols, kv_b_rows, bias=False, prefix=f"{prefix}.kv_b_proj")
        self.kv_b_proj.weight.weight_loader = narrowed_weight_loader(
            lambda w: rank_up_projection_block(plan, w, nope_dim=nope_dim, v_dim=v_dim), GLA_BACKEND_NAME)
        if plan.latent_projection:  # this rank's rows of P: [d_loc, d_c]
            self.latent_projection = ReplicatedLinear(plan.latent_dim, plan.local_latent_dim, bias=False,
                                                      prefix=f"{prefix}.latent_projection")
            self.latent_projection.weight.weight_loader = narrowed_weight_loader(
                lambda w: rank_latent_projection_block(plan, w), GLA_BACKEND_NAME)
        else:
            self.latent_projection = None

    def _query_and_latent(self, hidden_states: torch.Tensor):
        """q [T, H_loc, d_nope + d_R], the latent c [T, d_c] and the rope key [T, d_R]."""
        tokens = hidden_states.shape[0]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)[0]  # [T, H_loc (d_nope + d_R)]
            latent, k_pe = self.kv_a_proj_with_mqa(hidden_states)[0].split(
                [self.plan.latent_dim, self.qk_rope_head_dim], dim=-1)  # [T, d_c], [T, d_R]
        else:
            q_low, latent, k_pe = self.fused_qkv_a_proj(hidden_states)[0].split(
                [self.q_lora_rank, self.plan.latent_dim, self.qk_rope_head_dim],
                dim=-1)  # [T, d_q], [T, d_c], [T, d_R]
            q = self.q_b_proj(self.q_a_layernorm(q_low))[0]  # [T, H_loc (d_nope + d_R)]
        return q.view(tokens, self.local_heads, self.qk_head_dim), latent, k_pe

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, llama_4_scaling=None):
        tokens = hidden_states.shape[0]
        q, latent, k_pe = self._query_and_latent(hidden_states)  # [T, H_loc, d_qk], [T, d_c], [T, d_R]
        local = self.attn.local_latent(latent)  # [T, d_loc]
        k_pe = k_pe.unsqueeze(1)  # [T, 1, d_R]
        q[..., self.qk_nope_head_dim:], k_pe = self.rotary_emb(positions, q[..., self.qk_nope_head_dim:], k_pe)
        if llama_4_scaling is not None:
            q = q * llama_4_scaling
        out = self.attn(q, local, k_pe, output_shape=(tokens, self.local_heads * self.v_head_dim))
        out = self.o_proj(out)[0]  # row-parallel (heads split): all-reduced there unless the caller does
        if self.plan.tp_size > 1 and self.reduce_results and not self.plan.heads_split:
            out = tensor_model_parallel_all_reduce(out)
        return out


class ShardedLatentMLAAttention(MLAAttention):
    """vLLM's MLA layer over this rank's slices of the latent.

    It owns everything about the sharded latent between the projections: the basis
    rotation Q, the RMSNorm mode and the slicing (``local_latent``), and, once vLLM has
    loaded the weights, the one fold of γ, Q and λ into this rank's W_UK / W_UV, which it gives
    to the impl and to vLLM's absorbed decode (``process_weights_after_loading``).
    """

    def __init__(self, *, plan: ShardingPlan, latent_norm: nn.Module, eps: float,
                 latent_projection: nn.Module | None = None, **mla_args) -> None:
        # The plan reaches the impl through MLAAttention's extra impl arguments
        # (touch point "MLA layer"); vLLM's kv_lora_rank is the cached latent width.
        super().__init__(q_lora_rank=None, kv_lora_rank=plan.local_latent_dim, quant_config=None,
                         attn_backend=MLAPluginGLABackend, plan=plan, **mla_args)
        self.plan = plan
        self.latent_norm = latent_norm  # shared with the owner (checkpoint name kv_a_layernorm)
        # This rank's rows of P (owner's checkpoint name latent_projection), or None. In a tuple:
        # the owner registers it; a second registration would count its parameters twice.
        self._latent_projection = (latent_projection,)
        self.eps = eps
        self.register_buffer("latent_basis", torch.eye(plan.latent_dim), persistent=False)  # Q
        self.rotate_latent = False
        self.weights_folded = False

    def local_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """What this rank caches from the latent ``[T, d_c]``: ``[T, d_loc]``."""
        if self.rotate_latent:
            latent = latent @ self.latent_basis.to(latent.dtype)  # rows: c' = c @ Q
        normed = latent_rmsnorm(latent, self.plan.shards, self.plan.rmsnorm, self.eps)  # [T, d_c]
        projection = self._latent_projection[0]
        if projection is not None:  # z^loc = P_loc ĉ, rows: ĉ @ P_locᵀ (the norm is global)
            # Through the module, in the model's dtype: vLLM's CPU linear may repack its weight.
            return projection(normed.to(latent.dtype))[0]  # [T, d_loc]
        return normed[:, self.plan.local_columns].contiguous()  # [T, d_loc]

    @torch.no_grad()
    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Fold the loaded weights once; replaces vLLM's split of kv_b_proj (touch point
        "MLA absorbed weights": vLLM's decode reads W_UK_T and W_UV)."""
        if self.weights_folded:
            return
        self.weights_folded = True
        if self.plan.latent_projection and not bool((self.latent_norm.weight == 1).all()):
            raise ValueError(f"{GLA_BACKEND_NAME}: a latent_projection checkpoint has γ folded into kv_b_proj "
                             "and kv_a_layernorm.weight all ones; this one's is not (convert it again)")
        folded = fold_rank_up_projection(
            self.plan, self.kv_b_proj.weight.detach(), self.latent_norm.weight.detach(),
            nope_dim=self.qk_nope_head_dim, v_dim=self.v_head_dim)
        if folded.rotation is not None:
            self.latent_basis.copy_(folded.rotation.to(self.latent_basis.dtype))
            self.rotate_latent = True
        # kv_b_proj is consumed: it lives on only as this rank's folded slices.
        self.kv_b_proj.weight = nn.Parameter(self.kv_b_proj.weight.new_empty(0), requires_grad=False)
        self.impl.use_up_projection(folded.w_uk, folded.w_uv)
        # vLLM's layouts: W_UK_T [H, d_nope, d_loc] (= ours), W_UV [H, d_loc, d_v].
        replace_parameter(self, "W_UK_T", folded.w_uk.to(act_dtype), prefer_copy=True)
        replace_parameter(self, "W_UV", folded.w_uv.to(act_dtype).transpose(1, 2), prefer_copy=True)
        set_default_quant_scales(self, register_buffer=False)  # unquantised, as vLLM does
