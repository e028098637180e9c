"""Triton kernels for the paged latent attention seam (same function as ``paged_attention.py``).

Symbols as in docs/design.md and ``paged_attention.py``. Every query row (token) t is
handled on its own: it belongs to request b(t) and sees that request's first
``ctx_t = p_t + 1`` cached keys (its causal position plus one; 0 for a padding row),
so prefill, decode and mixed batches are one case and nothing is padded to the longest
request: a short request's programs end after its own keys.

A *stream* is one softmax (``paged_attention.py``): exact has one stream per head over
all local latent columns; partitioned / grouped have one per (local slice j, head that
reads j) over slice j's d_s columns plus the rope key. λ is folded into the query before
the kernels (λ q̃^(j) · ĉ^(j) = (λ q̃^(j)) · ĉ^(j)).

Kernels, in two schedules (``launch_config``'s ``schedule``):

Balanced (the default): ``_plan_rows`` (one program) computes per row b(t), ctx_t and a cost
c_t = ⌈ctx_t / BLOCK_N⌉ + ⌈ROW_COST_KEYS / BLOCK_N⌉ (key tiles plus the row's fixed work) and
the running sum ``cost_start [T + 1]``, on the device. ``_balanced_attention``: program (worker
g, slice j, block of BLOCK_H heads of stream j) over G workers (``choose_workers``: from the
GPU's size and the heads only, so a captured CUDA graph holds for any lengths); worker g owns
the cost units [g·W/G, (g+1)·W/G) of the total W and walks the rows they touch (unit
cost_start[t] + ⌈ROW_COST_KEYS / BLOCK_N⌉ + i is key tile i of row t). A row wholly inside
its share is normalised and written to the output; a row cut by a share boundary leaves a
piece (the worker's first or last row: at most two per worker, laid out as output rows, its
lse in float32), and ``_merge_pieces`` (program (t, h, j)) combines the pieces of each cut
row by their log-sum-exp, and writes 0 for heads that do not read slice j (grouped). Every
worker does the same work whatever the mix of lengths.

Split-K (the exact path over ranks, a given split count, and configurations where the
balanced row loop's registers do not fit): ``_token_rows`` finds b(t), ctx_t, then

``_split_attention`` (stage 1, split-K): program (t, split, slice j, block of BLOCK_H
heads of stream j). The split covers keys [split·K_s, (split+1)·K_s) ∩ [0, ctx_t) with
K_s = ⌈ctx_t / NUM_SPLITS⌉ rounded up to BLOCK_N. Online softmax over key tiles:

    s = τ (q̃^(j) · ĉ^(j)_n + q^R · k^R_n)       (or τ (S_n + q^R · k^R_n), S from the
                                                  all-reduced partial logits, exact TP)
    m' = max(m, max_n s), α = e^(m − m'), p_n = e^(s_n − m'),
    l' = α l + Σ_n p_n,  acc' = α acc + Σ_n p_n ĉ^(j)_n

with m = −inf handled explicitly (a fully masked tile leaves m = −inf and adds nothing);
computed in base 2 (s log2 e and ``exp2``), the LSE converted back to natural log
(``_attend_keys``, shared by both schedules). It stores the normalised partial output
acc / l (0 when l = 0) and lse = m + ln l (−inf when l = 0), in float32.

Key tiles: one block-table lookup per tile when BLOCK_N divides the block size (else a page
per key); with ``tma`` (fp8 tiles feeding mma.sync on Hopper, where pointer loads of 8-bit
tiles are not pipelined) the latent and rope tiles come as TMA box copies from descriptors
over the cache's ``[num_blocks · block_size, d_loc + d_R]`` rows.

``_merge_splits`` (stage 2): per (t, head, j): lse = ln Σ_s e^(lse_s), ō = Σ_s ō_s e^(lse_s − lse);
no key at all gives ō = 0, lse = −inf. Heads that do not read slice j (grouped) get 0.

``_partial_logits`` (exact softmax with the latent sharded over ranks): S_n =
q̃_local · ĉ_local,n (λ included) for the keys of one chunk of context, written to a
``[T, H, L_c]`` float32 buffer that the caller all-reduces before stage 1 reads it.

Bounded memory (exact softmax over ranks): the context is processed in chunks of
L_c keys (``logits_chunk_keys``: whole 64-key tiles, the most whose partial logits fit
``LOGITS_BUDGET_BYTES`` = 256 MiB); per chunk: partial logits, all-reduce, stage 1 over the
chunk's keys (the key window ``[key_start, key_end)``), stage 2 folding the chunk into a
float32 running result (ō, lse) by its log-sum-exp. The partial-logits workspace is
max(256 MiB, T·H·64·4 bytes), independent of the context length L: at most 256 MiB for
every T·H ≤ 8192·128 (128 heads and 8192 prefill tokens at 163,840 context: 2,560 chunks of
64 keys, 256 MiB; a 128-head decode of 64 requests: chunks of 8,192 keys, 256 MiB, where
the unchunked buffer would be 5 GiB). The other buffers (split partials, running result)
are O(T·H·d_loc), independent of L.

Loads are upcast to float32; the products run in float32 (``ieee``) for float32 inputs
and in Triton's interpreter, and in the cache dtype (bf16/fp16, float32 accumulation) on
a GPU. An fp8 cache (values / σ, ``latent_cache.py``) is read as stored: e4m3 values are
exact in fp16/fp32, so they are widened to fp16 for the products on a GPU (the query is
rounded to fp16 too; e4m3 → fp16 is the hardware's native conversion), and
σ (read from a device tensor) is folded into the logit scale (s = τ σ (q · k_stored)) and
into the output (ō = σ Σ_n p_n ĉ_stored,n); the partial-logits kernel multiplies its sums by σ.
Unused cache slots never reach the output: pointer loads mask them, and TMA copies (whole
boxes) are zeroed in the P·V operand, so NaN there cannot leak.
No tensor is read on the host: grid sizes come from shapes and host ints only, so the
launch can be captured in a CUDA graph (the split count depends only on the number of
query rows and heads).
"""

from collections import Counter
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from mla_plugin.ops.kernel_choice import interpreting, note_kernel_ran
from mla_plugin.ops.sharded_latent import LatentSlices

# Most splits of one query row's context (stage-1 programs per row and stream block).
MAX_SPLITS = 32

# Calls per schedule ("balanced": plan, workers, merge of pieces; "split": split-K), counted
# after their kernels were launched: the proof of which schedule ran.
SCHEDULE_CALLS: Counter = Counter()
# Stage-1 launches per way of reading key tiles ("tma" or "pointer"), counted after launch.
TILE_LOADS: Counter = Counter()

# Overrides of the launch configuration (keys of ``launch_config``'s result), for tuning
# runs (benchmarks/gpu_decode.py --sweep) and tests; empty in normal use.
TUNING: dict = {}


@triton.jit
def _find_rows(query_start_ptr, seq_lens_ptr, t, row_ok, batch, steps, BLOCK_T: tl.constexpr):
    """Query rows t ``[BLOCK_T]``: request b(t), the last b with query_start[b] <= t (a binary
    search over query_start [B + 1] in ``steps`` = ceil(log2 B) halvings), and context ctx_t =
    seq_len_b - (query_start[b + 1] - t) + 1 (0 for a padding row t >= query_start[B])."""
    lo = tl.zeros([BLOCK_T], tl.int32)
    hi = lo + batch - 1
    for _ in range(steps):
        mid = (lo + hi) // 2
        after = tl.load(query_start_ptr + mid + 1, mask=row_ok, other=0) > t  # request mid ends after row t
        hi = tl.where(after & (lo < hi), mid, hi)
        lo = tl.where(after | (lo >= hi), lo, mid + 1)
    end = tl.load(query_start_ptr + lo + 1, mask=row_ok, other=0).to(tl.int32)
    context = tl.load(seq_lens_ptr + lo, mask=row_ok, other=0).to(tl.int32) - (end - t) + 1
    padding = t >= tl.load(query_start_ptr + batch).to(tl.int32)
    return lo, tl.where(padding, 0, tl.maximum(context, 0))


