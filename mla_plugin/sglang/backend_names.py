"""Our ``--attention-backend`` names in SGLang, and when the plugin serves a process.

Used by registration.py (``mla_plugin``) and gla_registration.py (``mla_plugin_gla``); neither
imports the other's registration for these.
"""

from mla_plugin import BACKEND_NAMES, GLA_BACKEND_NAME, MLA_BACKEND_NAME

# The names as SGLang users give them (lower case).
MLA_BACKEND = MLA_BACKEND_NAME.lower()
GLA_BACKEND = GLA_BACKEND_NAME.lower()
OUR_BACKENDS = frozenset(name.lower() for name in BACKEND_NAMES)
BACKEND_FIELDS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


def absorbed_mla_handler(attn, forward_batch):
    """DeepSeek attention under our backends: always the absorbed MLA path (prefill too)."""
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


def requested_in(server_args) -> list[str]:
    """Our backends that these server args name (any of the three backend fields)."""
    return sorted({getattr(server_args, field, None) for field in BACKEND_FIELDS} & OUR_BACKENDS)


def configured_here() -> bool:
    """One of ours is this process's configured (prefill or decode) backend. False where SGLang
    has published no configuration yet (a launcher before its engine starts)."""
    from mla_plugin.sglang.gla_compat import attention_backends

    try:
        backends = attention_backends()
    except Exception:  # noqa: BLE001 - nothing published in this process yet
        return False
    return bool(set(backends or ()) & OUR_BACKENDS)


def plugin_serves(model_config) -> bool:
    """This model config is served by the plugin: our backend is configured in this process, or
    the checkpoint is one of ours (the converted architecture, or an ``mla_plugin`` entry)."""
    from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE
    from mla_plugin.gla_options import CONFIG_KEY

    config = getattr(model_config, "hf_config", None)
    if CONVERTED_ARCHITECTURE in (getattr(config, "architectures", None) or ()):
        return True
    if isinstance(getattr(config, CONFIG_KEY, None), dict):
        return True
    return configured_here()
