"""The ``sglang.srt.plugins`` entry point: ``--attention-backend mla_plugin`` in SGLang.

SGLang's ``load_plugins()`` calls ``register()`` in each of its processes (launcher,
engine, schedulers = TP ranks, detokenizer). It is idempotent and never raises: SGLang would
stop every launch. It checks every SGLang internal the plugin touches (``touch_points``); if
one moved (an untested SGLang), it logs one warning naming the versions tested and installs
only a refusal (a request for our backends, or a checkpoint declaring a sharded latent, fails
in the launcher in one line naming them); every other model is served as without the plugin.
Otherwise it:

- registers the backend factory ``mla_plugin`` (``register_attention_backend``) and adds
  the name to ``--attention-backend``'s choices (backend_names.py);
- registers a DeepSeek handler (``AttentionBackendRegistry``) that always takes the
  absorbed MLA path (an unregistered name falls back to the triton handler, whose MHA
  prefill would bypass our backend);
- where the plugin serves the model (our backend configured in the process, or one of our
  converted checkpoints: ``backend_names.plugin_serves``), fills the fields SGLang's DeepSeek
  model reads that configs saved by transformers 5 lack, on that model's config only:
  ``moe_layer_freq`` (=1, DeepSeek's own default) and the MoE routing fields
  (``DEEPSEEK_CONFIG_DEFAULTS``), and one expert group for DeepSeek-V2's ungrouped "greedy"
  routing (``fill_deepseek_fields``, a BEFORE hook of ``_derive_model_shapes``); other
  launches' configs are left as SGLang reads them;
- on CPU only (``SGLANG_USE_CPU_ENGINE=1``), the stand-ins of ``cpu_support.py``;
- then ``mla_plugin_gla`` (gla_registration.py).
"""

import logging

from mla_plugin.errors import MLAPluginInputError
from mla_plugin.sglang import cpu_support
from mla_plugin.sglang.backend_names import MLA_BACKEND as BACKEND_NAME
from mla_plugin.sglang.backend_names import plugin_serves, register_backend_name, requested_in

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


# Fields SGLang's DeepSeek model reads that transformers 5's config classes no longer keep,
# with the values transformers' own DeepSeek models compute with (and DeepSeek's checkpoints carry).
DEEPSEEK_CONFIG_DEFAULTS = {
    "DeepseekV2Config": {"moe_layer_freq": 1, "scoring_func": "softmax"},
    "DeepseekV3Config": {"moe_layer_freq": 1, "scoring_func": "sigmoid", "topk_method": "noaux_tc"},
}


def fill_deepseek_fields(model_config, *args, **kwargs):
    """BEFORE hook of ``ModelConfig._derive_model_shapes`` (each process, before the model is built):
    where the plugin serves the model, DEEPSEEK_CONFIG_DEFAULTS where its DeepSeek-V2/V3 config has
    none (a checkpoint's own value, config.json, always wins), and one expert group for ungrouped
    routing.

    transformers' DeepSeek-V2 "greedy" routing picks the top-k experts over all of them and
    saves ``n_group``/``topk_group`` as null; SGLang always routes grouped and needs both. One
    group with one group kept is the same routing (DeepSeek-V2-Lite's own config says so).
    """
    config = getattr(model_config, "hf_config", None)
    if getattr(config, "model_type", None) not in ("deepseek_v2", "deepseek_v3") or not plugin_serves(model_config):
        return None
    for field, value in DEEPSEEK_CONFIG_DEFAULTS.get(type(config).__name__, {}).items():
        if not hasattr(config, field):
            setattr(config, field, value)
    if getattr(config, "topk_method", None) == "greedy" and getattr(config, "n_group", 0) is None:
        config.n_group = 1
        if getattr(config, "topk_group", None) is None:
            config.topk_group = 1
    return None


def check_request_in_launcher(server_args) -> None:
    """Before any scheduler starts: a non-MLA model with our backend is one error, here."""
    ours = requested_in(server_args)
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
    moved = touch_points.moved()
    if moved:  # an incompatible SGLang: warn, refuse our backends only, never stop the launch
        from mla_plugin.sglang.incompatible import register_refusal

        register_refusal(moved)
        _registered = True
        return
    from mla_plugin.sglang.compat import HookRegistry, HookType

    register_backend_name(BACKEND_NAME, create_backend)
    HookRegistry.register(MODEL_SHAPES, fill_deepseek_fields, HookType.BEFORE)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", _check_server_args_hook,
                          HookType.AFTER)
    if cpu_support.sglang_on_cpu():
        cpu_support.register_cpu_hooks()
    from mla_plugin.sglang import gla_registration  # mla_plugin_gla, the sharded latent

    gla_registration.register()
    _registered = True
    logger.info("mla_plugin: registered attention backend %r", BACKEND_NAME)
