"""The MLA_PLUGIN_GLA backend: attention over this rank's slices of a sharded latent.

Each rank caches ``[ĉ_local | k^R]`` (d_loc + d_R values per token, d_loc = d_c · g_loc / g)
and computes its heads over its slices: all H heads in the exact and partitioned modes; in
the grouped mode only the H_loc = H / n_TP heads of its own groups (the heads are split with
the latent, so the rank is a whole grouped model of g_loc groups and needs no communication
in attention). Prefill and decode both run the absorbed form
over the paged cache (``mla_plugin.ops.sharded_latent``), because exact and grouped
softmax couple the slices in ways the expanded per-rank prefill cannot express.
Layers of this backend are built by ``mla_plugin.vllm.gla_attention``, which hands the
impl the sharding plan (``plan=``, through vLLM's MLA layer) and, after loading, this
rank's folded W_UK / W_UV (``use_up_projection``).

Names: vLLM's ``kv_lora_rank`` on this impl is the width of the latent part of a cache
row, that is this rank's ``local_latent_dim`` (d_loc = d_c · g_loc / g), not d_c; our code
says ``self.local_latent_dim`` (= ``self.plan.local_latent_dim``).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.gla_options import ShardingPlan
from mla_plugin.ops import paged_latent_attention
from mla_plugin.ops.kernel_choice import kernel_for
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE
from mla_plugin.ops.sharded_latent import slices_for_plan
from mla_plugin.vllm.compat import AttentionLayer
from mla_plugin.vllm.mla_backend import (
    DECODE_ROWS,
    MLAPluginBackend,
    MLAPluginImpl,
    MLAPluginMetadata,
    MLAPluginMetadataBuilder,
    note_decode_call,
    note_prefill_rows,
    note_query_rows,
)

@dataclass
class ShardedLatentMetadata(MLAPluginMetadata):
    # Every request's cached length (queries included) and block table, prefills too.
    seq_lens_all: torch.Tensor | None = None
    block_table_all: torch.Tensor | None = None


class ShardedLatentMetadataBuilder(MLAPluginMetadataBuilder):
    """Also VARLEN (MLAPluginMetadataBuilder.query_len_support): every softmax mode's seam takes
    causal multi-row queries, so verify rows run forward_mqa."""

    metadata_cls: ClassVar[type] = ShardedLatentMetadata

    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        num_reqs = common_attn_metadata.num_reqs
        metadata.seq_lens_all = common_attn_metadata.seq_lens[:num_reqs]
        metadata.block_table_all = common_attn_metadata.block_table_tensor[:num_reqs]
        return metadata


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

    def __init__(self, *args, plan: ShardingPlan | None = None, **kwargs) -> None:
        if plan is None:
            raise ValueError(
                f"{GLA_BACKEND_NAME} layers are built by mla_plugin's sharded-latent attention "
                "module (DeepSeek-V2-style models); this layer was not."
            )
        super().__init__(*args, **kwargs)
        if self.kv_lora_rank != plan.local_latent_dim:
            raise ValueError(f"{GLA_BACKEND_NAME}: the layer's cache latent width {self.kv_lora_rank} is not "
                             f"the plan's local_latent_dim {plan.local_latent_dim}")
        self.plan = plan
        self.local_latent_dim = plan.local_latent_dim  # d_loc: latent values per cache row on this rank
        if self.num_heads != plan.local_heads:
            raise ValueError(f"{GLA_BACKEND_NAME}: the layer has {self.num_heads} heads; the plan gives this "
                             f"rank {plan.local_heads}")
        self.slices = slices_for_plan(plan)  # the slices this rank holds, for the ops seam
        self.rank_attention_params: int | None = None  # set by the layer: what this rank loaded
        self._up_proj: tuple[torch.Tensor, torch.Tensor] | None = None

    def _all_reduce(self):
        if self.slices.holds_all:  # one rank, or split heads: no slice of another rank is needed
            return None
        from mla_plugin.vllm.compat import tensor_model_parallel_all_reduce

        return tensor_model_parallel_all_reduce

    def _attend(self, q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, *,
                max_query_len: int, max_seq_len: int, k_scale: torch.Tensor):
        """The ops seam over this rank's slices; the bounds are host ints from the metadata.
        An fp8 cache holds values / k_scale (σ); prefill reads it too (absorbed over the cache)."""
        return paged_latent_attention(
            q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, self.scale,
            slices=self.slices, all_reduce=self._all_reduce(),
            max_query_len=max_query_len, max_seq_len=max_seq_len,
            cache_scale=k_scale if cache.dtype == FP8_CACHE_DTYPE else None,
        )

    def use_up_projection(self, w_uk: torch.Tensor, w_uv: torch.Tensor) -> None:
        """This rank's folded W_UK [H, d_nope, d_loc] and W_UV [H, d_v, d_loc] (sharded_weights.py)."""
        expected = (self.num_heads, self.local_latent_dim)
        if (w_uk.shape[0], w_uk.shape[-1]) != expected or (w_uv.shape[0], w_uv.shape[-1]) != expected:
            raise ValueError(f"{GLA_BACKEND_NAME}: up-projections {tuple(w_uk.shape)} / {tuple(w_uv.shape)} "
                             f"are not [H={expected[0]}, d, d_loc={expected[1]}]")
        self._up_proj = (w_uk, w_uv)

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Nothing to do: the layer folds the weights once and hands them over (use_up_projection)."""

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._up_proj is None:
            raise RuntimeError(f"{GLA_BACKEND_NAME}: weights used before the layer folded them "
                               "(process_weights_after_loading of the sharded-latent layer)")
        return self._up_proj

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata: ShardedLatentMetadata,
                    layer: AttentionLayer):
        if isinstance(q, tuple):
            q_latent, q_rope = q  # [B, H, d_loc], [B, H, d_R]
        else:
            q_latent, q_rope = q.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        note_decode_call(self.backend_name, kv_c_and_k_pe_cache,
                         lambda: f"d_loc={self.kv_lora_rank} d_R={self.qk_rope_head_dim} "
                         f"shards={self.plan.shard_offset}+{self.plan.shards_local}/"
                         f"{self.plan.shards} softmax={self.plan.softmax} "
                         f"heads={self.plan.head_offset}+{self.num_heads}/{self.plan.num_heads} "
                         f"attn_params={self.rank_attention_params} "
                         f"kernel={kernel_for(q_latent.device, q_latent.dtype)}")
        batch = attn_metadata.num_decodes
        # Decodes come first, 1 to decode.max_query_len causal rows each (VARLEN: verify steps).
        max_query_len = attn_metadata.decode.max_query_len
        note_query_rows(DECODE_ROWS, "decode", self.backend_name, batch, attn_metadata.num_decode_tokens,
                        max_query_len, layer_name=getattr(layer, "layer_name", None))
        out = self._attend(q_latent, q_rope, kv_c_and_k_pe_cache, attn_metadata.query_start_loc[: batch + 1],
                           attn_metadata.seq_lens_all[:batch], attn_metadata.block_table_all[:batch],
                           max_query_len=max_query_len, max_seq_len=attn_metadata.max_seq_len,
                           k_scale=layer._k_scale)
        return out, None

    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache,
                    attn_metadata: ShardedLatentMetadata, k_scale, output, output_scale=None):
        if output_scale is not None:
            raise NotImplementedError(f"{GLA_BACKEND_NAME}: fused output quantisation")
        note_prefill_rows(self.backend_name, q, attn_metadata)
        first, last = attn_metadata.num_decodes, attn_metadata.num_reqs
        tokens = q.shape[0]
        w_uk, w_uv = self._weights()
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_latent = torch.einsum("thn,hnc->thc", q_nope, w_uk)  # [T, H, d_loc]
        starts = attn_metadata.query_start_loc[first : last + 1]
        starts = starts - starts[0]
        latent_out = self._attend(q_latent, q_rope, kv_c_and_k_pe_cache, starts,
                                  attn_metadata.seq_lens_all[first:last],
                                  attn_metadata.block_table_all[first:last],
                                  max_query_len=attn_metadata.max_query_len,
                                  max_seq_len=attn_metadata.max_seq_len, k_scale=k_scale)  # [T, H, d_loc]
        out = torch.einsum("thc,hvc->thv", latent_out, w_uv)  # [T, H, d_v]
        output.view(tokens, self.num_heads, self.v_head_dim).copy_(out)
