"""mla_plugin: latent attention (DeepSeek MLA) for vLLM and SGLang, as a plugin.

The package is importable without either framework: ``mla_plugin.ops`` imports only torch
(and Triton for its GPU kernels), ``mla_plugin.vllm`` is imported by vLLM's plugin loader
(entry point ``vllm.general_plugins``) and ``mla_plugin.sglang`` by SGLang's
(``sglang.srt.plugins``).
"""

# The one place the version is written: pyproject.toml reads it (dynamic = ["version"]) and
# `mla-plugin --version` prints it.
__version__ = "0.1.0"

# The attention backends, as users name them for ``--attention-backend`` (any case).
# Defined here only; every framework integration registers these names.
MLA_BACKEND_NAME = "MLA_PLUGIN"  # MLA with our absorbed decode
GLA_BACKEND_NAME = "MLA_PLUGIN_GLA"  # the latent sharded over TP ranks (gla_options.py)
BACKEND_NAMES = (MLA_BACKEND_NAME, GLA_BACKEND_NAME)
