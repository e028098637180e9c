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

Graphs (SGLang's decode CUDA-graph runner and its CPU graph runner): ``init_cuda_graph_state``
(``init_cpu_graph_state``) allocates static metadata for the largest captured batch, and
``init_forward_metadata_out_graph`` (``init_forward_metadata_capture_cpu_graph`` at CPU
capture) fills it in place from the runner's padded buffers, with no tensor value read on the
host; the bounds the seam gets are static (1 query row per request, or the chain's draft
tokens at verify; the block table's whole width as the context bound), so every replay of a
captured batch size runs the kernels the capture recorded. Speculative decoding: the target's
verify step of a chain draft (top-k 1) is served, eager and captured; tree drafts and the
draft model's own steps are refused at start-up (``speculative_refusal``).
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
from mla_plugin.sglang.touch_points import resolve

BACKEND_NAME = MLA_BACKEND_NAME.lower()  # "mla_plugin", as SGLang users name it for --attention-backend

# Forward calls in this process per (backend name, "extend" | "decode"): in-process proof.
FORWARD_CALLS: dict[tuple[str, str], int] = {}
# Static-metadata fills per (backend name, "capture" | "replay", forward mode name): graph proof.
GRAPH_FILLS: dict[tuple[str, str, str], int] = {}
# Speculative algorithms whose target verify is a chain when top-k is 1 (NGRAM drafts a tree).
CHAIN_ALGORITHMS = ("EAGLE", "EAGLE3", "STANDALONE", "FROZEN_KV_MTP")


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


@dataclass
class GraphBuffers:
    """Static metadata of graph mode: allocated once for the largest captured batch, filled in
    place before each capture and replay; the captured kernels read these addresses."""

    seq_lens: torch.Tensor  # [max_bs] int64: the seam's L per request (queries included)
    block_table: torch.Tensor  # [max_bs, max_pages] (req_to_token's dtype): pages in order
    query_starts: dict  # q_len -> [max_bs + 1] int64, q_len * arange (constant, made at capture)
    cpu_runner: bool  # SGLang's CPU graph runner replays through init_forward_metadata

    def query_start_loc(self, bs: int, q_len: int) -> torch.Tensor:
        starts = self.query_starts.get(q_len)
        if starts is None:  # outside capture: out_graph runs before the graph records
            starts = self.query_starts[q_len] = q_len * torch.arange(
                self.seq_lens.shape[0] + 1, dtype=torch.int64, device=self.seq_lens.device)
        return starts[: bs + 1]


def speculative_refusal(model_runner, backend_name: str) -> str | None:
    """One line when this runner's speculative decoding is not what the backend serves: the
    draft model's steps (their pages come from the draft's own metadata) and tree drafts."""
    algorithm = getattr(model_runner, "spec_algorithm", None)
    if algorithm is None or algorithm.is_none():
        return None
    fix = "use top-k 1 EAGLE/MTP drafts (--speculative-eagle-topk 1)"
    if getattr(model_runner, "is_draft_worker", False):
        return (f"--attention-backend {backend_name} serves the target model's verify step, not the draft model's "
                "steps: pass --speculative-draft-attention-backend triton (or another SGLang backend)")
    name = getattr(algorithm, "name", str(algorithm))
    if name not in CHAIN_ALGORITHMS:
        return f"--attention-backend {backend_name} verifies chain drafts only, and {name} drafts a tree: {fix}"
    topk = getattr(resolve("sglang.srt.runtime_context:get_spec")(), "speculative_eagle_topk", 1) or 1
    if int(topk) != 1:
        return (f"--attention-backend {backend_name} verifies chain drafts only (no tree mask); "
                f"--speculative-eagle-topk {topk} drafts a tree: {fix}")
    return None


def verify_query_len(forward_batch) -> int:
    """Query rows per request of a target-verify batch (a chain: causal over its drafts)."""
    spec = forward_batch.spec_info
    n = getattr(spec, "draft_token_num", None) or getattr(spec, "num_tokens_per_req", None)
    topk = getattr(spec, "topk", 1) or 1
    if not n or int(topk) != 1:
        raise NotImplementedError(f"mla_plugin verifies chain drafts only (top-k 1); got top-k {topk}, {n} drafts")
    return int(n)


def _is_verify(mode) -> bool:
    return bool(getattr(mode, "is_target_verify", lambda: False)())


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
        self.graph: GraphBuffers | None = None  # set by init_cuda_graph_state / init_cpu_graph_state
        refusal = speculative_refusal(model_runner, self.backend_name)
        if refusal:
            raise ValueError(refusal)

    # -- per-forward metadata -------------------------------------------------------

    def init_forward_metadata(self, forward_batch) -> None:
        """Eager metadata (fresh tensors, host bounds from SGLang's host copies); under the CPU
        graph runner, a decode batch it replays fills the static buffers instead."""
        mode = forward_batch.forward_mode
        if self.graph is not None and self.graph.cpu_runner and mode.is_decode_or_idle() \
                and forward_batch.seq_lens.shape[0] <= self.graph.seq_lens.shape[0]:
            self._fill_graph_metadata(forward_batch, "replay")
            return
        seq_lens = forward_batch.seq_lens.to(torch.int64)  # [B]
        batch = seq_lens.shape[0]
        bound = self.req_to_token.shape[1]
        max_seq_len = _host_max(getattr(forward_batch, "seq_lens_cpu", None), bound)
        if mode.is_decode_or_idle():
            query_start_loc = torch.arange(batch + 1, dtype=torch.int64, device=seq_lens.device)
            max_query_len = 1
        elif _is_verify(mode):  # SGLang's seq_lens exclude the drafts; the seam's include them
            max_query_len = verify_query_len(forward_batch)
            query_start_loc = max_query_len * torch.arange(batch + 1, dtype=torch.int64, device=seq_lens.device)
            seq_lens = seq_lens + max_query_len
            max_seq_len = min(max_seq_len + max_query_len, bound)
        else:
            q_lens = forward_batch.extend_seq_lens.to(torch.int64)  # [B]
            query_start_loc = torch.nn.functional.pad(torch.cumsum(q_lens, 0), (1, 0))  # [B + 1]
            max_query_len = _host_max(getattr(forward_batch, "extend_seq_lens_cpu", None), bound)
        pages = -(-max_seq_len // self.page_size)
        rows = self.req_to_token[forward_batch.req_pool_indices]  # [B, max_context]
        block_table = rows[:, : pages * self.page_size : self.page_size] // self.page_size  # [B, pages]
        self.forward_metadata = LatentBatch(query_start_loc, seq_lens, block_table, max_query_len, max_seq_len)

    # -- graphs (static metadata, filled in place) ---------------------------------------

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, cpu_runner: bool = False):
        """Static buffers for batches up to ``max_bs`` requests, every page of a request."""
        pages = -(-self.req_to_token.shape[1] // self.page_size)
        device = self.req_to_token.device
        self.graph = GraphBuffers(
            seq_lens=torch.ones(max_bs, dtype=torch.int64, device=device),
            block_table=torch.zeros((max_bs, pages), dtype=self.req_to_token.dtype, device=device),
            query_starts={}, cpu_runner=cpu_runner,
        )

    def init_cpu_graph_state(self, max_bs: int, max_num_tokens: int):
        """SGLang's CPU graph runner: the same buffers; it replays through init_forward_metadata."""
        self.init_cuda_graph_state(max_bs, max_num_tokens, cpu_runner=True)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        """Before capture and before each replay: the batch (padded by the runner) into the static buffers."""
        self._fill_graph_metadata(forward_batch, "capture" if in_capture else "replay")

    def init_forward_metadata_in_graph(self, forward_batch):
        """Nothing recorded here: the static buffers are filled before the graph runs."""

    def init_forward_metadata_capture_cpu_graph(self, bs, num_tokens, req_pool_indices, seq_lens, out_cache_loc,
                                                encoder_lens, forward_mode, spec_info):
        from types import SimpleNamespace

        batch = SimpleNamespace(batch_size=bs, req_pool_indices=req_pool_indices, seq_lens=seq_lens,
                                forward_mode=forward_mode, spec_info=spec_info)
        self._fill_graph_metadata(batch, "capture")

    def _fill_graph_metadata(self, forward_batch, phase: str) -> None:
        """Static metadata for this batch, filled in place with device ops only: no host read."""
        graph, mode = self.graph, forward_batch.forward_mode
        if graph is None:
            raise RuntimeError(f"{self.backend_name}: graph metadata asked for before init_cuda_graph_state")
        if mode.is_decode_or_idle():
            q_len = 1
        elif _is_verify(mode):
            q_len = verify_query_len(forward_batch)
        else:
            raise NotImplementedError(f"--attention-backend {self.backend_name} captures decode and chain-verify "
                                      f"batches, not {getattr(mode, 'name', mode)}")
        bs = forward_batch.req_pool_indices.shape[0]
        page, width = self.page_size, graph.block_table.shape[1]
        rows = self.req_to_token[forward_batch.req_pool_indices]  # [bs, max_context]
        graph.block_table[:bs].copy_(rows[:, : width * page : page] // page)  # [bs, max_pages]
        graph.seq_lens[:bs].copy_(forward_batch.seq_lens[:bs])
        if q_len > 1:
            graph.seq_lens[:bs] += q_len  # the seam's L counts the drafts
        self.forward_metadata = LatentBatch(graph.query_start_loc(bs, q_len), graph.seq_lens[:bs],
                                            graph.block_table[:bs], q_len, width * page)
        key = (self.backend_name, phase, getattr(mode, "name", str(mode)))
        GRAPH_FILLS[key] = GRAPH_FILLS.get(key, 0) + 1
        if GRAPH_FILLS[key] == 1 and os.environ.get(TRACE_ENV):
            append_trace(TRACE_ENV, f"{self.backend_name} sglang graph-{phase} pid={os.getpid()} mode={key[2]} "
                         f"bs={bs} q_len={q_len} max_seq_len={width * page}")

    def get_cpu_graph_seq_len_fill_value(self):
        return 1

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
