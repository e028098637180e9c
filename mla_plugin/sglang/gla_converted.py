"""Converted sharded-latent checkpoints in SGLang, served with no flag (as under vLLM).

``mla-plugin convert mla-to-gla`` writes checkpoints that declare themselves
(checkpoint_format.py, "what a converted checkpoint declares itself as"): partitioned or
grouped softmax, or the local RMSNorm, as ``"architectures": ["MLAPluginDeepseekV2ForCausalLM"]``,
a name SGLang without the plugin does not know (it refuses the checkpoint instead of serving
another model); and an ``mla_plugin`` entry with the layout and options. With the plugin:

- the architecture is registered with SGLang's model registry as a DeepSeek-V2 model, and
  SGLang's model config derives its shapes (MLA, kv_lora_rank) as for ``DeepseekV2ForCausalLM``;
- a checkpoint whose ``mla_plugin`` entry needs the sharded latent gets
  ``--attention-backend mla_plugin_gla`` when none is given; any other explicit backend
  fails at start-up with one message naming ``mla_plugin_gla``.
"""

import json
from pathlib import Path

from mla_plugin.checkpoint_format import (
    CONVERTED_ARCHITECTURE,
    STOCK_ARCHITECTURE,
    describe_sharded_latent,
    sharded_latent_changes_function,
)
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.gla_options import CONFIG_KEY
from mla_plugin.sglang.gla_backend import GLA_BACKEND

BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


class WrongBackendError(MLAPluginInputError):
    """The requested attention backend would compute a different model than the checkpoint declares."""


def declared_options(model_path) -> dict | None:
    """The ``mla_plugin`` entry of a local checkpoint's config.json (None: none, or not a local folder)."""
    config_file = Path(str(model_path)).expanduser() / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    options = config.get(CONFIG_KEY)
    return options if isinstance(options, dict) else None


def serves_sharded_latent(options: dict | None, tp_size: int | None) -> bool:
    """The checkpoint picks mla_plugin_gla for itself: the sharded layout, or options only it computes."""
    if not isinstance(options, dict):
        return False
    return options.get("layout") == "sharded_latent" or sharded_latent_changes_function(options, tp_size=tp_size)


def choose_declared_backend(server_args, *args, **kwargs):
    """BEFORE hook of ``ServerArgs.resolve_once`` (before SGLang fills in its default backend)."""
    options = declared_options(getattr(server_args, "model_path", None))
    extra = getattr(server_args, "json_model_override_args", None)
    if extra:
        try:
            override = json.loads(extra).get(CONFIG_KEY)
        except (ValueError, AttributeError):
            override = None
        if isinstance(override, dict):
            options = {**(options or {}), **override}
    tp_size = getattr(server_args, "tp_size", None)
    if not serves_sharded_latent(options, tp_size):
        return None
    asked = {getattr(server_args, f, None) for f in BACKEND_FIELDS} - {None}
    if not asked:
        server_args.attention_backend = GLA_BACKEND
        return None
    if asked != {GLA_BACKEND} and sharded_latent_changes_function(options, tp_size=tp_size):
        raise WrongBackendError(
            f"{server_args.model_path} declares a sharded-latent attention ({describe_sharded_latent(options)}) "
            f"that only the {GLA_BACKEND} backend computes; --attention-backend {sorted(asked)[0]} would serve a "
            f"different model. Pass --attention-backend {GLA_BACKEND}, or leave out --attention-backend.")
    return None


def derive_shapes_as_deepseek_v2(original, model_config, *args, **kwargs):
    """AROUND hook of ``ModelConfig._derive_model_shapes``: the converted architecture is DeepSeek-V2's."""
    config = model_config.hf_config
    architectures = getattr(config, "architectures", None)
    if not architectures or CONVERTED_ARCHITECTURE not in architectures:
        return original(model_config, *args, **kwargs)
    config.architectures = [STOCK_ARCHITECTURE if a == CONVERTED_ARCHITECTURE else a for a in architectures]
    try:
        return original(model_config, *args, **kwargs)
    finally:
        config.architectures = architectures


def register_converted_architecture(model_registry, deepseek_v2_class) -> None:
    """``MLAPluginDeepseekV2ForCausalLM`` -> a DeepSeek-V2 model class of that name (idempotent)."""
    if CONVERTED_ARCHITECTURE in model_registry.models:
        return
    converted = type(CONVERTED_ARCHITECTURE, (deepseek_v2_class,), {
        "__doc__": "A checkpoint written by `mla-plugin convert mla-to-gla` (served by mla_plugin_gla).",
        "__module__": __name__,
    })
    model_registry.models[CONVERTED_ARCHITECTURE] = converted
