"""DeepSeek-V2 attention with the latent sharded over TP ranks (the MLA_PLUGIN_GLA layout).

Replaces vLLM's ``DeepseekV2MLAAttention`` where MLA_PLUGIN_GLA is asked for (or the
checkpoint declares the sharded layout). Unlike vLLM's head-parallel MLA, every rank
computes all heads over its own slices of the latent:

    q      = x W_Q                        all heads, replicated weights
    c      = x W_DKV  (then · R)          replicated; the whole latent on every rank
    ĉ      = c / rms(c) (global) or per slice (local); γ is folded into W_UK, W_UV
    ĉ_loc  = this rank's slices           cached with k^R: d_c * (g/tp) / g + d_R values
    o_loc  = attention over the slices    (mode: exact / partitioned / grouped)
    out    = all_reduce(W_O (W_UV,loc o_loc))   the one all-reduce o_proj needs anyway

At TP = 1 one rank holds all g slices and computes the same function.
"""

import torch
from torch import nn

from mla_plugin.gla_options import sharding_for
from mla_plugin.ops.latent_basis import fold_latent_weights
from mla_plugin.ops.sharded_latent import latent_rmsnorm
from mla_plugin.vllm.gla_backend import GLA_BACKEND_NAME, MLAPluginGLABackend, ShardRuntime


def _rope_and_scale(config, qk_rope_head_dim: int, max_position: int, scale: float):
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.model_executor.models.deepseek_v2 import yarn_get_mscale

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


class ShardedLatentDeepseekAttention(nn.Module):
    def __init__(self, vllm_config, config, hidden_size: int, num_heads: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank, kv_lora_rank: int,
                 max_position_embeddings: int = 8192, cache_config=None, quant_config=None,
                 prefix: str = "", reduce_results: bool = True, **_unused) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
        from vllm.model_executor.layers.layernorm import RMSNorm
        from vllm.model_executor.layers.linear import ReplicatedLinear

        if quant_config is not None:
            raise NotImplementedError(f"{GLA_BACKEND_NAME}: quantised checkpoints are not supported")
        tp_size = get_tensor_model_parallel_world_size()
        self.sharding = sharding_for(config, tp_size)
        self.options = self.sharding.options
        self.shard_offset = self.sharding.shard_offset(get_tensor_model_parallel_rank())
        self.tp_size = tp_size
        self.reduce_results = reduce_results  # False: the caller all-reduces o_proj's output
        self.num_heads = num_heads
        self.qk_nope_head_dim, self.qk_rope_head_dim = qk_nope_head_dim, qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.kv_lora_rank = kv_lora_rank
        self.eps = config.rms_norm_eps
        local_width = self.sharding.local_width()

        # Checkpoint names as DeepseekV2's loader expects them; all weights whole.
        self.q_proj = ReplicatedLinear(hidden_size, num_heads * self.qk_head_dim, bias=False,
                                       prefix=f"{prefix}.q_proj")
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden_size, kv_lora_rank + qk_rope_head_dim,
                                                   bias=False, prefix=f"{prefix}.kv_a_proj_with_mqa")
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, eps=config.rms_norm_eps)  # γ, folded at load
        self.kv_b_proj = ReplicatedLinear(kv_lora_rank, num_heads * (qk_nope_head_dim + v_head_dim),
                                          bias=False, prefix=f"{prefix}.kv_b_proj")
        self.o_proj = ReplicatedLinear(num_heads * v_head_dim, hidden_size, bias=False,
                                       prefix=f"{prefix}.o_proj")
        self.rotary_emb, self.scaling = _rope_and_scale(
            config, qk_rope_head_dim, max_position_embeddings, self.qk_head_dim ** -0.5)
        self.register_buffer("latent_basis", torch.eye(kv_lora_rank), persistent=False)  # R
        self.rotate_latent = False
        self.weights_prepared = False

        self.attn = _ShardedLatentMLAAttention(
            num_heads=num_heads, scale=self.scaling, qk_nope_head_dim=qk_nope_head_dim,
            qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim, q_lora_rank=None,
            kv_lora_rank=local_width, kv_b_proj=self.kv_b_proj, cache_config=cache_config,
            quant_config=None, prefix=f"{prefix}.attn", attn_backend=MLAPluginGLABackend,
            sharding=ShardRuntime(shards=self.sharding.shards, shard_offset=self.shard_offset,
                                  shards_local=self.sharding.shards_per_rank,
                                  softmax=self.options.softmax, tp_size=tp_size),
        )
        self.attn.prepare_owner_weights = self.prepare_weights

    def _local_columns(self) -> slice:
        width = self.sharding.shard_width
        return slice(self.shard_offset * width, (self.shard_offset + self.sharding.shards_per_rank) * width)

    @torch.no_grad()
    def prepare_weights(self) -> None:
        """Fold γ and the slice logit scale into W_UK/W_UV, pick the basis, keep our slices."""
        if self.weights_prepared:
            return
        self.weights_prepared = True
        heads, nope, v = self.num_heads, self.qk_nope_head_dim, self.v_head_dim
        weight = self.kv_b_proj.weight
        # W_DKV stays as loaded: the latent is rotated at run time (c' = c R) instead.
        rotation, _, w_uk, w_uv = fold_latent_weights(
            weight.detach(), self.kv_a_layernorm.weight.detach(), num_heads=heads, nope_dim=nope,
            v_dim=v, basis=self.options.basis, logit_scale=self.sharding.logit_scale)
        if self.options.basis != "identity":
            self.latent_basis.copy_(rotation.to(self.latent_basis.dtype))
            self.rotate_latent = True
        cols = self._local_columns()
        local = torch.cat([w_uk[..., cols], w_uv[..., cols]], dim=1)  # [H, d_nope + d_v, d_loc]
        local = local.reshape(heads * (nope + v), -1).to(weight.dtype)
        self.kv_b_proj.weight = nn.Parameter(local, requires_grad=False)
        self.kv_b_proj.input_size = local.shape[1]

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, llama_4_scaling=None):
        tokens = hidden_states.shape[0]
        q = self.q_proj(hidden_states)[0].view(tokens, self.num_heads, self.qk_head_dim)
        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states)[0].split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # [T, d_c], [T, d_R]
        if self.rotate_latent:
            latent = latent @ self.latent_basis.to(latent.dtype)  # c' = c R
        normed = latent_rmsnorm(latent, self.sharding.shards, self.options.rmsnorm, self.eps)
        local = normed[:, self._local_columns()].contiguous()  # [T, d_loc]
        k_pe = k_pe.unsqueeze(1)  # [T, 1, d_R]
        q[..., self.qk_nope_head_dim:], k_pe = self.rotary_emb(positions, q[..., self.qk_nope_head_dim:], k_pe)
        if llama_4_scaling is not None:
            q = q * llama_4_scaling
        out = self.attn(q, local, k_pe, output_shape=(tokens, self.num_heads * self.v_head_dim))
        out = self.o_proj(out)[0]
        if self.tp_size > 1 and self.reduce_results:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out


def _mla_attention_cls():
    from mla_plugin.vllm.compat import MLAAttention

    return MLAAttention


class _ShardedLatentMLAAttention(_mla_attention_cls()):
    """vLLM's MLA layer over this rank's slices; weights are prepared by the owner first."""

    prepare_owner_weights = None

    def process_weights_after_loading(self, act_dtype: torch.dtype):
        if self.prepare_owner_weights is not None:
            self.prepare_owner_weights()
        super().process_weights_after_loading(act_dtype)
