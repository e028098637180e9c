"""The ``sglang.srt.plugins`` entry point: ``--attention-backend mla_plugin`` in SGLang.

SGLang's ``load_plugins()`` calls ``register()`` in each of its processes (launcher,
engine, schedulers = TP ranks, detokenizer). It is idempotent. It checks every SGLang
internal the plugin touches (``touch_points.verify``), then:

- registers the backend factory ``mla_plugin`` (``register_attention_backend``) and adds
  the name to ``--attention-backend``'s choices;
- registers a DeepSeek handler (``AttentionBackendRegistry``) that always takes the
  absorbed MLA path (an unregistered name falls back to the triton handler, whose MHA
  prefill would bypass our backend);
- fills ``moe_layer_freq`` (=1, DeepSeek's own default) in DeepSeek-V2 configs that lack it
  (configs saved by transformers 5 do; SGLang's DeepSeek model reads it);
- on CPU only (``SGLANG_USE_CPU_ENGINE=1``), the stand-ins of ``cpu_support.py``.
"""

import logging

from mla_plugin import BACKEND_NAMES
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.sglang import cpu_support
from mla_plugin.sglang.mla_backend import BACKEND_NAME

logger = logging.getLogger("sglang.mla_plugin")

_registered = False


class NotAnMLAModelError(MLAPluginInputError):
    """``--attention-backend mla_plugin`` asked for a model without multi-head latent attention."""


def check_mla_model(model_path: str, architectures, use_mla: bool, backend: str = BACKEND_NAME) -> None:
    if not use_mla:
        arch = ", ".join(architectures or ["unknown"])
        raise NotAnMLAModelError(
            f"--attention-backend {backend} needs a model with multi-head latent attention "
            f"(DeepSeek-V2/V3 style: kv_lora_rank in config.json), but {model_path!r} ({arch}) has none. "
            "Leave out --attention-backend to serve it with SGLang's default attention."
        )


def create_backend(runner):
    """``runner -> AttentionBackend`` (SGLang's factory contract), in each TP rank."""
    check_mla_model(runner.model_config.model_path, getattr(runner.model_config.hf_config, "architectures", None),
                    runner.use_mla_backend)
    from mla_plugin.sglang.mla_backend import MLAPluginSGLangBackend

    return MLAPluginSGLangBackend(runner)


def absorbed_mla_handler(attn, forward_batch):
    """DeepSeek attention under ``mla_plugin``: always the absorbed MLA path (prefill too)."""
    from mla_plugin.sglang.compat import AttnForwardMethod

    return AttnForwardMethod.MLA


def register_backend_name(name: str, factory) -> None:
    """``--attention-backend name``: the factory (runner -> backend), the CLI choice and the
    DeepSeek handler that takes the absorbed path. Idempotent."""
    from mla_plugin.sglang.compat import (
        ATTENTION_BACKEND_CHOICES,
        ATTENTION_BACKENDS,
        AttentionBackendRegistry,
        register_attention_backend,
    )

    if name not in ATTENTION_BACKENDS:
        register_attention_backend(name)(factory)
    if name not in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.append(name)
    AttentionBackendRegistry.register(name, absorbed_mla_handler)


def fill_deepseek_config_defaults() -> None:
    """``moe_layer_freq`` = 1 where a DeepSeek-V2 config has none (read at model build)."""
    try:
        from transformers import DeepseekV2Config
    except ImportError:  # an older transformers: SGLang brings its own config class
        return
    if not hasattr(DeepseekV2Config, "moe_layer_freq"):
        DeepseekV2Config.moe_layer_freq = 1


def check_request_in_launcher(server_args) -> None:
    """Before any scheduler starts: a non-MLA model with our backend is one error, here."""
    names = {getattr(server_args, key, None) for key in
             ("attention_backend", "prefill_attention_backend", "decode_attention_backend")}
    ours = sorted(names & {name.lower() for name in BACKEND_NAMES})
    if not ours:
        return
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(server_args.model_path, trust_remote_code=server_args.trust_remote_code)
    except Exception:  # SGLang reports unreadable models itself
        return
    check_mla_model(server_args.model_path, getattr(config, "architectures", None),
                    getattr(config, "kv_lora_rank", None) is not None, ours[0])


def _check_server_args_hook(result, server_args, *args, **kwargs):
    check_request_in_launcher(server_args)
    return result


def register() -> None:
    """Entry point (group ``sglang.srt.plugins``, name ``mla_plugin``)."""
    global _registered
    if _registered:
        return
    from mla_plugin.sglang import touch_points

    if cpu_support.sglang_on_cpu():
        cpu_support.install_import_stand_in()  # processes started without the .pth line
    touch_points.verify()
    from mla_plugin.sglang.compat import HookRegistry, HookType

    register_backend_name(BACKEND_NAME, create_backend)
    fill_deepseek_config_defaults()
    HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _check_server_args_hook,
                          HookType.AFTER)
    if cpu_support.sglang_on_cpu():
        cpu_support.register_cpu_hooks()
    from mla_plugin.sglang import gla_registration  # mla_plugin_gla, the sharded latent

    gla_registration.register()
    _registered = True
    logger.info("mla_plugin: registered attention backend %r", BACKEND_NAME)
