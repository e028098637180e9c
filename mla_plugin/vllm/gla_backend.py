"""The MLA_PLUGIN_GLA backend: attention over this rank's slices of a sharded latent.

Each rank caches ``[ĉ_local | k^R]`` (d_c * shards_per_rank / g + d_R values per token)
and computes every head over its slices. Prefill and decode both run the absorbed form
over the paged cache (``mla_plugin.ops.sharded_latent``), because exact and grouped
softmax couple the slices in ways the expanded per-rank prefill cannot express.
Layers of this backend are built by ``mla_plugin.vllm.gla_attention``; the softmax mode
and the slices this rank holds reach the impl through ``ShardRuntime``.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from mla_plugin.ops.sharded_latent import paged_sharded_latent_attention
from mla_plugin.vllm.compat import AttentionLayer, MLACommonMetadataBuilder
from mla_plugin.vllm.mla_backend import (
    MLAPluginBackend,
    MLAPluginImpl,
    MLAPluginMetadata,
    note_decode_call,
)

GLA_BACKEND_NAME = "MLA_PLUGIN_GLA"


@dataclass
class ShardedLatentMetadata(MLAPluginMetadata):
    # Every request's cached length (queries included) and block table, prefills too.
    seq_lens_all: torch.Tensor | None = None
    block_table_all: torch.Tensor | None = None


class ShardedLatentMetadataBuilder(MLACommonMetadataBuilder[ShardedLatentMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device,
                         metadata_cls=ShardedLatentMetadata)

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        metadata.seq_lens_all = common_attn_metadata.seq_lens[:num_reqs]
        metadata.block_table_all = common_attn_metadata.block_table_tensor[:num_reqs]
        return metadata


@dataclass(frozen=True)
class ShardRuntime:
    """What the impl needs to know about the slices this rank holds."""

    shards: int  # g
    shard_offset: int  # first global slice on this rank
    shards_local: int  # slices on this rank
    softmax: str  # exact / partitioned / grouped
    tp_size: int


class MLAPluginGLABackend(MLAPluginBackend):
    @staticmethod
    def get_name() -> str:
        return GLA_BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["ShardedLatentImpl"]:
        return ShardedLatentImpl

    @staticmethod
    def get_builder_cls() -> type[ShardedLatentMetadataBuilder]:
        return ShardedLatentMetadataBuilder


class ShardedLatentImpl(MLAPluginImpl):
    can_return_lse_for_decode: bool = False
    backend_name: ClassVar[str] = GLA_BACKEND_NAME

    def __init__(self, *args, sharding: ShardRuntime | None = None, **kwargs) -> None:
        if sharding is None:
            raise ValueError(
                f"{GLA_BACKEND_NAME} layers are built by mla_plugin's sharded-latent attention "
                "module (DeepSeek-V2-style models); this layer was not."
            )
        super().__init__(*args, **kwargs)
        self.sharding = sharding
        self._up_proj: tuple[torch.Tensor, torch.Tensor] | None = None

    def _all_reduce(self):
        if self.sharding.tp_size == 1:
            return None
        from vllm.distributed import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce

    def _attend(self, q_latent, q_rope, cache, query_start_loc, seq_lens, block_table):
        return paged_sharded_latent_attention(
            q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, self.scale,
            num_shards=self.sharding.shards, shard_offset=self.sharding.shard_offset,
            shards_local=self.sharding.shards_local, softmax_mode=self.sharding.softmax,
            all_reduce=self._all_reduce(),
        )

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Keep W_UK [H, d_nope, d_loc] and W_UV [H, d_v, d_loc] of this rank's slices.

        MLAAttention calls this after the owning module has prepared kv_b_proj (γ,
        basis and logit scale folded in, our slices kept) and before it may free it.
        """
        weight = self.kv_b_proj.weight  # [H * (d_nope + d_v), d_loc]
        per_head = weight.detach().view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        w_uk, w_uv = per_head.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        self._up_proj = (w_uk.contiguous(), w_uv.contiguous())

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._up_proj is None:
            raise RuntimeError(f"{GLA_BACKEND_NAME}: weights used before process_weights_after_loading")
        return self._up_proj

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata: ShardedLatentMetadata,
                    layer: AttentionLayer):
        if isinstance(q, tuple):
            q_latent, q_rope = q  # [B, H, d_loc], [B, H, d_R]
        else:
            q_latent, q_rope = q.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        note_decode_call(self.backend_name, kv_c_and_k_pe_cache,
                         f"d_loc={self.kv_lora_rank} d_R={self.qk_rope_head_dim} "
                         f"shards={self.sharding.shard_offset}+{self.sharding.shards_local}/"
                         f"{self.sharding.shards} softmax={self.sharding.softmax}")
        batch = attn_metadata.num_decodes
        starts = torch.arange(batch + 1, device=q_latent.device)
        out = self._attend(q_latent, q_rope, kv_c_and_k_pe_cache, starts,
                           attn_metadata.seq_lens_all[:batch], attn_metadata.block_table_all[:batch])
        return out, None

    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache,
                    attn_metadata: ShardedLatentMetadata, k_scale, output, output_scale=None):
        if output_scale is not None:
            raise NotImplementedError(f"{GLA_BACKEND_NAME}: fused output quantisation")
        first, last = attn_metadata.num_decodes, attn_metadata.num_reqs
        tokens = q.shape[0]
        w_uk, w_uv = self._weights()
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # [T, H, d_loc]
        starts = attn_metadata.query_start_loc[first : last + 1]
        starts = starts - starts[0]
        latent_out = self._attend(q_latent, q_rope, kv_c_and_k_pe_cache, starts,
                                  attn_metadata.seq_lens_all[first:last],
                                  attn_metadata.block_table_all[first:last])  # [T, H, d_loc]
        out = torch.einsum("thc,hvc->thv", latent_out, w_uv)  # [T, H, d_v]
        output.view(tokens, self.num_heads, self.v_head_dim).copy_(out)
