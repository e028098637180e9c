"""The ``mla_plugin_gla`` attention backend for SGLang: ``mla_plugin``'s, over this rank's latent slices.

Layers of this backend are the sharded-latent DeepSeek attention's (gla_attention.py): all H
heads (grouped at TP > 1: the rank's H_loc heads, a grouped model of its g_loc slices, no
communication in attention), query rows ``[q̃^loc | q^R]`` and pool rows ``[ĉ^loc | k^R]`` of
d_loc + d_R values. The metadata, the pool writes and the call of ``ops.paged_latent_attention`` are ``mla_plugin``'s
(mla_backend.py); this backend adds the layer's slices (``LatentSlices`` from its plan) and, for
exact softmax over more than one rank, SGLang's TP all-reduce of the partial logits.
"""

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.ops.sharded_latent import LatentSlices, slices_for_plan
from mla_plugin.sglang.mla_backend import MLAPluginSGLangBackend

GLA_BACKEND = GLA_BACKEND_NAME.lower()  # "mla_plugin_gla", as SGLang users name it


class NotShardedLatentLayerError(ValueError):
    """A layer reached mla_plugin_gla that the sharded-latent DeepSeek attention did not build."""


class MLAPluginGLASGLangBackend(MLAPluginSGLangBackend):
    backend_name = GLA_BACKEND

    def __init__(self, model_runner):
        if not getattr(model_runner, "use_mla_backend", False):
            raise NotShardedLatentLayerError(
                f"--attention-backend {GLA_BACKEND} serves DeepSeek-V2-style MLA models only (kv_lora_rank in "
                "config.json); this model has no latent attention. Leave out --attention-backend.")
        super().__init__(model_runner)
        self._slices: dict[int, LatentSlices] = {}

    def _seam_options(self, layer) -> dict:
        plan = getattr(layer, "mla_plugin_plan", None)
        if plan is None:
            raise NotShardedLatentLayerError(
                f"{GLA_BACKEND}: layer {getattr(layer, 'layer_id', '?')} was not built by mla_plugin's "
                "sharded-latent DeepSeek attention (DeepSeek-V2/V3-style MLA models)")
        slices = self._slices.get(id(plan))
        if slices is None:
            slices = self._slices[id(plan)] = slices_for_plan(plan)
        all_reduce = None
        if plan.tp_size > 1 and plan.softmax == "exact":
            from mla_plugin.sglang.gla_compat import tensor_model_parallel_all_reduce

            all_reduce = tensor_model_parallel_all_reduce
        return {"slices": slices, "all_reduce": all_reduce}

    def _trace_detail(self, layer) -> str:
        plan = layer.mla_plugin_plan
        width = self.pool.get_key_buffer(layer.layer_id).shape[-1]
        return (f" d_loc={plan.local_latent_dim} pool_width={width} shards={plan.shard_offset}+{plan.shards_local}/"
                f"{plan.shards} softmax={plan.softmax} tp={plan.tp_rank}/{plan.tp_size} "
                f"head_offset={plan.head_offset} local_heads={layer.tp_q_head_num}/{plan.num_heads}")
