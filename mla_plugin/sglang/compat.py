"""The SGLang names the plugin imports, in one module (each is a touch point in touch_points.py).

Only this module has ``from sglang ... import`` statements; a test checks that each name
here is listed in ``touch_points.TOUCH_POINTS``.
"""

from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES  # noqa: F401
from sglang.srt.layers.attention.attention_registry import (  # noqa: F401
    ATTENTION_BACKENDS,
    register_attention_backend,
)
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend  # noqa: F401
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MLATokenToKVPool  # noqa: F401
from sglang.srt.plugins.hook_registry import HookRegistry, HookType  # noqa: F401
from sglang.srt.models.deepseek_common.attention_backend_handler import AttentionBackendRegistry  # noqa: F401
from sglang.srt.models.deepseek_common.attention_forward_methods.forward_methods import (  # noqa: F401
    AttnForwardMethod,
)