@triton.jit
def _token_rows(query_start_ptr, seq_lens_ptr, request_ptr, context_ptr, tokens, batch, steps,
                BLOCK_T: tl.constexpr):
    """b(t) and ctx_t (``_find_rows``) into int32 ``[T]`` buffers, BLOCK_T rows per program: one
    small launch instead of a dozen torch kernels per call (the split-K schedule)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] rows
    row_ok = t < tokens
    request, context = _find_rows(query_start_ptr, seq_lens_ptr, t, row_ok, batch, steps, BLOCK_T)
    tl.store(request_ptr + t, request, mask=row_ok)
    tl.store(context_ptr + t, context, mask=row_ok)


@triton.jit
def _plan_rows(query_start_ptr, seq_lens_ptr, request_ptr, context_ptr, cost_start_ptr, tokens, batch, steps,
               row_cost, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    """The balanced schedule's plan, in one program: b(t) and ctx_t, and the running cost
    ``cost_start [T + 1]`` int32, where row t costs ⌈ctx_t / BLOCK_N⌉ key tiles plus
    ``row_cost`` (its fixed work: queries, output, merge) and occupies the cost units
    ``[cost_start[t], cost_start[t + 1])``. Read from device tensors only (graph-safe)."""
    carry = tl.program_id(0) * 0  # cost of the rows before this block (int32)
    tl.store(cost_start_ptr, carry)
    for first in range(0, tokens, BLOCK_T):
        t = first + tl.arange(0, BLOCK_T)  # [BLOCK_T] rows
        row_ok = t < tokens
        request, context = _find_rows(query_start_ptr, seq_lens_ptr, t, row_ok, batch, steps, BLOCK_T)
        tl.store(request_ptr + t, request, mask=row_ok)
        tl.store(context_ptr + t, context, mask=row_ok)
        cost = tl.where(row_ok, tl.cdiv(context, BLOCK_N) + row_cost, 0)  # [BLOCK_T]
        tl.store(cost_start_ptr + t + 1, carry + tl.cumsum(cost, 0), mask=row_ok)
        carry += tl.sum(cost, 0)


@triton.jit
def _load_queries(q_latent_ptr, q_rope_ptr, t64, heads, head_ok, j, d, d_ok, dr, dr_ok,
                  stride_qt, stride_qh, stride_rt, stride_rh, d_s, cache_dtype,
                  LOGITS_IN: tl.constexpr, LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr):
    """Row t's queries of one stream block: q̃ ``[BLOCK_H, BLOCK_DS]`` (slice j's columns; not
    read with LOGITS_IN) and q^R ``[BLOCK_H, BLOCK_DR]``, in the dtype of the tile products."""
    q = tl.zeros([1, 1], tl.float32)
    if not LOGITS_IN:
        q = tl.load(q_latent_ptr + t64 * stride_qt + heads[:, None] * stride_qh + j * d_s + d[None, :],
                    mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_DS]
    q_r = tl.load(q_rope_ptr + t64 * stride_rt + heads[:, None] * stride_rh + dr[None, :],
                  mask=head_ok[:, None] & dr_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_H, BLOCK_DR]
    if LOW_PRECISION:  # products in the cache dtype (an fp8 cache: in fp16, e4m3's native widening)
        if IS_FP8:
            q_r = q_r.to(tl.float16)
            if not LOGITS_IN:
                q = q.to(tl.float16)
        else:
            q_r = q_r.to(cache_dtype)
            if not LOGITS_IN:
                q = q.to(cache_dtype)
    return q, q_r


# The online-softmax loop over one row's key tiles keeps its running state (m, l, acc) in
# registers; both schedules (split-K and balanced) inline it.
@triton.jit
def _attend_keys(q, q_r, cache_ptr, latent_desc, rope_desc, block_table_ptr, logits_ptr, kv_scale,
                 request, t64, heads, head_ok, j, d, d_ok, dr, dr_ok, start, end, key_start, scale_log2,
                 stride_cache_block, stride_cache_slot, stride_table, stride_lt, stride_lh,
                 block_size, d_loc, d_s,
                 LOGITS_IN: tl.constexpr, LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr,
                 BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DR: tl.constexpr,
                 EVEN_DS: tl.constexpr, EVEN_DR: tl.constexpr, PAGED_TILE: tl.constexpr, TMA_TILE: tl.constexpr):
    """Keys ``[start, end)`` of one row (``start`` a multiple of BLOCK_N from ``key_start``):
    the running max m ``[BLOCK_H]`` (base 2), the sum of weights l and acc = Σ p ĉ_stored
    ``[BLOCK_H, BLOCK_DS]``."""
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DS], tl.float32)
    table_row = block_table_ptr + request.to(tl.int64) * stride_table
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        key_ok = pos < end
        if TMA_TILE:  # tensor-memory copies of whole boxes (PAGED_TILE, EVEN_DS, EVEN_DR; descriptors over
            # the cache's [num_blocks * block_size, d_loc + d_R] rows): keys past `end` are loaded too
            # and masked below (never multiplied into the output)
            slot0 = tl.load(table_row + first // block_size) * block_size + first % block_size
            latent = latent_desc.load([slot0, j * d_s])  # [BLOCK_N, BLOCK_DS]
            rope = rope_desc.load([slot0, d_loc])  # [BLOCK_N, BLOCK_DR]
        else:
            if PAGED_TILE:  # the tile lies in one page (BLOCK_N divides the block size): one table lookup
                page = tl.load(table_row + first // block_size)
                row = page.to(tl.int64) * stride_cache_block + (
                    (first % block_size + tl.arange(0, BLOCK_N)) * stride_cache_slot)  # [BLOCK_N]
            else:  # a page per key (block size below BLOCK_N)
                block = tl.load(table_row + pos // block_size, mask=key_ok, other=0).to(tl.int64)
                row = block * stride_cache_block + (pos % block_size).to(tl.int64) * stride_cache_slot  # [BLOCK_N]
            latent, rope = _load_tile(cache_ptr, row, key_ok, j, d, d_ok, dr, dr_ok, d_loc, d_s, EVEN_DS, EVEN_DR)
        if IS_FP8 and LOW_PRECISION:  # stored values, exactly, in fp16; σ is folded in
            latent = latent.to(tl.float16)
            rope = rope.to(tl.float16)
        if LOW_PRECISION:
            s = tl.dot(q_r, tl.trans(rope))  # [BLOCK_H, BLOCK_N]
        else:
            latent = latent.to(tl.float32)
            s = tl.dot(q_r, tl.trans(rope.to(tl.float32)), input_precision="ieee")
        if LOGITS_IN:
            if IS_FP8:  # the summed partial logits already carry σ; the rope logit gets it here
                s = s * kv_scale
            s += tl.load(logits_ptr + t64 * stride_lt + heads[:, None] * stride_lh + (pos - key_start)[None, :],
                         mask=head_ok[:, None] & key_ok[None, :], other=0.0)
        elif LOW_PRECISION:
            s += tl.dot(q, tl.trans(latent))
        else:
            s += tl.dot(q, tl.trans(latent), input_precision="ieee")
        # In base 2 inside the loop (exp2 is the fast path): s2 = s log2(e), m likewise.
        s = tl.where(key_ok[None, :], s * scale_log2, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])  # 0 where masked
        alpha = tl.exp2(m - m_safe)  # 0 while m = -inf
        total = total * alpha + tl.sum(p, axis=1)
        if TMA_TILE:  # keys past `end` (unused cache memory, NaN possibly): 0 in the P·V operand only;
            latent = tl.where(key_ok[:, None], latent, 0.0)  # their logits are already -inf above
        if LOW_PRECISION:
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, latent, input_precision="ieee")
        m = m_new
    return m, total, acc


@triton.jit
def _load_tile(cache_ptr, row, key_ok, j, d, d_ok, dr, dr_ok, d_loc, d_s, EVEN_DS: tl.constexpr,
               EVEN_DR: tl.constexpr):
    """Latent ``[BLOCK_N, BLOCK_DS]`` (slice j) and rope ``[BLOCK_N, BLOCK_DR]`` tiles of the cache
    rows ``row`` ``[BLOCK_N]`` by masked pointer loads (keys past the context read 0)."""
    if EVEN_DS:
        latent = tl.load(cache_ptr + row[:, None] + j * d_s + d[None, :], mask=key_ok[:, None], other=0.0)
    else:
        latent = tl.load(cache_ptr + row[:, None] + j * d_s + d[None, :], mask=key_ok[:, None] & d_ok[None, :],
                         other=0.0)
    if EVEN_DR:
        rope = tl.load(cache_ptr + row[:, None] + d_loc + dr[None, :], mask=key_ok[:, None], other=0.0)
    else:
        rope = tl.load(cache_ptr + row[:, None] + d_loc + dr[None, :], mask=key_ok[:, None] & dr_ok[None, :],
                       other=0.0)
    return latent, rope


@triton.jit
def _column_masks(d, dr, d_s, d_r, BLOCK_DS: tl.constexpr, BLOCK_DR: tl.constexpr,
                  EVEN_DS: tl.constexpr, EVEN_DR: tl.constexpr):
    """Masks along a row; constant when the widths fill their blocks (loads stay vectorised)."""
    if EVEN_DS:
        d_ok = d < BLOCK_DS
    else:
        d_ok = d < d_s
    if EVEN_DR:
        dr_ok = dr < BLOCK_DR
    else:
        dr_ok = dr < d_r
    return d_ok, dr_ok


@triton.jit
def _logit_scale_log2(scale, kv_scale_ptr, IS_FP8: tl.constexpr, FOLD_SIGMA: tl.constexpr):
    """τ log2(e), times σ of an fp8 cache when FOLD_SIGMA (logits and outputs of the stored values
    are σ times smaller), and σ itself (1.0 without fp8)."""
    scale_log2 = scale * 1.4426950408889634
    kv_scale = 1.0
    if IS_FP8:
        kv_scale = tl.load(kv_scale_ptr)
        if FOLD_SIGMA:
            scale_log2 = scale_log2 * kv_scale
    return scale_log2, kv_scale


@triton.jit
def _stream_block(pid, head_blocks, num_slices, heads_per_stream, head_base, head_step, BLOCK_H: tl.constexpr):
    """Program ``pid`` = (rest · num_slices + j) · head_blocks + head_block, head blocks fastest
    (a KV tile's second read by the next head block can hit L2): the rest (the split and row,
    or the worker), slice j, and its block's heads ``[BLOCK_H]``: local index in the stream,
    mask, global index."""
    head_block = pid % head_blocks
    j = (pid // head_blocks) % num_slices
    local = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    return pid // (head_blocks * num_slices), j, local, local < heads_per_stream, head_base + j * head_step + local


@triton.jit
def _normalise(m, total, acc, kv_scale, IS_FP8: tl.constexpr):
    """The normalised output acc / l (σ applied; 0 when l = 0) and lse = m ln 2 + ln l (−inf when l = 0)."""
    has_keys = total > 0.0
    if IS_FP8:
        acc = acc * kv_scale  # Σ p ĉ_stored · σ
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, total, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m * 0.6931471805599453 + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _split_attention(
    q_latent_ptr, q_rope_ptr,  # [T, H, d_loc], [T, H, d_R]
    cache_ptr,  # [num_blocks, block_size, d_loc + d_R]
    latent_desc, rope_desc,  # TMA descriptors over the cache rows (TMA_TILE; else unused)
    block_table_ptr,  # [B, max_blocks]
    token_request_ptr, token_context_ptr,  # [T] int32: b(t), ctx_t
    logits_ptr,  # [T, H, L] float32 (LOGITS_IN only)
    partial_out_ptr, partial_lse_ptr,  # [T, H, S, NUM_SPLITS, D_S], [T, H, S, NUM_SPLITS] float32
    # (one split and one slice: these are the output [T, H, d_loc], query dtype, and lse [T, H]: no merge)
    kv_scale_ptr,  # [1] float32: σ of an fp8 cache (IS_FP8 only)
    scale,
    stride_qt, stride_qh, stride_rt, stride_rh,
    stride_cache_block, stride_cache_slot, stride_table,
    stride_lt, stride_lh,
    num_heads, num_slices, heads_per_stream, head_base, head_step, head_blocks,
    num_splits, block_size, d_loc, d_s, d_r,
    key_start, key_end,  # the key window [key_start, key_end) of this launch (a chunk of context)
    LOGITS_IN: tl.constexpr, LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DR: tl.constexpr,
    EVEN_DS: tl.constexpr, EVEN_DR: tl.constexpr, PAGED_TILE: tl.constexpr, TMA_TILE: tl.constexpr,
):
    # (the summed partial logits carry σ already: LOGITS_IN folds it into the rope logit only)
    scale_log2, kv_scale = _logit_scale_log2(scale, kv_scale_ptr, IS_FP8, not LOGITS_IN)
    rest, j, local, head_ok, heads = _stream_block(tl.program_id(0), head_blocks, num_slices, heads_per_stream,
                                                   head_base, head_step, BLOCK_H)
    split = rest % num_splits
    t = rest // num_splits
    d = tl.arange(0, BLOCK_DS)
    dr = tl.arange(0, BLOCK_DR)
    d_ok, dr_ok = _column_masks(d, dr, d_s, d_r, BLOCK_DS, BLOCK_DR, EVEN_DS, EVEN_DR)

    request = tl.load(token_request_ptr + t)
    context = tl.load(token_context_ptr + t)
    last = tl.minimum(context, key_end)  # keys [key_start, last) are this row's in the window
    span = tl.maximum(last - key_start, 0)
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = key_start + split * per_split
    end = tl.minimum(start + per_split, last)

    t64 = t.to(tl.int64)
    q, q_r = _load_queries(q_latent_ptr, q_rope_ptr, t64, heads, head_ok, j, d, d_ok, dr, dr_ok,
                           stride_qt, stride_qh, stride_rt, stride_rh, d_s, cache_ptr.dtype.element_ty,
                           LOGITS_IN, LOW_PRECISION, IS_FP8)
    m, total, acc = _attend_keys(q, q_r, cache_ptr, latent_desc, rope_desc, block_table_ptr, logits_ptr, kv_scale,
                                 request, t64, heads, head_ok, j, d, d_ok, dr, dr_ok, start, end, key_start,
                                 scale_log2, stride_cache_block, stride_cache_slot, stride_table, stride_lt,
                                 stride_lh, block_size, d_loc, d_s,
                                 LOGITS_IN, LOW_PRECISION, IS_FP8, BLOCK_H, BLOCK_N, BLOCK_DS, BLOCK_DR,
                                 EVEN_DS, EVEN_DR, PAGED_TILE, TMA_TILE)
    out, lse = _normalise(m, total, acc, kv_scale, IS_FP8)
    slot = ((t64 * num_heads + heads) * num_slices + j) * num_splits + split  # [BLOCK_H]
    tl.store(partial_out_ptr + slot[:, None] * d_s + d[None, :], out.to(partial_out_ptr.dtype.element_ty),
             mask=head_ok[:, None] & d_ok[None, :])  # one split, one slice: slot * d_s is out's [T, H, d_loc] row
    tl.store(partial_lse_ptr + slot, lse, mask=head_ok)


@triton.jit
def _worker_range(g, total_cost, workers):
    """Worker g's cost units ``[lo, hi)``: an equal share of the batch's ``total_cost`` (int64)."""
    total = total_cost.to(tl.int64)
    return g * total // workers, (g + 1) * total // workers


@triton.jit
def _balanced_attention(
    q_latent_ptr, q_rope_ptr,  # [T, H, d_loc], [T, H, d_R]
    cache_ptr,  # [num_blocks, block_size, d_loc + d_R]
    latent_desc, rope_desc,  # TMA descriptors over the cache rows (TMA_TILE; else unused)
    block_table_ptr,  # [B, max_blocks]
    token_request_ptr, token_context_ptr, cost_start_ptr,  # [T], [T], [T + 1] int32 (``_plan_rows``)
    out_ptr, lse_ptr,  # [T, H, d_loc] query dtype, [T, H] float32 (WRITE_LSE only)
    piece_out_ptr, piece_lse_ptr,  # [G·2, H, d_loc] as out, [G·2, H, S] float32: the rows a worker shares
    kv_scale_ptr,  # [1] float32: σ of an fp8 cache (IS_FP8 only)
    scale,
    stride_qt, stride_qh, stride_rt, stride_rh,
    stride_cache_block, stride_cache_slot, stride_table, stride_ot, stride_oh,
    tokens, num_heads, num_slices, heads_per_stream, head_base, head_step, head_blocks,
    workers, row_cost, steps, block_size, d_loc, d_s, d_r,
    WRITE_LSE: tl.constexpr, LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DR: tl.constexpr,
    EVEN_DS: tl.constexpr, EVEN_DR: tl.constexpr, PAGED_TILE: tl.constexpr, TMA_TILE: tl.constexpr,
):
    # Program (worker g, slice j, block of BLOCK_H heads of stream j). Worker g owns the cost
    # units [lo, hi) of the concatenated rows and walks the rows they touch: a row wholly
    # inside is written to out / lse; a row cut by lo or hi leaves a piece (slot 0: the
    # worker's first row, slot 1: its last) that ``_merge_pieces`` combines.
    scale_log2, kv_scale = _logit_scale_log2(scale, kv_scale_ptr, IS_FP8, True)
    g, j, local, head_ok, heads = _stream_block(tl.program_id(0), head_blocks, num_slices, heads_per_stream,
                                                head_base, head_step, BLOCK_H)
    d = tl.arange(0, BLOCK_DS)
    dr = tl.arange(0, BLOCK_DR)
    d_ok, dr_ok = _column_masks(d, dr, d_s, d_r, BLOCK_DS, BLOCK_DR, EVEN_DS, EVEN_DR)

    lo, hi = _worker_range(g, tl.load(cost_start_ptr + tokens), workers)
    # The first row: the last t with cost_start[t] <= lo (binary search over [0, T - 1]).
    t_lo = g * 0
    t_hi = t_lo + tokens - 1
    for _ in range(steps):
        mid = (t_lo + t_hi + 1) // 2
        before = tl.load(cost_start_ptr + mid).to(tl.int64) <= lo
        t_lo = tl.where(before, mid, t_lo)
        t_hi = tl.where(before, t_hi, mid - 1)
    t = t_lo
    row_start = tl.load(cost_start_ptr + t).to(tl.int64)
    while (t < tokens) & (row_start < hi):
        row_end = tl.load(cost_start_ptr + t + 1).to(tl.int64)
        context = tl.load(token_context_ptr + t)
        tiles = tl.cdiv(context, BLOCK_N)
        # Units [row_start, row_start + row_cost) are the row's fixed work; unit row_start +
        # row_cost + i is key tile i.
        first_tile = tl.maximum(lo - row_start - row_cost, 0)
        last_tile = tl.minimum(hi - row_start - row_cost, tiles)
        start = (first_tile * BLOCK_N).to(tl.int32)
        end = tl.minimum(last_tile * BLOCK_N, context).to(tl.int32)  # empty when end <= start
        t64 = t.to(tl.int64)
        # Column indices of this row's query loads and stores: 0 + the arange at run time, but
        # depending on the row, so that the compiler does not hoist their [BLOCK_H, BLOCK_DS]
        # offsets out of the row loop (they would stay in registers through the key loop).
        row_zero = tl.minimum(context, 0) * 16
        row_local = local + row_zero
        row_head_ok = row_local < heads_per_stream
        row_heads = head_base + j * head_step + row_local
        d_row = d + row_zero
        dr_row = dr + row_zero
        d_row_ok, dr_row_ok = _column_masks(d_row, dr_row, d_s, d_r, BLOCK_DS, BLOCK_DR, EVEN_DS, EVEN_DR)
        q, q_r = _load_queries(q_latent_ptr, q_rope_ptr, t64, row_heads, row_head_ok, j, d_row, d_row_ok, dr_row,
                               dr_row_ok, stride_qt, stride_qh, stride_rt, stride_rh, d_s,
                               cache_ptr.dtype.element_ty, False, LOW_PRECISION, IS_FP8)
        m, total, acc = _attend_keys(q, q_r, cache_ptr, latent_desc, rope_desc, block_table_ptr, q_latent_ptr,
                                     kv_scale,
                                     tl.load(token_request_ptr + t), t64, heads, head_ok, j, d, d_ok, dr, dr_ok,
                                     start, end, 0, scale_log2, stride_cache_block, stride_cache_slot,
                                     stride_table, 0, 0, block_size, d_loc, d_s,
                                     False, LOW_PRECISION, IS_FP8, BLOCK_H, BLOCK_N, BLOCK_DS, BLOCK_DR,
                                     EVEN_DS, EVEN_DR, PAGED_TILE, TMA_TILE)
        out, lse = _normalise(m, total, acc, kv_scale, IS_FP8)
        # One store: a row wholly inside [lo, hi) goes to out, a cut row to this worker's piece
        # (slot 0: its first row, slot 1: its last), laid out as out's rows.
        whole = (lo <= row_start) & (row_end <= hi)
        piece = g.to(tl.int64) * 2 + tl.where(row_start <= lo, 0, 1)
        dest = tl.where(whole, out_ptr + t64 * stride_ot, piece_out_ptr + piece * stride_ot)
        tl.store(dest + (row_heads * stride_oh + j * d_s)[:, None] + d_row[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_head_ok[:, None] & d_row_ok[None, :])
        lse_dest = tl.where(whole, lse_ptr + t64 * num_heads, piece_lse_ptr + piece * num_heads * num_slices)
        if WRITE_LSE:  # one slice (the exact softmax): lse [T, H] and the pieces' [G·2, H, 1] alike
            tl.store(lse_dest + row_heads, lse, mask=row_head_ok)
        else:
            tl.store(lse_dest + row_heads * num_slices + j, lse,
                     mask=tl.where(row_head_ok, (row_start < lo) | (hi < row_end), False))
        t += 1
        row_start = row_end


@triton.jit
def _merge_pieces(
    cost_start_ptr,  # [T + 1] int32 (``_plan_rows``)
    piece_out_ptr, piece_lse_ptr,  # [G·2, H, d_loc] as out (same strides), [G·2, H, S] float32
    out_ptr, lse_ptr,  # [T, H, d_loc] query dtype, [T, H] float32 (WRITE_LSE only)
    stride_ot, stride_oh,
    tokens, num_heads, num_slices, heads_per_stream, head_base, head_step, workers, d_s,
    WRITE_LSE: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    # Program (t, h, j): a row that one worker held whole is already written; a row cut over
    # workers g_first..g_last gets the log-sum-exp merge of their pieces; a head that does
    # not read slice j (grouped) gets 0 there.
    pid = tl.program_id(0)
    j = pid % num_slices
    h = (pid // num_slices) % num_heads
    t = pid // (num_slices * num_heads)
    local = h - (head_base + j * head_step)
    in_stream = (local >= 0) & (local < heads_per_stream)
    outside = (local < 0) | (local >= heads_per_stream)
    total_cost = tl.load(cost_start_ptr + tokens).to(tl.int64)
    row_start = tl.load(cost_start_ptr + t).to(tl.int64)
    row_end = tl.load(cost_start_ptr + t + 1).to(tl.int64)
    # The worker holding unit u is the last g with g·W // G <= u: ⌈(u + 1) G / W⌉ − 1.
    g_first = ((row_start + 1) * workers + total_cost - 1) // total_cost - 1
    g_last = (row_end * workers + total_cost - 1) // total_cost - 1
    pieces = tl.where(in_stream & (g_last > g_first), g_last - g_first + 1, 0)
    d = tl.arange(0, BLOCK_DS)
    d_ok = d < d_s
    peak = tl.full([], float("-inf"), tl.float32)
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_DS], tl.float32)
    for g in range(g_first, g_first + pieces):
        lo, _ = _worker_range(g, total_cost, workers)
        piece = g * 2 + tl.where(row_start <= lo, 0, 1)
        lse_g = tl.load(piece_lse_ptr + (piece * num_heads + h) * num_slices + j)
        new_peak = tl.maximum(peak, lse_g)
        safe = tl.where(new_peak == float("-inf"), 0.0, new_peak)
        earlier, weight = tl.exp(peak - safe), tl.exp(lse_g - safe)  # 0 for an empty piece
        total = total * earlier + weight
        acc = acc * earlier + weight * tl.load(piece_out_ptr + piece * stride_ot + h * stride_oh + j * d_s + d,
                                               mask=d_ok, other=0.0).to(tl.float32)
        peak = new_peak
    has_keys = total > 0.0
    out = tl.where(has_keys, acc / tl.where(has_keys, total, 1.0), 0.0)
    write = tl.where(d_ok, (pieces > 0) | outside, False)  # [BLOCK_DS] (tl.where: see _balanced_attention)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + j * d_s + d, out.to(out_ptr.dtype.element_ty),
             mask=write)
    if WRITE_LSE:
        lse = tl.where(has_keys, tl.where(peak == float("-inf"), 0.0, peak) + tl.log(tl.where(has_keys, total, 1.0)),
                       float("-inf"))
        tl.store(lse_ptr + t.to(tl.int64) * num_heads + h, lse, mask=(pieces > 0) | outside)


@triton.jit
def _merge_splits(
    partial_out_ptr, partial_lse_ptr,  # [T, H, S, NUM_SPLITS, D_S], [T, H, S, NUM_SPLITS] float32
    out_ptr, lse_ptr,  # [T, H, S * D_S] (query dtype; float32 with ACCUMULATE), [T, H] float32 (WRITE_LSE only)
    stride_ot, stride_oh,
    num_heads, num_slices, heads_per_stream, head_base, head_step, num_splits, d_s,
    WRITE_LSE: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DS: tl.constexpr,
):
    # ACCUMULATE (one slice, exact chunks; WRITE_LSE): (out, lse) already hold the result of
    # earlier keys, which is merged in as one more split.
    pid = tl.program_id(0)
    j = pid % num_slices
    h = (pid // num_slices) % num_heads
    t = pid // (num_slices * num_heads)
    local = h - (head_base + j * head_step)
    in_stream = (local >= 0) & (local < heads_per_stream)  # grouped: does head h read slice j?
    used_splits = tl.where(in_stream, num_splits, 0)  # 0: nothing to merge, the output is 0

    base = ((t.to(tl.int64) * num_heads + h) * num_slices + j) * num_splits
    splits = tl.arange(0, BLOCK_SPLITS)
    lses = tl.load(partial_lse_ptr + base + splits, mask=splits < used_splits,
                   other=float("-inf"))  # [BLOCK_SPLITS]
    peak = tl.max(lses, axis=0)
    d = tl.arange(0, BLOCK_DS)
    d_ok = d < d_s
    out_row = out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + j * d_s + d
    if ACCUMULATE:
        earlier_lse = tl.load(lse_ptr + t.to(tl.int64) * num_heads + h)
        peak = tl.maximum(peak, earlier_lse)
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp(lses - peak), axis=0)
    acc = tl.zeros([BLOCK_DS], tl.float32)
    if ACCUMULATE:
        earlier_weight = tl.exp(earlier_lse - peak)  # 0 while no earlier key
        total += earlier_weight
        acc += earlier_weight * tl.load(out_row, mask=d_ok, other=0.0)
    for split in range(0, used_splits):
        lse_s = tl.load(partial_lse_ptr + base + split)
        weight = tl.exp(lse_s - peak)  # 0 for an empty split (its output is 0 too)
        acc += weight * tl.load(partial_out_ptr + (base + split) * d_s + d, mask=d_ok, other=0.0)
    has_keys = total > 0.0
    out = tl.where(has_keys, acc / tl.where(has_keys, total, 1.0), 0.0)
    tl.store(out_row, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if WRITE_LSE:
        lse = tl.where(has_keys, peak + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + t.to(tl.int64) * num_heads + h, lse)


@triton.jit
def _partial_logits(
    q_latent_ptr,  # [T, H, d_loc] (λ folded in)
    cache_ptr, block_table_ptr, token_request_ptr, token_context_ptr,
    logits_ptr,  # [T, H, L] float32
    kv_scale_ptr,  # [1] float32: σ of an fp8 cache (IS_FP8 only)
    stride_qt, stride_qh, stride_cache_block, stride_cache_slot, stride_table, stride_lt, stride_lh,
    num_heads, head_blocks, key_blocks, block_size, d_loc, key_start, length,  # keys [key_start, +length)
    LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    head_block = pid % head_blocks
    key_block = (pid // head_blocks) % key_blocks
    t = pid // (head_blocks * key_blocks)
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    request = tl.load(token_request_ptr + t)
    context = tl.load(token_context_ptr + t)
    offset = key_block * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] within the chunk
    pos = key_start + offset  # key positions
    key_ok = (pos < context) & (offset < length)
    block = tl.load(block_table_ptr + request.to(tl.int64) * stride_table + pos // block_size,
                    mask=key_ok, other=0).to(tl.int64)
    row = block * stride_cache_block + (pos % block_size).to(tl.int64) * stride_cache_slot  # [BLOCK_N]
    t64 = t.to(tl.int64)
    s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    for first in range(0, d_loc, BLOCK_D):
        d = first + tl.arange(0, BLOCK_D)
        d_ok = d < d_loc
        q = tl.load(q_latent_ptr + t64 * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=head_ok[:, None] & d_ok[None, :], other=0.0)
        latent = tl.load(cache_ptr + row[:, None] + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if IS_FP8:  # stored values, exactly (fp16 for low-precision products); σ is applied to the sum below
            latent = latent.to(tl.float16 if LOW_PRECISION else tl.float32)
        if LOW_PRECISION:
            s += tl.dot(q.to(latent.dtype), tl.trans(latent))
        else:
            s += tl.dot(q.to(tl.float32), tl.trans(latent.to(tl.float32)), input_precision="ieee")
    if IS_FP8:
        s = s * tl.load(kv_scale_ptr)
    # Keys past the context get 0 (never read by stage 1); the whole buffer row is defined.
    tl.store(logits_ptr + t64 * stride_lt + heads[:, None] * stride_lh + offset[None, :], s,
             mask=head_ok[:, None] & (offset < length)[None, :])


def _check_interpreter(device: torch.device) -> None:
    """On CPU tensors the kernels must have been defined by Triton's interpreter."""
    if device.type == "cuda":
        return
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(_split_attention, InterpretedFunction) or not isinstance(tl.standard.cdiv, InterpretedFunction):
        raise RuntimeError(
            "the Triton kernels were compiled for a GPU, not for Triton's CPU interpreter: TRITON_INTERPRET=1 "
            "must be set before triton is first imported (start the process with it)"
        )


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(max(n, 1)))


