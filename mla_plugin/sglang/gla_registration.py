"""Registration of ``--attention-backend mla_plugin_gla`` (the sharded latent) in SGLang.

Called by the plugin entry point (registration.py) in every SGLang process, after its
touch points were found in place. It

- registers the backend factory ``mla_plugin_gla`` (gla_backend.py), its CLI choice and a
  DeepSeek handler taking the absorbed path (as ``mla_plugin`` does);
- replaces ``sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA`` through SGLang's
  ``HookRegistry`` by a subclass whose construction builds the sharded-latent module
  (gla_attention.py) where ``mla_plugin_gla`` serves the model, and SGLang's own module
  otherwise (so nothing changes for any other backend);
- sizes the MLA pool per rank (gla_pool.py, an AFTER hook on the KV-cache configurator);
- serves converted checkpoints with no flag (gla_converted.py: their architecture, shapes
  and declared backend).
"""

import logging

from mla_plugin.sglang.backend_names import GLA_BACKEND, register_backend_name

logger = logging.getLogger("sglang.mla_plugin")

_registered = False


class MixedBackendsError(ValueError):
    """mla_plugin_gla asked for prefill or decode only: the pool layout is one for both."""


def sharded_latent_requested() -> bool:
    """True where SGLang's configured attention backend (this process) is mla_plugin_gla."""
    from mla_plugin.sglang.gla_compat import attention_backends

    prefill, decode = attention_backends()
    if (prefill == GLA_BACKEND) != (decode == GLA_BACKEND):
        raise MixedBackendsError(
            f"{GLA_BACKEND} caches a sharded latent that no other backend reads: give it for both prefill and "
            f"decode (--attention-backend {GLA_BACKEND}), not as --prefill/--decode-attention-backend only")
    return prefill == GLA_BACKEND


def create_backend(runner):
    """``runner -> AttentionBackend`` for mla_plugin_gla, in each TP rank."""
    from mla_plugin.sglang.gla_backend import MLAPluginGLASGLangBackend

    return MLAPluginGLASGLangBackend(runner)


def dispatching_attention_class(original: type) -> type:
    """A subclass of SGLang's DeepSeek MLA attention that builds ours where mla_plugin_gla serves."""

    class DeepseekV2AttentionMLA(original):
        __doc__ = original.__doc__
        mla_plugin_original = original

        def __new__(cls, *args, **kwargs):
            if sharded_latent_requested():
                from mla_plugin.sglang.gla_attention import ShardedLatentDeepseekAttention

                return ShardedLatentDeepseekAttention(*args, **kwargs)  # not a cls: __init__ is not called again
            return super().__new__(cls)

    DeepseekV2AttentionMLA.__module__ = original.__module__
    DeepseekV2AttentionMLA.__qualname__ = original.__qualname__
    return DeepseekV2AttentionMLA


def register() -> None:
    """Idempotent; after the ``mla_plugin`` registration (same processes)."""
    global _registered
    if _registered:
        return
    from mla_plugin.sglang import gla_compat as sg
    from mla_plugin.sglang.compat import HookRegistry, HookType
    from mla_plugin.sglang.gla_pool import size_pool_per_rank

    register_backend_name(GLA_BACKEND, create_backend)

    import importlib

    module_name, _, class_name = sg.DEEPSEEK_ATTENTION.rpartition(".")
    original = getattr(importlib.import_module(module_name), class_name)
    if getattr(original, "mla_plugin_original", None) is None:
        HookRegistry.register(sg.DEEPSEEK_ATTENTION, dispatching_attention_class(original), HookType.REPLACE)
    HookRegistry.register(sg.KV_CACHE_CONFIGURATOR_POST_INIT, size_pool_per_rank, HookType.AFTER)
    # Converted checkpoints (gla_converted.py): their architecture, shapes and backend.
    from mla_plugin.sglang.gla_converted import (
        choose_declared_backend,
        derive_shapes_as_deepseek_v2,
        register_converted_architecture,
    )

    register_converted_architecture(sg.ModelRegistry, importlib.import_module(module_name).DeepseekV2ForCausalLM)
    HookRegistry.register(sg.SERVER_ARGS_RESOLVE, choose_declared_backend, HookType.BEFORE)
    HookRegistry.register(sg.MODEL_SHAPES, derive_shapes_as_deepseek_v2, HookType.AROUND)
    _registered = True
    logger.info("mla_plugin: registered attention backend %r", GLA_BACKEND)
