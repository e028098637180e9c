"""mla_plugin: latent attention (DeepSeek-V2 MLA) for vLLM, as a plugin.

The package is importable without vLLM: ``mla_plugin.ops`` is plain torch, and
``mla_plugin.vllm`` is only imported by vLLM's plugin loader (entry point
``vllm.general_plugins``).
"""

__version__ = "0.1.0"

# The attention backends, as users name them for ``--attention-backend`` (any case).
# Defined here only; every framework integration registers these names.
MLA_BACKEND_NAME = "MLA_PLUGIN"  # MLA with our absorbed decode
GLA_BACKEND_NAME = "MLA_PLUGIN_GLA"  # the latent sharded over TP ranks (gla_options.py)
BACKEND_NAMES = (MLA_BACKEND_NAME, GLA_BACKEND_NAME)
