"""Route DeepseekV2's MLA attention to the sharded-latent module where it is requested,
and apply a converted checkpoint's declared format (checkpoint_format_hook.py).

Light on purpose: imported by the plugin entry point in every vLLM process; the heavy
module (gla_attention) is imported only when a layer of that kind is built.
"""

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.vllm.backends import on_backend_selected, requested_backend


def sharded_layout_requested() -> bool:
    from mla_plugin.vllm.compat import get_current_vllm_config

    return requested_backend(get_current_vllm_config()) == GLA_BACKEND_NAME


def patch_deepseek_v2(module) -> None:
    """Replace the module's DeepseekV2MLAAttention by a factory (idempotent).

    Runs right after vLLM imports the module; first checks the touch points in it.
    """
    from mla_plugin.vllm import touch_points

    original = module.DeepseekV2MLAAttention
    if getattr(original, touch_points.ORIGINAL, None) is not None:
        return
    touch_points.verify(touch_points.DEEPSEEK_IMPORT)

    def attention_factory(*args, **kwargs):
        from mla_plugin.checkpoint_format import format_of

        config = kwargs.get("config", args[1] if len(args) > 1 else None)
        fmt = format_of(config)
        if sharded_layout_requested():
            from mla_plugin.vllm.gla_attention import ShardedLatentDeepseekAttention

            if not fmt.is_stock:
                raise NotImplementedError(
                    "the sharded-latent variant does not serve checkpoints converted from GQA "
                    "(no latent RMSNorm / biases / explicit rope frequencies) yet; serve it with "
                    "--attention-backend mla_plugin")
            on_backend_selected(GLA_BACKEND_NAME)
            return ShardedLatentDeepseekAttention(*args, **kwargs)
        from mla_plugin.vllm.compat import get_tensor_model_parallel_world_size
        from mla_plugin.vllm.declared_backend import check_layer_backend

        check_layer_backend(config, sharded_layer=False, tp_size=get_tensor_model_parallel_world_size())
        attn = original(*args, **kwargs)
        if not fmt.is_stock:
            from mla_plugin.vllm.checkpoint_format_hook import apply_checkpoint_format

            apply_checkpoint_format(attn, config, kwargs.get("prefix", ""))
        return attn

    setattr(attention_factory, touch_points.ORIGINAL, original)
    module.DeepseekV2MLAAttention = attention_factory
