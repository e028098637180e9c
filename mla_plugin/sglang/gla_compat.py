"""The SGLang names the sharded-latent variant (``gla_*.py``) imports, in one module.

Each is an SGLang internal the plugin touches (listed with the others in touch_points.py);
an SGLang release that moves one fails here, at import, with the name in the message.
"""

from sglang.srt.configs.model_config import compute_mla_mscale_scaling  # noqa: F401
from sglang.srt.distributed import tensor_model_parallel_all_reduce  # noqa: F401
from sglang.srt.distributed.parallel_state import (  # noqa: F401
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from sglang.srt.layers.layernorm import RMSNorm  # noqa: F401
from sglang.srt.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear  # noqa: F401
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: F401
from sglang.srt.layers.rotary_embedding.factory import get_rope  # noqa: F401
from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator  # noqa: F401
from sglang.srt.models.registry import ModelRegistry  # noqa: F401
from sglang.srt.runtime_context import attention_backends  # noqa: F401

# Dotted paths the HookRegistry patches (resolved by SGLang when hooks are applied).
DEEPSEEK_ATTENTION = "sglang.srt.models.deepseek_v2.DeepseekV2AttentionMLA"
KV_CACHE_CONFIGURATOR_POST_INIT = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator.__post_init__"
SERVER_ARGS_RESOLVE = "sglang.srt.server_args.ServerArgs.resolve_once"
MODEL_SHAPES = "sglang.srt.configs.model_config.ModelConfig._derive_model_shapes"