# float32 partial logits of the exact softmax over ranks: bytes per chunk of context
# (module docstring, "Bounded memory"); the chunks are whole tiles of LOGITS_KEY_TILE keys.
LOGITS_BUDGET_BYTES = 256 << 20
LOGITS_KEY_TILE = 64
NO_KEY_LIMIT = 2**31 - 1  # key_end of a launch over the whole context


def logits_chunk_keys(tokens: int, heads: int, length: int, budget_bytes: int | None = None) -> int:
    """Keys per chunk of the partial logits: the most whole 64-key tiles whose float32
    ``[T, H, keys]`` buffer fits ``budget_bytes`` (None: ``LOGITS_BUDGET_BYTES``; at least one
    tile), at most ``length``. From shapes and host ints only, so every rank chunks alike."""
    budget_bytes = LOGITS_BUDGET_BYTES if budget_bytes is None else budget_bytes
    per_tile = max(1, tokens * heads * 4 * LOGITS_KEY_TILE)
    return max(1, min(length, max(1, budget_bytes // per_tile) * LOGITS_KEY_TILE))


def gpu_launch_config(d_s: int, heads_per_stream: int, fp8: bool = False) -> dict:
    """Stage-1 tile sizes, launch options, schedule and tile loads on a GPU, chosen from a static
    compile for sm_90 with Triton 3.6 (the GPU machine's) and 3.9 (``benchmarks/static_report.py``,
    2026-12-07): every choice below compiles without spilling and with 2-3 KV buffers on both.

    - ``num_stages`` 5: the pipeliner double- or triple-buffers the KV tiles (at 2-4 it made one
      buffer at 16 heads and waited for every copy at the top of each tile at 128 heads);
    - ``block_n`` 16 at d_s 512 and at 64+ heads keeps the registers low; 8 warps at 16 heads for
      bf16 (3.6: 111 registers where 4 warps took 193);
    - the balanced schedule's row loop needs about 30 more registers than split-K; beside the
      [64, 512] float32 accumulator of 64 heads at d_s 512, and for fp8 at 64+ heads, it
      spills, so split-K stays there;
    - an fp8 tile feeding mma.sync (16 heads) is loaded synchronously by pointer loads (no 8-bit
      shared layout serves it as K and as V); TMA copies (``tma``, Hopper and later) pipeline it.

    Not yet timed on a GPU."""
    if heads_per_stream >= 64:  # many heads: one KV tile feeds 64 heads (wgmma)
        return dict(block_h=64, block_n=16, num_warps=8, num_stages=5,
                    schedule="split" if d_s > 256 or fp8 else "balanced")
    if d_s > 256:
        return dict(block_h=16, block_n=16, num_warps=4 if fp8 else 8, num_stages=5, schedule="balanced", tma=fp8)
    return dict(block_h=16, block_n=32, num_warps=8, num_stages=5, schedule="balanced", tma=fp8)


def launch_config(d_s: int, heads_per_stream: int, device: torch.device, fp8: bool = False) -> dict:
    """Stage-1 tile sizes, launch options, ``schedule`` ("balanced", or "split" for split-K; the
    exact path over ranks is always split-K) and ``tma`` (TMA tile copies, compute capability 9+);
    ``TUNING`` overrides them (tests set it to ``gpu_launch_config``'s tiles to run a GPU
    configuration in the interpreter)."""
    if device.type != "cuda":  # the interpreter: large tiles mean fewer interpreted steps
        config = dict(block_h=16, block_n=64, num_warps=4, num_stages=1, schedule="balanced")
    else:
        config = gpu_launch_config(d_s, heads_per_stream, fp8)
        if config.get("tma") and torch.cuda.get_device_capability(device)[0] < 9:
            config["tma"] = False  # no tensor-memory accelerator before Hopper: pointer loads
    config.update(TUNING)
    return config


# A row's fixed work in the balanced schedule (its queries, output and merge), in key tiles'
# worth of keys: a short row still costs about this much.
ROW_COST_KEYS = 64


def choose_workers(stream_programs: int, device: torch.device) -> int:
    """Workers of the balanced schedule per (slice, head block): about four programs per SM
    (from the GPU's size only, so a captured CUDA graph stays valid for any lengths)."""
    if device.type != "cuda":
        return 3  # the interpreter: a few workers, so that rows are cut and merged
    return workers_on_gpu(torch.cuda.get_device_properties(device).multi_processor_count, stream_programs)


def workers_on_gpu(sms: int, stream_programs: int) -> int:
    """``choose_workers`` on a GPU with ``sms`` SMs (also what the static report assumes)."""
    return max(1, 4 * sms // max(1, stream_programs))


def choose_num_splits(tokens: int, stream_programs: int, device: torch.device) -> int:
    """Splits of each row's context: enough programs to fill the GPU (from T and heads only,
    so a CUDA graph captured for a batch size stays valid for any context length)."""
    if device.type != "cuda":
        return 2  # the interpreter runs programs one by one: few splits, but still split-K
    return splits_on_gpu(torch.cuda.get_device_properties(device).multi_processor_count, tokens, stream_programs)


def splits_on_gpu(sms: int, tokens: int, stream_programs: int) -> int:
    """``choose_num_splits`` on a GPU with ``sms`` SMs: about four programs per SM (lengths are
    not known on the host)."""
    return max(1, min(MAX_SPLITS, 4 * sms // max(1, tokens * stream_programs)))


def _rows_of_tokens(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, tokens: int, batch: int):
    """Per query row: its request b(t) and context ctx_t, int32 ``[T]`` each (``_token_rows``)."""
    starts = query_start_loc.reshape(-1).contiguous()  # [B + 1]
    lens = seq_lens.reshape(-1).contiguous()  # [B]
    request = torch.empty(tokens, dtype=torch.int32, device=starts.device)
    context = torch.empty(tokens, dtype=torch.int32, device=starts.device)
    block_t = 128
    _token_rows[(triton.cdiv(tokens, block_t),)](starts, lens, request, context, tokens, batch,
                                                 max(1, (batch - 1).bit_length()), BLOCK_T=block_t)
    return request, context


def _plan_of_tokens(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, tokens: int, batch: int,
                    block_n: int):
    """The balanced schedule's plan (``_plan_rows``): b(t), ctx_t ``[T]`` and cost_start
    ``[T + 1]``, int32."""
    starts = query_start_loc.reshape(-1).contiguous()  # [B + 1]
    lens = seq_lens.reshape(-1).contiguous()  # [B]
    request = torch.empty(tokens, dtype=torch.int32, device=starts.device)
    context = torch.empty(tokens, dtype=torch.int32, device=starts.device)
    cost_start = torch.empty(tokens + 1, dtype=torch.int32, device=starts.device)
    _plan_rows[(1,)](starts, lens, request, context, cost_start, tokens, batch, max(1, (batch - 1).bit_length()),
                     triton.cdiv(ROW_COST_KEYS, block_n), BLOCK_N=block_n, BLOCK_T=512)
    return request, context, cost_start


@dataclass(frozen=True)
class _StreamLayout:
    """Which heads read which local slice (``paged_attention.py``, streams)."""

    num_slices: int  # local slices with a softmax of their own (1 for exact)
    d_s: int  # latent columns per stream
    heads_per_stream: int
    head_base: int  # first global head of local slice 0 (grouped)
    head_step: int  # heads between the groups of consecutive slices (grouped; else 0)

    @staticmethod
    def of(slices: LatentSlices, heads: int, d_loc: int) -> "_StreamLayout":
        if slices.softmax == "exact":  # one stream per head over every local column
            return _StreamLayout(1, d_loc, heads, 0, 0)
        d_s = d_loc // slices.shards_local
        if slices.softmax == "grouped":
            per_group = heads // slices.num_shards
            return _StreamLayout(slices.shards_local, d_s, per_group, slices.shard_offset * per_group, per_group)
        return _StreamLayout(slices.shards_local, d_s, heads, 0, 0)


def _fold_logit_scale(q_latent: torch.Tensor, slices: LatentSlices) -> torch.Tensor:
    """``q̃`` with λ_{h,j} folded into each slice, contiguous ``[T, H, d_loc]``."""
    lam = slices.local_logit_scale(torch.float32, q_latent.device)  # [H, S_local] or None
    if lam is None:
        return q_latent.contiguous()
    tokens, heads, d_loc = q_latent.shape
    by_slice = q_latent.float().view(tokens, heads, slices.shards_local, d_loc // slices.shards_local)
    return (by_slice * lam[:, :, None]).view(tokens, heads, d_loc)  # [T, H, d_loc]


class _Launches:
    """One call's inputs, prepared once, and the launches of the three kernels over them."""

    def __init__(self, q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, scale, slices,
                 cache_scale, num_splits, placeholder, schedule: str = "balanced"):
        tokens, heads, d_loc = q_latent.shape
        batch = query_start_loc.numel() - 1
        device = q_latent.device
        half = (torch.bfloat16, torch.float16)
        self.is_fp8 = cache.dtype == torch.float8_e4m3fn
        self.low_precision = (cache.dtype in half or (self.is_fp8 and q_latent.dtype in half)) and not interpreting()
        if self.is_fp8:
            self.kv_scale = (torch.ones(1, dtype=torch.float32, device=device) if cache_scale is None
                             else cache_scale.reshape(1).to(device=device, dtype=torch.float32))
        else:
            self.kv_scale = placeholder  # a pointer never read
        self.q_latent = _fold_logit_scale(q_latent, slices)  # [T, H, d_loc]
        self.q_rope = q_rope.contiguous()  # [T, H, d_R]
        self.cache = cache
        table = block_table[:batch]
        self.table = table if table.stride(-1) == 1 else table.contiguous()  # [B, max_blocks]
        self.tokens, self.heads, self.d_loc, self.d_r = tokens, heads, d_loc, q_rope.shape[-1]
        self.block_size = cache.shape[1]
        self.scale = float(scale)
        self.streams = _StreamLayout.of(slices, heads, d_loc)
        self.config = launch_config(self.streams.d_s, self.streams.heads_per_stream, device, self.is_fp8)
        self.head_blocks = triton.cdiv(self.streams.heads_per_stream, self.config["block_h"])
        stream_programs = self.streams.num_slices * self.head_blocks
        # Balanced unless asked otherwise (a split count, the schedule "split", or the caller).
        self.schedule = "split" if num_splits is not None or self.config["schedule"] == "split" else schedule
        if self.schedule == "balanced":
            self.request, self.context, self.cost_start = _plan_of_tokens(query_start_loc, seq_lens, tokens, batch,
                                                                          self.config["block_n"])
            self.workers = choose_workers(stream_programs, device)
        else:
            self.request, self.context = _rows_of_tokens(query_start_loc, seq_lens, tokens, batch)
            if num_splits is None:
                num_splits = choose_num_splits(tokens, stream_programs, device)
            self.num_splits = max(1, min(MAX_SPLITS, num_splits))

    def tile_loads(self, key_start: int = 0) -> dict:
        """How stage 1 reads its key tiles: the PAGED_TILE / TMA_TILE flags and the two TMA
        descriptors (latent ``[BLOCK_N, d_s]``, rope ``[BLOCK_N, d_R]`` boxes over the cache's
        ``[num_blocks * block_size, d_loc + d_R]`` rows; the cache tensor in their place when
        unused). TMA needs: ``tma`` in the configuration, a tile within one page, power-of-two
        widths, rows laid out back to back, 16-byte aligned rows and slices."""
        block_n, st, cache = self.config["block_n"], self.streams, self.cache
        paged = self.block_size % block_n == 0 and key_start % block_n == 0
        width = self.d_loc + self.d_r
        size = cache.element_size()
        tma = (bool(self.config.get("tma")) and paged and _pow2(st.d_s) == st.d_s and _pow2(self.d_r) == self.d_r
               and cache.stride(1) == width and cache.stride(0) == self.block_size * width
               and cache.data_ptr() % 16 == 0 and (width * size) % 16 == 0 and (st.d_s * size) % 16 == 0
               and cache.shape[0] * self.block_size < 2**31)
        if not tma:
            return dict(latent_desc=cache, rope_desc=cache, PAGED_TILE=paged, TMA_TILE=False)
        from triton.tools.tensor_descriptor import TensorDescriptor

        rows = cache.view(-1, width)  # [num_blocks * block_size, d_loc + d_R]
        return dict(latent_desc=TensorDescriptor.from_tensor(rows, [block_n, st.d_s]),
                    rope_desc=TensorDescriptor.from_tensor(rows, [block_n, self.d_r]), PAGED_TILE=True, TMA_TILE=True)

    def writes_output_directly(self) -> bool:
        """One split and one stream per head (MLA, exact, one local slice of partitioned): stage
        1's partial buffers ``[T, H, 1, 1, d_loc]`` / ``[T, H, 1, 1]`` are laid out as the output
        ``[T, H, d_loc]`` and the lse ``[T, H]``, so it writes them and the merge is skipped."""
        st = self.streams
        return self.num_splits == 1 and st.num_slices == 1 and st.heads_per_stream == self.heads

    def partial_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's outputs: ``[T, H, S, splits, d_s]`` and ``[T, H, S, splits]`` float32."""
        st, device = self.streams, self.q_latent.device
        shape = (self.tokens, self.heads, st.num_slices, self.num_splits)
        return (torch.empty((*shape, st.d_s), dtype=torch.float32, device=device),
                torch.empty(shape, dtype=torch.float32, device=device))

    def partial_logits(self, logits: torch.Tensor, key_start: int, length: int) -> None:
        """S_n of keys ``[key_start, key_start + length)`` into ``logits`` ``[T, H, length]``."""
        block_h, key_blocks = self.config["block_h"], triton.cdiv(length, LOGITS_KEY_TILE)
        q, cache, table = self.q_latent, self.cache, self.table
        _partial_logits[(self.tokens * key_blocks * triton.cdiv(self.heads, block_h),)](
            q, cache, table, self.request, self.context, logits, self.kv_scale,
            q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), table.stride(0),
            logits.stride(0), logits.stride(1),
            self.heads, triton.cdiv(self.heads, block_h), key_blocks, self.block_size, self.d_loc, key_start, length,
            LOW_PRECISION=self.low_precision, IS_FP8=self.is_fp8, BLOCK_H=block_h, BLOCK_N=LOGITS_KEY_TILE,
            BLOCK_D=min(128, _pow2(self.d_loc)),
        )

    def split_attention(self, partial_out, partial_lse, logits: torch.Tensor | None,
                        key_start: int = 0, key_end: int = NO_KEY_LIMIT) -> None:
        """Stage 1 over keys ``[key_start, key_end)``; ``logits`` (exact over ranks) holds their
        all-reduced partial logits from ``key_start`` on."""
        st, config = self.streams, self.config
        q, r, cache, table = self.q_latent, self.q_rope, self.cache, self.table
        stride_lt, stride_lh = (0, 0) if logits is None else (logits.stride(0), logits.stride(1))
        d_s_block, d_r_block = _pow2(st.d_s), _pow2(self.d_r)
        loads = self.tile_loads(key_start)
        _split_attention[(self.tokens * self.num_splits * st.num_slices * self.head_blocks,)](
            q, r, cache, loads["latent_desc"], loads["rope_desc"], table, self.request, self.context,
            q if logits is None else logits,
            partial_out, partial_lse, self.kv_scale, self.scale,
            q.stride(0), q.stride(1), r.stride(0), r.stride(1),
            cache.stride(0), cache.stride(1), table.stride(0), stride_lt, stride_lh,
            self.heads, st.num_slices, st.heads_per_stream, st.head_base, st.head_step, self.head_blocks,
            self.num_splits, self.block_size, self.d_loc, st.d_s, self.d_r, key_start, key_end,
            LOGITS_IN=logits is not None, LOW_PRECISION=self.low_precision, IS_FP8=self.is_fp8,
            BLOCK_H=config["block_h"], BLOCK_N=config["block_n"], BLOCK_DS=d_s_block, BLOCK_DR=d_r_block,
            EVEN_DS=d_s_block == st.d_s, EVEN_DR=d_r_block == self.d_r,
            PAGED_TILE=loads["PAGED_TILE"], TMA_TILE=loads["TMA_TILE"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        TILE_LOADS["tma" if loads["TMA_TILE"] else "pointer"] += 1

    def balanced_attention(self, out, lse, write_lse: bool) -> None:
        """The balanced schedule: workers over equal shares of the batch's key tiles write whole
        rows into ``out`` / ``lse`` and pieces of cut rows, which ``_merge_pieces`` combines."""
        st, config = self.streams, self.config
        q, r, cache, table = self.q_latent, self.q_rope, self.cache, self.table
        # Pieces of cut rows: two rows per worker, laid out as out's rows (out is contiguous).
        piece_out = out.new_empty((self.workers * 2, self.heads, self.d_loc))
        piece_lse = torch.empty((self.workers * 2, self.heads, st.num_slices), dtype=torch.float32, device=out.device)
        d_s_block, d_r_block = _pow2(st.d_s), _pow2(self.d_r)
        loads = self.tile_loads()
        _balanced_attention[(self.workers * st.num_slices * self.head_blocks,)](
            q, r, cache, loads["latent_desc"], loads["rope_desc"], table, self.request, self.context, self.cost_start,
            out, lse, piece_out, piece_lse,
            self.kv_scale, self.scale,
            q.stride(0), q.stride(1), r.stride(0), r.stride(1),
            cache.stride(0), cache.stride(1), table.stride(0), out.stride(0), out.stride(1),
            self.tokens, self.heads, st.num_slices, st.heads_per_stream, st.head_base, st.head_step,
            self.head_blocks, self.workers, triton.cdiv(ROW_COST_KEYS, config["block_n"]),
            max(1, self.tokens.bit_length()), self.block_size, self.d_loc, st.d_s, self.d_r,
            WRITE_LSE=write_lse, LOW_PRECISION=self.low_precision, IS_FP8=self.is_fp8,
            BLOCK_H=config["block_h"], BLOCK_N=config["block_n"], BLOCK_DS=d_s_block, BLOCK_DR=d_r_block,
            EVEN_DS=d_s_block == st.d_s, EVEN_DR=d_r_block == self.d_r,
            PAGED_TILE=loads["PAGED_TILE"], TMA_TILE=loads["TMA_TILE"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
        TILE_LOADS["tma" if loads["TMA_TILE"] else "pointer"] += 1
        _merge_pieces[(self.tokens * self.heads * st.num_slices,)](
            self.cost_start, piece_out, piece_lse, out, lse, out.stride(0), out.stride(1),
            self.tokens, self.heads, st.num_slices, st.heads_per_stream, st.head_base, st.head_step,
            self.workers, st.d_s, WRITE_LSE=write_lse, BLOCK_DS=d_s_block,
        )

    def merge(self, partial_out, partial_lse, out, lse, write_lse: bool, accumulate: bool = False) -> None:
        """Stage 2 into ``out`` ``[T, H, d_loc]`` / ``lse`` ``[T, H]`` (``accumulate``: merged with them)."""
        st = self.streams
        _merge_splits[(self.tokens * self.heads * st.num_slices,)](
            partial_out, partial_lse, out, lse, out.stride(0), out.stride(1),
            self.heads, st.num_slices, st.heads_per_stream, st.head_base, st.head_step, self.num_splits, st.d_s,
            WRITE_LSE=write_lse or accumulate, ACCUMULATE=accumulate,
            BLOCK_SPLITS=_pow2(self.num_splits, least=2), BLOCK_DS=_pow2(st.d_s),
        )


def _logits_length(launches: _Launches, max_seq_len: int | None) -> int:
    """Keys the partial logits cover: the host bound, or (no bound, or under CUDA-graph
    capture, where the captured bound must hold for every replay) the block table's width."""
    device = launches.q_latent.device
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    full = launches.table.shape[1] * launches.block_size
    return max(1, full if (max_seq_len is None or capturing) else max_seq_len)


def _exact_over_ranks(launches: _Launches, all_reduce, max_seq_len, out, lse, budget_bytes: int | None):
    """Exact softmax with the latent's slices on several ranks, chunk by chunk of context:
    partial logits, their all-reduce, stage 1 over the chunk, stage 2 merged into the result."""
    length = _logits_length(launches, max_seq_len)
    chunk = logits_chunk_keys(launches.tokens, launches.heads, length, budget_bytes)
    workspace = torch.empty(launches.tokens * launches.heads * chunk, dtype=torch.float32, device=out.device)
    chunked = chunk < length
    if chunked:  # the running result in float32; cast once at the end
        result_out = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    else:
        result_out = out
    partial_out, partial_lse = launches.partial_buffers()
    for key_start in range(0, length, chunk):
        keys = min(chunk, length - key_start)
        logits = workspace[: launches.tokens * launches.heads * keys].view(
            launches.tokens, launches.heads, keys)  # [T, H, keys], contiguous for the all-reduce
        launches.partial_logits(logits, key_start, keys)
        reduced = all_reduce(logits)
        logits = logits if reduced is None else reduced
        launches.split_attention(partial_out, partial_lse, logits, key_start, key_start + keys)
        launches.merge(partial_out, partial_lse, result_out, lse, write_lse=True, accumulate=key_start > 0)
    if chunked:
        out.copy_(result_out)
    return out, lse


def triton_paged_latent_attention(
    q_latent: torch.Tensor,  # [T, H, d_loc]
    q_rope: torch.Tensor,  # [T, H, d_R]
    cache: torch.Tensor,  # [num_blocks, block_size, d_loc + d_R]
    query_start_loc: torch.Tensor,  # [B + 1]
    seq_lens: torch.Tensor,  # [B]
    block_table: torch.Tensor,  # [B, max_blocks]
    scale: float,
    slices: LatentSlices,
    all_reduce,
    max_seq_len: int | None,
    return_lse: bool,
    num_splits: int | None = None,
    cache_scale: torch.Tensor | None = None,
    logits_budget_bytes: int | None = None,
):
    """The seam's function on Triton kernels; arguments as ``paged_latent_attention``
    (checked there). ``num_splits`` overrides the split-K count and ``logits_budget_bytes``
    the exact path's partial-logits budget per chunk of context (tests; None:
    ``LOGITS_BUDGET_BYTES``)."""
    tokens, heads, d_loc = q_latent.shape
    batch = query_start_loc.numel() - 1
    device = q_latent.device
    if tokens == 0 or batch == 0 or block_table.shape[1] == 0:
        out = q_latent.new_zeros((tokens, heads, d_loc))
        lse = torch.full((tokens, heads), float("-inf"), dtype=torch.float32, device=device)
        return (out, lse) if return_lse else out
    # Every element is written by the kernels (the merge, or stage 1 alone): no fill kernels.
    out = q_latent.new_empty((tokens, heads, d_loc))
    lse = torch.empty((tokens, heads), dtype=torch.float32, device=device)
    if cache.stride(-1) != 1:
        raise ValueError(f"the cache's last dimension must be contiguous, got strides {cache.stride()}")
    _check_interpreter(device)
    over_ranks = slices.softmax == "exact" and all_reduce is not None
    launches = _Launches(q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, scale, slices,
                         cache_scale, num_splits, placeholder=lse, schedule="split" if over_ranks else "balanced")
    if over_ranks:
        _exact_over_ranks(launches, all_reduce, max_seq_len, out, lse, logits_budget_bytes)
    elif launches.schedule == "balanced":  # return_lse is for the exact softmax only: one stream per head
        launches.balanced_attention(out, lse, write_lse=return_lse)
    elif launches.writes_output_directly():  # stage 1 writes out / lse: no fp32 partials, no merge
        launches.split_attention(out, lse, None)
    else:
        partial_out, partial_lse = launches.partial_buffers()
        launches.split_attention(partial_out, partial_lse, None)
        launches.merge(partial_out, partial_lse, out, lse, write_lse=return_lse)
    SCHEDULE_CALLS[launches.schedule] += 1
    note_kernel_ran("triton")
    return (out, lse) if return_lse else out
