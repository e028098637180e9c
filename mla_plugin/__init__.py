"""mla_plugin: latent attention (DeepSeek-V2 MLA) for vLLM, as a plugin.

The package is importable without vLLM: ``mla_plugin.ops`` is plain torch, and
``mla_plugin.vllm`` is only imported by vLLM's plugin loader (entry point
``vllm.general_plugins``).
"""

__version__ = "0.1.0"

# Names users type for ``--attention-backend`` (any case).
MLA_BACKEND_NAME = "MLA_PLUGIN"
