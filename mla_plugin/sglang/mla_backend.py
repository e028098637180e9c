"""The ``mla_plugin`` attention backend for SGLang: its MLA pool, our paged latent attention.

SGLang's DeepSeek attention (absorbed MLA path, which our handler picks) calls the backend
with ``q = [q̃ | q^R]`` ``[T, H, d_c + d_R]`` (W_UK already absorbed, rope applied),
``k = [ĉ | k^R]`` ``[T, 1, d_c + d_R]`` and ``v = ĉ``; it wants ``ō`` back as
``[T, H * d_c]`` (W_UV follows). This backend stores ``k`` through the pool's own write
(``MLATokenToKVPool.set_kv_buffer``: one ``[size + page, 1, d_c + d_R]`` buffer per layer)
and runs prefill and decode through ``mla_plugin.ops.paged_latent_attention``, the same
function the vLLM backends call.

Paging: the pool's rows, ``page_size`` at a time, are the seam's blocks
(``[num_pages, page_size, d_c + d_R]``, a view). SGLang's ``req_to_token[r, p]`` gives the
row of request r's position p, whole pages at a time, so the seam's block table is
``req_to_token[r, ::page_size] // page_size``.
"""

import os
from dataclasses import dataclass

import torch

from mla_plugin import MLA_BACKEND_NAME
from mla_plugin.ops import paged_latent_attention
from mla_plugin.ops.kernel_choice import kernel_for
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, fp8_cache_refusal
from mla_plugin.ops.trace import TRACE_ENV, append_trace
from mla_plugin.sglang.compat import AttentionBackend, KVWriteLoc

BACKEND_NAME = MLA_BACKEND_NAME.lower()  # "mla_plugin", as SGLang users name it for --attention-backend

# Forward calls in this process per (backend name, "extend" | "decode"): in-process proof.
FORWARD_CALLS: dict[tuple[str, str], int] = {}


def note_forward_call(backend_name: str, mode: str, cache: torch.Tensor, detail) -> None:
    """Count a call; on a process's first call of each mode, append one trace line."""
    key = (backend_name, mode)
    first = key not in FORWARD_CALLS
    FORWARD_CALLS[key] = FORWARD_CALLS.get(key, 0) + 1
    if first and os.environ.get(TRACE_ENV):  # one line per process and mode that runs this backend
        append_trace(TRACE_ENV, f"{backend_name} sglang {mode} pid={os.getpid()} {detail()} cache={list(cache.shape)}")


@dataclass
class LatentBatch:
    """One forward's requests as the seam reads them (built once per forward, every layer uses it)."""

    query_start_loc: torch.Tensor  # [B + 1] int: request b's query rows
    seq_lens: torch.Tensor  # [B] int: cached tokens per request, its queries included
    block_table: torch.Tensor  # [B, max_pages] int: request b's pages, in order
    max_query_len: int  # host-side bounds (from SGLang's *_cpu copies)
    max_seq_len: int


def _host_max(host_copy, bound: int) -> int:
    """Largest value, from SGLang's host copy (list or CPU tensor); without one, ``bound`` (an
    upper bound from shapes): the device tensor is never read on the host."""
    if host_copy is None:
        return bound
    values = host_copy.tolist() if isinstance(host_copy, torch.Tensor) else list(host_copy)
    return int(max(values, default=0))


def check_kv_cache_dtype(model_runner, backend_name: str) -> None:
    """Refuse, in one line at start-up, an fp8 (e4m3) pool on a GPU without e4m3 (below 8.9)."""
    if getattr(model_runner, "kv_cache_dtype", None) != FP8_CACHE_DTYPE:
        return
    device = torch.device(model_runner.device)
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.version.cuda else None
    refusal = fp8_cache_refusal(capability, "Leave out --kv-cache-dtype (or pass auto) on this GPU.")
    if refusal:
        raise ValueError(f"--attention-backend {backend_name} --kv-cache-dtype fp8_e4m3: {refusal}")


