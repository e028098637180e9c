"""Route DeepseekV2's MLA attention to the sharded-latent module where it is requested,
and apply a converted checkpoint's declared format (checkpoint_format_hook.py).

vLLM's ``DeepseekV2MLAAttention`` stays a class: it is replaced in its module by a subclass
of itself (``routing_attention_class``), so vLLM's models that extend it (GLM-4.7-Flash's
``Glm4MoeLiteMLAAttention``, dots3_note's attention, ...) still import and build. The
subclass builds

- the sharded-latent module (gla_attention.py) where ``mla_plugin_gla`` is requested and the
  exact class is built (a model that extends the class is refused there: its overrides would
  be lost; the config check refuses such models first, registration.validate_request);
- otherwise vLLM's own layer, after the declared-backend check, with a converted checkpoint's
  format applied (a stock checkpoint: nothing changes).

Light on purpose: imported by the plugin entry point in every vLLM process; the heavy
module (gla_attention) is imported only when a layer of that kind is built.
"""

import logging

from mla_plugin import GLA_BACKEND_NAME
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.vllm.backends import on_backend_selected, requested_backend

logger = logging.getLogger("vllm.mla_plugin")


class NotShardableAttentionError(MLAPluginInputError):
    """mla_plugin_gla asked for a model whose attention extends DeepSeek-V2's."""


def sharded_layout_requested() -> bool:
    from mla_plugin.vllm.compat import get_current_vllm_config

    return requested_backend(get_current_vllm_config()) == GLA_BACKEND_NAME


def _config_argument(args, kwargs):
    """The model config passed to DeepseekV2MLAAttention(vllm_config, config, ...)."""
    return kwargs.get("config", args[1] if len(args) > 1 else None)


def _build_sharded(args, kwargs):
    from mla_plugin.checkpoint_format import format_of
    from mla_plugin.vllm.gla_attention import ShardedLatentDeepseekAttention

    if not format_of(_config_argument(args, kwargs)).is_stock:
        raise NotImplementedError(
            "the sharded-latent variant does not serve checkpoints converted from GQA "
            "(no latent RMSNorm / biases / explicit rope frequencies) yet; serve it with "
            "--attention-backend mla_plugin")
    on_backend_selected(GLA_BACKEND_NAME)
    # Not an instance of the routing class, so Python does not call its __init__ afterwards.
    return ShardedLatentDeepseekAttention(*args, **kwargs)


def routing_attention_class(original: type) -> type:
    """A subclass of vLLM's DeepseekV2MLAAttention that builds ours where mla_plugin_gla is requested."""
    from mla_plugin.vllm import touch_points

    class DeepseekV2MLAAttention(original):
        __doc__ = original.__doc__

        def __new__(cls, *args, **kwargs):
            if sharded_layout_requested():
                if cls is not routing:
                    raise NotShardableAttentionError(
                        f"--attention-backend {GLA_BACKEND_NAME.lower()} builds DeepSeek-V2's own attention "
                        f"layer, and this model's {cls.__qualname__} extends it (its changes would be lost). "
                        "Serve it with --attention-backend mla_plugin.")
                return _build_sharded(args, kwargs)
            return super().__new__(cls)

        def __init__(self, *args, **kwargs):
            from mla_plugin.checkpoint_format import format_of
            from mla_plugin.vllm.compat import get_tensor_model_parallel_world_size
            from mla_plugin.vllm.declared_backend import check_layer_backend

            config = _config_argument(args, kwargs)
            check_layer_backend(config, sharded_layer=False, tp_size=get_tensor_model_parallel_world_size())
            super().__init__(*args, **kwargs)
            if not format_of(config).is_stock:
                from mla_plugin.vllm.checkpoint_format_hook import apply_checkpoint_format

                apply_checkpoint_format(self, config, kwargs.get("prefix", ""))

    routing = DeepseekV2MLAAttention
    routing.__module__ = original.__module__
    routing.__qualname__ = original.__qualname__
    setattr(routing, touch_points.ORIGINAL, original)
    return routing


def patch_deepseek_v2(module) -> None:
    """Replace the module's DeepseekV2MLAAttention by ``routing_attention_class`` (idempotent).

    Runs right after vLLM imports the module; first checks the touch points in it. If one
    moved, vLLM's class is left as it is and one warning logged: the module imports as without
    the plugin, and a request for our backends is refused at the config check, in one line
    (registration.validate_request).
    """
    from mla_plugin.vllm import touch_points

    original = getattr(module, "DeepseekV2MLAAttention", None)
    if original is None or vars(original).get(touch_points.ORIGINAL) is not None:
        return
    moved = touch_points.moved(touch_points.DEEPSEEK_IMPORT)
    if moved:
        logger.warning("%s DeepSeek-V2's attention is left as vLLM's.", touch_points.incompatible_line(moved))
        return
    module.DeepseekV2MLAAttention = routing_attention_class(original)
