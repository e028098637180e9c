"""vLLM's model class for MLAPluginDeepseekV2ForCausalLM (model_registry.py).

vLLM's DeepseekV2ForCausalLM itself: what makes a converted checkpoint's attention its own
happens where each attention layer is built (deepseek_hook.py: the sharded-latent layer,
or vLLM's with the declared format applied), and the backend that serves it is checked at
start-up (declared_backend.py). Kept tiny: vLLM caches what it learns about this class by
the hash of this file.
"""

from mla_plugin.vllm.compat import DeepseekV2ForCausalLM


class MLAPluginDeepseekV2ForCausalLM(DeepseekV2ForCausalLM):
    """A DeepSeek-V2 whose config.json declares converted attention under "mla_plugin"."""