class MLAPluginSGLangBackend(AttentionBackend):
    """Prefill (extend) and decode over SGLang's MLA token pool, through the ops seam."""

    backend_name = BACKEND_NAME

    def __init__(self, model_runner):
        super().__init__()
        check_kv_cache_dtype(model_runner, self.backend_name)
        self.device = model_runner.device
        self.req_to_token = model_runner.req_to_token_pool.req_to_token  # [max_reqs, max_context]
        self.pool = model_runner.token_to_kv_pool
        self.page_size = int(model_runner.page_size)
        self.forward_metadata: LatentBatch | None = None

    # -- per-forward metadata -------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        mode = forward_batch.forward_mode
        seq_lens = forward_batch.seq_lens.to(torch.int64)  # [B]
        batch = seq_lens.shape[0]
        max_seq_len = _host_max(getattr(forward_batch, "seq_lens_cpu", None), self.req_to_token.shape[1])
        if mode.is_decode_or_idle():
            query_start_loc = torch.arange(batch + 1, dtype=torch.int64, device=seq_lens.device)
            max_query_len = 1
        else:
            q_lens = forward_batch.extend_seq_lens.to(torch.int64)  # [B]
            query_start_loc = torch.nn.functional.pad(torch.cumsum(q_lens, 0), (1, 0))  # [B + 1]
            max_query_len = _host_max(getattr(forward_batch, "extend_seq_lens_cpu", None), self.req_to_token.shape[1])
        pages = -(-max_seq_len // self.page_size)
        rows = self.req_to_token[forward_batch.req_pool_indices]  # [B, max_context]
        block_table = rows[:, : pages * self.page_size : self.page_size] // self.page_size  # [B, pages]
        self.forward_metadata = LatentBatch(query_start_loc, seq_lens, block_table, max_query_len, max_seq_len)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        raise NotImplementedError(
            f"--attention-backend {self.backend_name} under SGLang runs eagerly: CUDA (and CPU) graphs are not "
            "implemented for it yet; start SGLang with --disable-cuda-graph"
        )

    def init_cpu_graph_state(self, *args, **kwargs):  # SGLang's CPU graph runner (torch.compile)
        self.init_cuda_graph_state(0, 0)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1

    def support_triton(self):
        return False

    # -- forward --------------------------------------------------------------------

    def _paged_cache(self, layer) -> torch.Tensor:
        """Layer's pool buffer as the seam's ``[num_pages, page_size, d_c + d_R]`` (a view)."""
        buffer = self.pool.get_key_buffer(layer.layer_id)  # [size + page, 1, D]
        rows = buffer.view(-1, buffer.shape[-1])  # [size + page, D]
        pages = rows.shape[0] // self.page_size
        return rows[: pages * self.page_size].view(pages, self.page_size, rows.shape[-1])

    def _seam_options(self, layer) -> dict:
        """Extra keyword arguments of the ops seam for this layer (the sharded latent adds slices, all_reduce)."""
        return {}

    def _trace_detail(self, layer) -> str:
        """Appended to this backend's trace line (subclasses describe their cache)."""
        return ""

    def _attend(self, mode, q, k, v, layer, forward_batch, save_kv_cache, kwargs):
        if "k_rope" in kwargs or "q_rope" in kwargs:
            raise NotImplementedError("mla_plugin takes q = [q̃ | q^R] in one tensor (not listed as an absorb-core backend)")
        d_latent = layer.v_head_dim  # d_c
        width = layer.qk_head_dim  # d_c + d_R
        heads = layer.tp_q_head_num
        if save_kv_cache and k is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)
        meta = self.forward_metadata
        cache = self._paged_cache(layer)
        queries = q.reshape(-1, heads, width)  # [T, H, d_c + d_R]
        q_latent, q_rope = queries[..., :d_latent], queries[..., d_latent:]  # [T, H, d_c], [T, H, d_R]
        note_forward_call(
            self.backend_name, mode, cache,
            lambda: f"d_c={d_latent} d_R={width - d_latent} heads={heads} page_size={self.page_size} "
            f"dtype={cache.dtype} kernel={kernel_for(q.device, q.dtype)}{self._trace_detail(layer)}",
        )
        return_lse = bool(kwargs.get("return_lse", False))
        result = paged_latent_attention(
            q_latent, q_rope, cache, meta.query_start_loc, meta.seq_lens, meta.block_table, layer.scaling,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, return_lse=return_lse,
            **self._seam_options(layer),
        )
        out, lse = result if return_lse else (result, None)
        out = out.reshape(out.shape[0], heads * d_latent)  # [T, H * d_c]
        return (out, lse) if return_lse else out  # lse: natural log, [T, H]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._attend("extend", q, k, v, layer, forward_batch, save_kv_cache, kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        return self._attend("decode", q, k, v, layer, forward_batch, save_kv_cache, kwargs)
