"""The MLA_PLUGIN attention backend: vLLM's MLA scaffolding, our decode.

vLLM's ``MLAAttention`` layer absorbs W_UK into the query, writes the cache through
``do_kv_cache_update`` and runs prefill with its own MLA prefill backend; this
backend supplies the cache write and the absorbed decode (``forward_mqa``), both
from ``mla_plugin.ops``. Unlike CPU_MLA it takes any latent and rope width and any
block size.
"""

import inspect
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from mla_plugin import MLA_BACKEND_NAME
from mla_plugin.ops import paged_latent_attention, write_latent_cache
from mla_plugin.ops.kernel_choice import kernel_for
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, fp8_cache_refusal
from mla_plugin.ops.trace import TRACE_ENV, append_trace
from mla_plugin.vllm.compat import (
    AttentionCGSupport,
    AttentionLayer,
    MLACommonBackend,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    MultipleOf,
    current_platform,
)

logger = logging.getLogger("vllm.mla_plugin")

# Cache dtypes stored without quantisation, and vLLM's names of the fp8 (e4m3) latent cache:
# one byte per value, value / k_scale (ops/latent_cache.py). vLLM views every quantised MLA
# cache as current_platform.fp8_dtype() (e4m3), so e5m2 and the other fp8 formats are not
# MLA latent caches.
UNQUANTISED_KV_CACHE_DTYPES = ["auto", "float16", "bfloat16"]
FP8_KV_CACHE_DTYPES = ["fp8", "fp8_e4m3"]
SUPPORTED_KV_CACHE_DTYPES = UNQUANTISED_KV_CACHE_DTYPES + FP8_KV_CACHE_DTYPES

# Decode calls in this process and the last cache shape seen, per backend name:
# in-process evidence for tests.
DECODE_CALLS: dict[str, int] = {}
LAST_CACHE_SHAPE: dict[str, tuple[int, ...]] = {}
LAST_CACHE_DTYPE: dict[str, torch.dtype] = {}


def note_decode_call(backend_name: str, cache: torch.Tensor, describe: Callable[[], str]) -> None:
    """Count a decode call; on the first one in a process, log it and trace it.

    ``describe`` builds the log line's detail; it runs on that first call only, so the
    decode path does not format a string (or ask which kernel runs) on every step."""
    first = backend_name not in DECODE_CALLS
    DECODE_CALLS[backend_name] = DECODE_CALLS.get(backend_name, 0) + 1
    LAST_CACHE_SHAPE[backend_name] = tuple(cache.shape)
    LAST_CACHE_DTYPE[backend_name] = cache.dtype
    if not first:
        return
    detail = f"{describe()} cache={list(cache.shape)}"
    logger.info("mla_plugin: %s decode running in pid %d (%s)", backend_name, os.getpid(), detail)
    # One line per process (proof, across processes, that this backend and not CPU_MLA ran).
    append_trace(TRACE_ENV, f"{backend_name} pid={os.getpid()} {detail}")


def check_kv_cache_dtype(kv_cache_dtype: str, backend_name: str = MLA_BACKEND_NAME) -> None:
    """Refuse, in one line at start-up, a cache dtype our backends cannot run here."""
    flag = f"--attention-backend {backend_name.lower()}"
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ValueError(
            f"{flag} does not support --kv-cache-dtype {kv_cache_dtype}: vLLM's MLA latent cache is "
            f"unquantised or fp8 e4m3 with a per-layer scale; use one of {SUPPORTED_KV_CACHE_DTYPES} "
            "('fp8' means e4m3)."
        )
    if kv_cache_dtype in FP8_KV_CACHE_DTYPES:
        refusal = fp8_cache_refusal(cuda_capability(), "Leave out --kv-cache-dtype (or pass auto) on this GPU.")
        if refusal:
            raise ValueError(f"{flag} --kv-cache-dtype {kv_cache_dtype}: {refusal}")


def cuda_capability() -> tuple[int, int] | None:
    """(major, minor) of the NVIDIA GPU vLLM runs on, None elsewhere (vLLM's query: no CUDA
    initialisation in the engine's main process)."""
    if not current_platform.is_cuda():
        return None
    capability = current_platform.get_device_capability()
    return None if capability is None else (capability.major, capability.minor)


def check_mla_args(mla_args: dict, backend_name: str) -> None:
    """Every MLA argument vLLM's layer passes must reach MLACommonImpl: none is dropped.

    An argument MLACommonImpl.__init__ does not take means vLLM changed the contract
    between its MLA layer and its impls (touch point "MLA impl"): fail with one message.
    """
    parameters = inspect.signature(MLACommonImpl.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(mla_args) - set(parameters))
    if unknown:
        from mla_plugin.vllm.compat import vllm_version

        raise TypeError(
            f"{backend_name}: vLLM {vllm_version()}'s MLA layer passes {unknown} to the attention "
            f"impl, which MLACommonImpl.__init__ does not take (it takes {[p for p in parameters if p != 'self']}). "
            "vLLM changed the MLA impl contract (touch point 'MLA impl' in "
            "mla_plugin/vllm/touch_points.py); use a vLLM version mla_plugin supports."
        )


