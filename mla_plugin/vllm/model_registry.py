"""The architecture converted checkpoints declare, registered with vLLM's model registry.

``MLAPluginDeepseekV2ForCausalLM`` (checkpoint_format.CONVERTED_ARCHITECTURE) is what
config.json names when the weights are not an ordinary DeepSeek-V2. Only this plugin
registers it, so vLLM without the plugin refuses such a checkpoint ("not supported")
instead of serving it as another model. Registered by class path: vLLM imports the class
(converted_model.py, a DeepseekV2ForCausalLM) only when it serves such a checkpoint.
"""

from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE

MODEL_CLASS_PATH = "mla_plugin.vllm.converted_model:MLAPluginDeepseekV2ForCausalLM"


def register_converted_architecture() -> None:
    """Idempotent; runs in every vLLM process (plugin registration)."""
    from mla_plugin.vllm.compat import ModelRegistry

    if CONVERTED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(CONVERTED_ARCHITECTURE, MODEL_CLASS_PATH)
