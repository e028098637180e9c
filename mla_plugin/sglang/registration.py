"""The ``sglang.srt.plugins`` entry point: ``--attention-backend mla_plugin`` in SGLang.

SGLang's ``load_plugins()`` calls ``register()`` in each of its processes (launcher,
engine, schedulers = TP ranks, detokenizer). It is idempotent. It checks every SGLang
internal the plugin touches (``touch_points.verify``), then:

- registers the backend factory ``mla_plugin`` (``register_attention_backend``) and adds
  the name to ``--attention-backend``'s choices;
- registers a DeepSeek handler (``AttentionBackendRegistry``) that always takes the
  absorbed MLA path (an unregistered name falls back to the triton handler, whose MHA
  prefill would bypass our backend);
- fills ``moe_layer_freq`` (=1, DeepSeek's own default) and the MoE routing fields in
  DeepSeek-V2/V3 configs that lack them (configs saved by transformers 5 do; SGLang's
  DeepSeek model reads them): ``DEEPSEEK_CONFIG_DEFAULTS``, and one expert group for
  DeepSeek-V2's ungrouped "greedy" routing (``fill_ungrouped_routing``);
- on CPU only (``SGLANG_USE_CPU_ENGINE=1``), the stand-ins of ``cpu_support.py``.
"""

import logging

from mla_plugin import BACKEND_NAMES
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.sglang import cpu_support
from mla_plugin.sglang.mla_backend import BACKEND_NAME

MODEL_SHAPES = "sglang.srt.configs.model_config.ModelConfig._derive_model_shapes"

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


# Fields SGLang's DeepSeek model reads that transformers 5's config classes no longer keep,
# with the values transformers' own DeepSeek models compute with (and DeepSeek's checkpoints carry).
DEEPSEEK_CONFIG_DEFAULTS = {
    "DeepseekV2Config": {"moe_layer_freq": 1, "scoring_func": "softmax"},
    "DeepseekV3Config": {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"},
}


def fill_deepseek_config_defaults() -> None:
    """DEEPSEEK_CONFIG_DEFAULTS where a DeepSeek-V2/V3 config has none (read at model build);
    a checkpoint's own value (config.json) always wins."""
    import transformers

    for name, defaults in DEEPSEEK_CONFIG_DEFAULTS.items():
        config_class = getattr(transformers, name, None)  # an older transformers: SGLang brings its own
        for field, value in defaults.items():
            if config_class is not None and not hasattr(config_class, field):
                setattr(config_class, field, value)


def fill_ungrouped_routing(model_config, *args, **kwargs):
    """BEFORE hook of ``ModelConfig._derive_model_shapes`` (each process, before the model is built).

    transformers' DeepSeek-V2 "greedy" routing picks the top-k experts over all of them and
    saves ``n_group``/``topk_group`` as null; SGLang always routes grouped and needs both. One
    group with one group kept is the same routing (DeepSeek-V2-Lite's own config says so).
    """
    config = getattr(model_config, "hf_config", None)
    if getattr(config, "model_type", None) not in ("deepseek_v2", "deepseek_v3"):
        return None
    if getattr(config, "topk_method", None) == "greedy" and getattr(config, "n_group", 0) is None:
        config.n_group = 1
        if getattr(config, "topk_group", None) is None:
            config.topk_group = 1
    return None


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
    HookRegistry.register(MODEL_SHAPES, fill_ungrouped_routing, HookType.BEFORE)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _check_server_args_hook,
                          HookType.AFTER)
    if cpu_support.sglang_on_cpu():
        cpu_support.register_cpu_hooks()
    from mla_plugin.sglang import gla_registration  # mla_plugin_gla, the sharded latent

    gla_registration.register()
    _registered = True
    logger.info("mla_plugin: registered attention backend %r", BACKEND_NAME)