@dataclass
class MLAPluginMetadata(MLACommonMetadata):
    """MLACommonMetadata without the fixed (320, 512, 576) latent-width list."""

    def __post_init__(self):
        if self.head_dim is not None and self.head_dim <= 0:
            raise ValueError(f"latent cache row width must be positive, got {self.head_dim}")


def cudagraph_support(vllm_config) -> "AttentionCGSupport":
    """What our decode allows CUDA graphs to capture.

    vLLM captures the whole single-token decode step: the cache write (``write_latent_cache``:
    padded rows redirected on the device, no mask, no host read) and the Triton kernels (CUDA,
    ``kernel_choice.kernel_for``), which read no tensor on the host and size every launch from
    the batch size, heads and the block table's width alone (the exact path over ranks chunks
    its partial logits and all-reduces within the graph). tests/unit/test_decode_capture.py
    captures that step in one graph and replays it bit for bit; the host-sync detector runs it
    on CPU (tests/unit/test_latent_decode.py). The plain-torch code loops over the context with
    a host bound, so it is never captured. An unknown MLA_PLUGIN_KERNEL fails here, at start-up.
    """
    if not current_platform.is_cuda_alike():
        return AttentionCGSupport.NEVER
    kernel = kernel_for(torch.device("cuda"), vllm_config.model_config.dtype)
    return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if kernel == "triton" else AttentionCGSupport.NEVER


class MLAPluginMetadataBuilder(MLACommonMetadataBuilder[MLAPluginMetadata]):
    metadata_cls: ClassVar[type] = MLAPluginMetadata  # subclasses name their own

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(
            kv_cache_spec, layer_names, vllm_config, device, metadata_cls=self.metadata_cls
        )

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> "AttentionCGSupport":
        return cudagraph_support(vllm_config)


class MLAPluginBackend(MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = SUPPORTED_KV_CACHE_DTYPES

    @staticmethod
    def get_name() -> str:
        return MLA_BACKEND_NAME  # must equal the registered enum member's name

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any d_c + d_R

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(1)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size > 0

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return True

    @staticmethod
    def get_impl_cls() -> type["MLAPluginImpl"]:
        return MLAPluginImpl

    @staticmethod
    def get_builder_cls() -> type[MLAPluginMetadataBuilder]:
        return MLAPluginMetadataBuilder


class MLAPluginImpl(MLACommonImpl[MLAPluginMetadata]):
    can_return_lse_for_decode: bool = True
    backend_name: ClassVar[str] = MLA_BACKEND_NAME

    def __init__(
        self,
        num_heads,
        head_size,
        scale,
        num_kv_heads,
        alibi_slopes,
        sliding_window,
        kv_cache_dtype,
        logits_soft_cap,
        attn_type,
        kv_sharing_target_layer_name,
        **mla_args,
    ) -> None:
        check_kv_cache_dtype(kv_cache_dtype, self.backend_name)
        if any(x is not None for x in (alibi_slopes, sliding_window, logits_soft_cap)):
            raise NotImplementedError(
                f"{self.backend_name}: alibi, sliding window and logit soft-capping are not supported"
            )
        check_mla_args(mla_args, self.backend_name)
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
            **mla_args,
        )
        # Our decode takes the (q_latent, q_rope) pair as it is: no fp8 query path.
        self.supports_quant_query_input = False
        self._pad_v = False

    def do_kv_cache_update(
        self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale, skip_scale=False
    ) -> None:  # skip_scale: vLLM 0.33 passes it: the scale is 1 (write value / 1)
        if kv_cache.numel() == 0:  # profiling run
            return
        if kv_cache_dtype in FP8_KV_CACHE_DTYPES:  # vLLM allocates the bytes as uint8
            scale = None if skip_scale else k_scale
            write_latent_cache(kv_c_normed, k_pe, kv_cache.view(FP8_CACHE_DTYPE), slot_mapping, scale=scale)
        else:
            write_latent_cache(kv_c_normed, k_pe, kv_cache, slot_mapping)

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: MLAPluginMetadata,
        layer: AttentionLayer,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        decode = attn_metadata.decode
        assert decode is not None
        if isinstance(q, tuple):
            q_latent, q_rope = q  # [B, H, d_c], [B, H, d_R]
        else:
            q_latent, q_rope = q.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        note_decode_call(
            self.backend_name,
            kv_c_and_k_pe_cache,
            lambda: f"d_c={self.kv_lora_rank} d_R={self.qk_rope_head_dim} "
            f"block_size={kv_c_and_k_pe_cache.shape[1]} dtype={kv_c_and_k_pe_cache.dtype} "
            f"kernel={kernel_for(q_latent.device, q_latent.dtype)}",
        )
        batch = attn_metadata.num_decodes
        # Decodes come first, one query each (MLACommonMetadataBuilder: SINGLE_ONLY); the
        # batch's max_seq_len (a host int) bounds their context without reading seq_lens.
        return paged_latent_attention(
            q_latent, q_rope, kv_c_and_k_pe_cache, attn_metadata.query_start_loc[: batch + 1],
            decode.seq_lens, decode.block_table, self.scale,
            max_query_len=1, max_seq_len=attn_metadata.max_seq_len, return_lse=True,
            cache_scale=layer._k_scale if kv_c_and_k_pe_cache.dtype == FP8_CACHE_DTYPE else None,
        )
