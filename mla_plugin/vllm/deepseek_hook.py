"""Route DeepseekV2's MLA attention to the sharded-latent module where it is requested.

Light on purpose: imported by the plugin entry point in every vLLM process; the heavy
module (gla_attention) is imported only when a layer of that kind is built.
"""

DEEPSEEK_V2 = "vllm.model_executor.models.deepseek_v2"


def sharded_layout_requested() -> bool:
    from vllm.config import get_current_vllm_config

    from mla_plugin.vllm.registration import GLA, requested_backend

    return requested_backend(get_current_vllm_config()) == GLA


def patch_deepseek_v2(module) -> None:
    """Replace the module's DeepseekV2MLAAttention by a factory (idempotent)."""
    original = module.DeepseekV2MLAAttention
    if getattr(original, "_mla_plugin_original", None) is not None:
        return

    def attention_factory(*args, **kwargs):
        if sharded_layout_requested():
            from mla_plugin.vllm.gla_attention import ShardedLatentDeepseekAttention
            from mla_plugin.vllm.registration import GLA, on_backend_selected

            on_backend_selected(GLA)
            return ShardedLatentDeepseekAttention(*args, **kwargs)
        return original(*args, **kwargs)

    attention_factory._mla_plugin_original = original
    module.DeepseekV2MLAAttention = attention_factory
