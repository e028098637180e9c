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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from mla_plugin import MLA_BACKEND_NAME
from mla_plugin.ops import paged_latent_attention, write_latent_cache
from mla_plugin.ops.kernel_choice import kernel_for
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, fp8_cache_refusal
from mla_plugin.ops.trace import ROWS_TRACE_ENV, TRACE_ENV, append_trace
from mla_plugin.vllm.compat import (
    AttentionCGSupport,
    AttentionLayer,
    MLACommonBackend,
    MLACommonDecodeMetadata,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    MultipleOf,
    QueryLenSupport,
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


@dataclass
class QueryRows:
    """Query rows our backends saw in one process, from host ints only (no tensor read).

    ``by_query_len`` counts calls by their bound on query rows per request: 1 for plain
    decode, up to 1 + k where a speculative verify step brought k drafts. A call with more
    rows than requests had a request with several rows."""

    calls: int = 0
    requests: int = 0
    rows: int = 0
    by_query_len: Counter = field(default_factory=Counter)
    with_context: int = 0  # prefill calls with cached context (chunked prefill or extend)
    layers: set = field(default_factory=set)  # vLLM's names of the attention layers (decode)

    def add(self, requests: int, rows: int, max_query_len: int, with_context: bool = False,
            layer_name: str | None = None) -> None:
        if layer_name is not None:
            self.layers.add(layer_name)
        self.calls += 1
        self.requests += requests
        self.rows += rows
        self.by_query_len[max_query_len] += 1
        self.with_context += int(with_context)


# Per backend name: the rows our decode (forward_mqa) ran, and the rows sent to the prefill
# path (forward_mha); with speculative decoding, verify rows belong to the first.
DECODE_ROWS: dict[str, QueryRows] = {}
PREFILL_ROWS: dict[str, QueryRows] = {}


def note_query_rows(table: dict[str, QueryRows], kind: str, backend_name: str, requests: int, rows: int,
                    max_query_len: int, with_context: bool = False, layer_name: str | None = None) -> None:
    """Count one call; the first multi-row decode (or prefill with context) of a process is
    also traced, so tests see it from TP worker processes."""
    counts = table.setdefault(backend_name, QueryRows())
    first_multi = rows > requests and counts.rows - counts.requests == 0
    first_context = with_context and counts.with_context == 0
    counts.add(requests, rows, max_query_len, with_context, layer_name)
    if (kind == "decode" and first_multi) or (kind == "prefill" and first_context):
        what = "multi-token decode" if kind == "decode" else "prefill with context"
        append_trace(ROWS_TRACE_ENV, f"{backend_name} {what} pid={os.getpid()} requests={requests} rows={rows} "
                                f"max_query_len={max_query_len}")


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
class MLAPluginDecodeMetadata(MLACommonDecodeMetadata):
    """vLLM's decode metadata and the host bound on the decode requests' query rows."""

    max_query_len: int = 1


def decode_query_bound(query_start_loc_cpu: torch.Tensor, bound: int) -> int:
    """The longest decode request's query rows, from the host copy of the offsets
    (query_start_loc_cpu [B + 1], already on the CPU: no device read), within vLLM's bound."""
    if query_start_loc_cpu.numel() < 2:
        return max(1, bound)
    longest = int((query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).max())
    return max(1, min(bound, longest))


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

    Speculative verify steps (1 + k query rows per request) run our decode too
    (``QueryLenSupport.VARLEN``) but are not declared capturable (UNIFORM_BATCH): no test has
    captured a multi-row step on a GPU, so with speculation vLLM runs full-graph decode as
    PIECEWISE (its own check in CompilationConfig), attention eager.
    """
    if not current_platform.is_cuda_alike():
        return AttentionCGSupport.NEVER
    kernel = kernel_for(torch.device("cuda"), vllm_config.model_config.dtype)
    return AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE if kernel == "triton" else AttentionCGSupport.NEVER


class MLAPluginMetadataBuilder(MLACommonMetadataBuilder[MLAPluginMetadata]):
    metadata_cls: ClassVar[type] = MLAPluginMetadata  # subclasses name their own
    # The seam takes causal queries of any length per request (ops/paged_attention.py), so
    # speculative verify rows (1 + k per request, k varying) are decodes: vLLM raises
    # reorder_batch_threshold to 1 + num_speculative_tokens and keeps them out of prefill.
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.VARLEN

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(
            kv_cache_spec, layer_names, vllm_config, device, metadata_cls=self.metadata_cls
        )

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> "AttentionCGSupport":
        return cudagraph_support(vllm_config)

    def _build_decode(self, block_table_tensor, seq_lens_device, max_seq_len, query_start_loc_cpu,
                      query_start_loc_device, num_decode_tokens, max_query_len, dcp_tot_seq_lens_device):
        return MLAPluginDecodeMetadata(
            block_table=block_table_tensor, seq_lens=seq_lens_device, dcp_tot_seq_lens=dcp_tot_seq_lens_device,
            max_query_len=decode_query_bound(query_start_loc_cpu, max_query_len),
        )


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
        # Decodes come first, 1 to decode.max_query_len causal query rows each (VARLEN: a
        # speculative verify step's 1 + k); the batch's max_seq_len (a host int) bounds their
        # context without reading seq_lens.
        note_query_rows(DECODE_ROWS, "decode", self.backend_name, batch, attn_metadata.num_decode_tokens,
                        decode.max_query_len, layer_name=getattr(layer, "layer_name", None))
        return paged_latent_attention(
            q_latent, q_rope, kv_c_and_k_pe_cache, attn_metadata.query_start_loc[: batch + 1],
            decode.seq_lens, decode.block_table, self.scale,
            max_query_len=decode.max_query_len, max_seq_len=attn_metadata.max_seq_len, return_lse=True,
            cache_scale=layer._k_scale if kv_c_and_k_pe_cache.dtype == FP8_CACHE_DTYPE else None,
        )

    def forward_mha(self, q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                    *args, **kwargs):
        """vLLM's MLA prefill, counted (PREFILL_ROWS): speculative verify rows never come here."""
        note_prefill_rows(self.backend_name, q, attn_metadata)
        return super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                                   *args, **kwargs)


def note_prefill_rows(backend_name: str, q: torch.Tensor, attn_metadata) -> None:
    """Count a prefill call: its requests, rows, and whether any has cached context."""
    prefill = attn_metadata.prefill
    with_context = prefill is not None and prefill.chunked_context is not None
    note_query_rows(PREFILL_ROWS, "prefill", backend_name, attn_metadata.num_prefills, q.shape[0],
                    attn_metadata.max_query_len, with_context)
