"""Our attention backends as vLLM knows them: the class behind each name, which one a
config asks for, and what happens in a process once one is selected.

Imported by registration.py and by deepseek_hook.py (neither imports the other).
"""

import logging

from mla_plugin import GLA_BACKEND_NAME, MLA_BACKEND_NAME

logger = logging.getLogger("vllm.mla_plugin")

# enum member name -> backend class path
BACKENDS: dict[str, str] = {
    MLA_BACKEND_NAME: "mla_plugin.vllm.mla_backend.MLAPluginBackend",
    GLA_BACKEND_NAME: "mla_plugin.vllm.gla_backend.MLAPluginGLABackend",
}


def requested_backend(vllm_config) -> str | None:
    """Name of our backend the config asks for, if any."""
    attention_config = getattr(vllm_config, "attention_config", None)
    backend = getattr(attention_config, "backend", None)
    name = getattr(backend, "name", None)
    return name if name in BACKENDS else None


def on_backend_selected(name: str) -> None:
    """One of our backends serves layers in this process."""
    from mla_plugin.vllm.compat import current_platform

    if current_platform.is_cpu():
        from mla_plugin.vllm import cpu_rope_fix

        cpu_rope_fix.activate()
    logger.info("mla_plugin: using the %s attention backend", name)
