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

Kernels:

``_split_attention`` (stage 1, split-K): program (t, split, slice j, block of BLOCK_H
heads of stream j). The split covers keys [split·K_s, (split+1)·K_s) ∩ [0, ctx_t) with
K_s = ⌈ctx_t / NUM_SPLITS⌉ rounded up to BLOCK_N. Online softmax over key tiles:

    s = τ (q̃^(j) · ĉ^(j)_n + q^R · k^R_n)       (or τ (S_n + q^R · k^R_n), S from the
                                                  all-reduced partial logits, exact TP)
    m' = max(m, max_n s), α = e^(m − m'), p_n = e^(s_n − m'),
    l' = α l + Σ_n p_n,  acc' = α acc + Σ_n p_n ĉ^(j)_n

with m = −inf handled explicitly (a fully masked tile leaves m = −inf and adds nothing);
computed in base 2 (s log2 e and ``exp2``), the LSE converted back to natural log.
It stores the normalised partial output acc / l (0 when l = 0) and lse = m + ln l
(−inf when l = 0), in float32.

``_merge_splits`` (stage 2): per (t, head, j): lse = ln Σ_s e^(lse_s), ō = Σ_s ō_s e^(lse_s − lse);
no key at all gives ō = 0, lse = −inf. Heads that do not read slice j (grouped) get 0.

``_partial_logits`` (exact softmax with the latent sharded over ranks): S_n =
q̃_local · ĉ_local,n (λ included) for every key, written to a ``[T, H, L]`` float32 buffer
that the caller all-reduces before stage 1 reads it.

Loads are upcast to float32; the products run in float32 (``ieee``) for float32 inputs
and in Triton's interpreter, and in the cache dtype (bf16/fp16, float32 accumulation) on
a GPU. An fp8 cache (values / σ, ``latent_cache.py``) is read as stored: e4m3 values are
exact in fp16/fp32, so they are widened to fp16 for the products on a GPU (the query is
rounded to fp16 too; e4m3 → fp16 is the hardware's native conversion), and
σ (read from a device tensor) is folded into the logit scale (s = τ σ (q · k_stored)) and
into the output (ō = σ Σ_n p_n ĉ_stored,n); the partial-logits kernel multiplies its sums by σ. Unused cache slots are never loaded (masked loads), so NaN there cannot leak.
No tensor is read on the host: grid sizes come from shapes and host ints only, so the
launch can be captured in a CUDA graph (the split count depends only on the number of
query rows and heads).
"""

import torch
import triton
import triton.language as tl

from mla_plugin.ops.kernel_choice import interpreting
from mla_plugin.ops.sharded_latent import LatentSlices

# Most splits of one query row's context (stage-1 programs per row and stream block).
MAX_SPLITS = 32

# Overrides of the launch configuration (keys of ``launch_config``'s result), for tuning
# runs (benchmarks/gpu_decode.py --sweep); empty in normal use.
TUNING: dict = {}


@triton.jit
def _split_attention(
    q_latent_ptr, q_rope_ptr,  # [T, H, d_loc], [T, H, d_R]
    cache_ptr,  # [num_blocks, block_size, d_loc + d_R]
    block_table_ptr,  # [B, max_blocks]
    token_request_ptr, token_context_ptr,  # [T] int32: b(t), ctx_t
    logits_ptr,  # [T, H, L] float32 (LOGITS_IN only)
    partial_out_ptr, partial_lse_ptr,  # [T, H, S, NUM_SPLITS, D_S], [T, H, S, NUM_SPLITS] float32
    kv_scale_ptr,  # [1] float32: σ of an fp8 cache (IS_FP8 only)
    scale,
    stride_qt, stride_qh, stride_rt, stride_rh,
    stride_cache_block, stride_cache_slot, stride_table,
    stride_lt, stride_lh,
    num_heads, num_slices, heads_per_stream, head_base, head_step, head_blocks,
    num_splits, block_size, d_loc, d_s, d_r,
    LOGITS_IN: tl.constexpr, LOW_PRECISION: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DR: tl.constexpr,
    EVEN_DS: tl.constexpr, EVEN_DR: tl.constexpr,
):
    scale_log2 = scale * 1.4426950408889634  # τ log2(e)
    if IS_FP8:
        kv_scale = tl.load(kv_scale_ptr)  # σ: logits and outputs are σ times those of the stored values
        if not LOGITS_IN:
            scale_log2 = scale_log2 * kv_scale
    pid = tl.program_id(0)
    head_block = pid % head_blocks
    j = (pid // head_blocks) % num_slices
    split = (pid // (head_blocks * num_slices)) % num_splits
    t = pid // (head_blocks * num_slices * num_splits)

    local = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # heads of this stream block
    head_ok = local < heads_per_stream
    heads = head_base + j * head_step + local  # [BLOCK_H] global head index
    d = tl.arange(0, BLOCK_DS)
    dr = tl.arange(0, BLOCK_DR)
    # Masks along the row only when the widths fill their blocks: loads stay vectorised.
    if EVEN_DS:
        d_ok = d < BLOCK_DS
    else:
        d_ok = d < d_s
    if EVEN_DR:
        dr_ok = dr < BLOCK_DR
    else:
        dr_ok = dr < d_r

    request = tl.load(token_request_ptr + t)
    context = tl.load(token_context_ptr + t)
    per_split = tl.cdiv(tl.cdiv(context, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, context)

    t64 = t.to(tl.int64)
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
            q_r = q_r.to(cache_ptr.dtype.element_ty)
            if not LOGITS_IN:
                q = q.to(cache_ptr.dtype.element_ty)

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DS], tl.float32)
    for first in range(start, end, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
        key_ok = pos < end
        block = tl.load(block_table_ptr + request.to(tl.int64) * stride_table + pos // block_size,
                        mask=key_ok, other=0).to(tl.int64)
        row = block * stride_cache_block + (pos % block_size).to(tl.int64) * stride_cache_slot  # [BLOCK_N]
        if EVEN_DS:
            latent = tl.load(cache_ptr + row[:, None] + j * d_s + d[None, :], mask=key_ok[:, None],
                             other=0.0)  # [BLOCK_N, BLOCK_DS]
        else:
            latent = tl.load(cache_ptr + row[:, None] + j * d_s + d[None, :],
                             mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DS]
        if EVEN_DR:
            rope = tl.load(cache_ptr + row[:, None] + d_loc + dr[None, :], mask=key_ok[:, None],
                           other=0.0)  # [BLOCK_N, BLOCK_DR]
        else:
            rope = tl.load(cache_ptr + row[:, None] + d_loc + dr[None, :],
                           mask=key_ok[:, None] & dr_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DR]
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
            s += tl.load(logits_ptr + t64 * stride_lt + heads[:, None] * stride_lh + pos[None, :],
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
        if LOW_PRECISION:
            acc = acc * alpha[:, None] + tl.dot(p.to(latent.dtype), latent)
        else:
            acc = acc * alpha[:, None] + tl.dot(p, latent, input_precision="ieee")
        m = m_new

    has_keys = total > 0.0
    if IS_FP8:
        acc = acc * kv_scale  # Σ p ĉ_stored · σ
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, total, 1.0)[:, None], 0.0)
    lse = tl.where(has_keys, m * 0.6931471805599453 + tl.log(tl.where(has_keys, total, 1.0)), float("-inf"))
    slot = ((t64 * num_heads + heads) * num_slices + j) * num_splits + split  # [BLOCK_H]
    tl.store(partial_out_ptr + slot[:, None] * d_s + d[None, :], out, mask=head_ok[:, None] & d_ok[None, :])
    tl.store(partial_lse_ptr + slot, lse, mask=head_ok)


@triton.jit
def _merge_splits(
    partial_out_ptr, partial_lse_ptr,  # [T, H, S, NUM_SPLITS, D_S], [T, H, S, NUM_SPLITS] float32
    out_ptr, lse_ptr,  # [T, H, S * D_S] (query dtype), [T, H] float32 (WRITE_LSE only)
    stride_ot, stride_oh,
    num_heads, num_slices, heads_per_stream, head_base, head_step, num_splits, d_s,
    WRITE_LSE: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_DS: tl.constexpr,
):
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
    peak = tl.where(peak == float("-inf"), 0.0, peak)
    total = tl.sum(tl.exp(lses - peak), axis=0)

    d = tl.arange(0, BLOCK_DS)
    d_ok = d < d_s
    acc = tl.zeros([BLOCK_DS], tl.float32)
    for split in range(0, used_splits):
        lse_s = tl.load(partial_lse_ptr + base + split)
        weight = tl.exp(lse_s - peak)  # 0 for an empty split (its output is 0 too)
        acc += weight * tl.load(partial_out_ptr + (base + split) * d_s + d, mask=d_ok, other=0.0)
    has_keys = total > 0.0
    out = tl.where(has_keys, acc / tl.where(has_keys, total, 1.0), 0.0)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + h * stride_oh + j * d_s + d,
             out.to(out_ptr.dtype.element_ty), mask=d_ok)
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
    num_heads, head_blocks, key_blocks, block_size, d_loc, length,
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
    pos = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = pos < context
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
    tl.store(logits_ptr + t64 * stride_lt + heads[:, None] * stride_lh + pos[None, :], s,
             mask=head_ok[:, None] & (pos < length)[None, :])


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


def launch_config(d_s: int, heads_per_stream: int, device: torch.device) -> dict:
    """Stage-1 tile sizes and launch options; ``TUNING`` overrides them."""
    if device.type != "cuda":  # the interpreter: large tiles mean fewer interpreted steps
        config = dict(block_h=16, block_n=64, num_warps=4, num_stages=1)
    elif heads_per_stream >= 64:  # many heads: one KV tile feeds 64 heads (H200 sweep, 2026-11-26)
        config = dict(block_h=64, block_n=64, num_warps=8, num_stages=2)
    elif d_s > 256:
        config = dict(block_h=16, block_n=32, num_warps=4, num_stages=2)
    else:
        config = dict(block_h=16, block_n=64, num_warps=8, num_stages=2)
    config.update(TUNING)
    return config


def choose_num_splits(tokens: int, stream_programs: int, device: torch.device) -> int:
    """Splits of each row's context: enough programs to fill the GPU (from T and heads only,
    so a CUDA graph captured for a batch size stays valid for any context length)."""
    if device.type != "cuda":
        return 2  # the interpreter runs programs one by one: few splits, but still split-K
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # About four programs per SM: lengths are not known on the host, and with varied
    # lengths more splits balance the work (H200 table in the README).
    wanted = 4 * sms // max(1, tokens * stream_programs)
    return max(1, min(MAX_SPLITS, wanted))


def _token_rows(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, tokens: int, batch: int):
    """Per query row: its request b(t) and context ctx_t (causal position + 1; 0 for padding)."""
    starts = query_start_loc.reshape(-1)[: batch + 1].to(torch.long)  # [B + 1]
    rows = torch.arange(tokens, device=starts.device)  # [T]
    request = torch.searchsorted(starts[1:], rows, right=True).clamp(max=batch - 1)  # [T]
    ends = starts[1:].index_select(0, request)  # [T]
    lens = seq_lens.reshape(-1)[:batch].to(torch.long).index_select(0, request)  # [T]
    context = lens - (ends - rows) + 1
    context = torch.where(rows < starts[batch], context, 0).clamp(min=0)
    return request.to(torch.int32), context.to(torch.int32)


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
):
    """The seam's function on Triton kernels; arguments as ``paged_latent_attention``
    (checked there). ``num_splits`` overrides the split-K count (tests)."""
    tokens, heads, d_loc = q_latent.shape
    d_r = q_rope.shape[-1]
    num_blocks, block_size, _ = cache.shape
    batch = query_start_loc.numel() - 1
    device = q_latent.device
    out = q_latent.new_zeros((tokens, heads, d_loc))
    lse = torch.full((tokens, heads), float("-inf"), dtype=torch.float32, device=device)
    if tokens == 0 or batch == 0 or block_table.shape[1] == 0:
        return (out, lse) if return_lse else out
    if cache.stride(-1) != 1:
        raise ValueError(f"the cache's last dimension must be contiguous, got strides {cache.stride()}")
    _check_interpreter(device)

    half = (torch.bfloat16, torch.float16)
    is_fp8 = cache.dtype == torch.float8_e4m3fn
    low_precision = (cache.dtype in half or (is_fp8 and q_latent.dtype in half)) and not interpreting()
    if is_fp8:
        kv_scale = (torch.ones(1, dtype=torch.float32, device=device) if cache_scale is None
                    else cache_scale.reshape(1).to(device=device, dtype=torch.float32))
    else:
        kv_scale = lse  # placeholder pointer, never read
    lam = slices.local_logit_scale(torch.float32, device)  # [H, S_local] or None
    if lam is not None:  # fold λ_{h,j} into q̃_h^(j)
        d_s = d_loc // slices.shards_local
        q_latent = (q_latent.float().view(tokens, heads, slices.shards_local, d_s) * lam[:, :, None])
        q_latent = q_latent.view(tokens, heads, d_loc)  # [T, H, d_loc]
    q_latent = q_latent.contiguous()
    q_rope = q_rope.contiguous()
    table = block_table[:batch]
    if table.stride(-1) != 1:
        table = table.contiguous()
    request, context = _token_rows(query_start_loc, seq_lens, tokens, batch)

    exact = slices.softmax == "exact"
    if exact:  # one stream per head over every local column
        num_slices, d_s, heads_per_stream, head_base, head_step = 1, d_loc, heads, 0, 0
    else:
        num_slices, d_s = slices.shards_local, d_loc // slices.shards_local
        if slices.softmax == "grouped":
            heads_per_stream = heads // slices.num_shards
            head_base, head_step = slices.shard_offset * heads_per_stream, heads_per_stream
        else:
            heads_per_stream, head_base, head_step = heads, 0, 0

    config = launch_config(d_s, heads_per_stream, device)
    block_h = config["block_h"]
    head_blocks = triton.cdiv(heads_per_stream, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(tokens, num_slices * head_blocks, device)
    num_splits = max(1, min(MAX_SPLITS, num_splits))

    logits = q_latent  # placeholder pointer when unused
    stride_lt = stride_lh = 0
    logits_in = exact and all_reduce is not None
    if logits_in:  # exact softmax over latent slices held by several ranks
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        length = table.shape[1] * block_size if (max_seq_len is None or capturing) else max_seq_len
        length = max(1, length)
        logits = torch.empty((tokens, heads, length), dtype=torch.float32, device=device)
        key_blocks = triton.cdiv(length, 64)
        _partial_logits[(tokens * key_blocks * triton.cdiv(heads, block_h),)](
            q_latent, cache, table, request, context, logits,
            kv_scale, q_latent.stride(0), q_latent.stride(1), cache.stride(0), cache.stride(1), table.stride(0),
            logits.stride(0), logits.stride(1),
            heads, triton.cdiv(heads, block_h), key_blocks, block_size, d_loc, length,
            LOW_PRECISION=low_precision, IS_FP8=is_fp8, BLOCK_H=block_h, BLOCK_N=64, BLOCK_D=min(128, _pow2(d_loc)),
        )
        reduced = all_reduce(logits)
        logits = logits if reduced is None else reduced
        stride_lt, stride_lh = logits.stride(0), logits.stride(1)

    partial_out = torch.empty((tokens, heads, num_slices, num_splits, d_s), dtype=torch.float32, device=device)
    partial_lse = torch.empty((tokens, heads, num_slices, num_splits), dtype=torch.float32, device=device)
    _split_attention[(tokens * num_splits * num_slices * head_blocks,)](
        q_latent, q_rope, cache, table, request, context, logits, partial_out, partial_lse, kv_scale, float(scale),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        cache.stride(0), cache.stride(1), table.stride(0), stride_lt, stride_lh,
        heads, num_slices, heads_per_stream, head_base, head_step, head_blocks,
        num_splits, block_size, d_loc, d_s, d_r,
        LOGITS_IN=logits_in, LOW_PRECISION=low_precision, IS_FP8=is_fp8,
        BLOCK_H=block_h, BLOCK_N=config["block_n"], BLOCK_DS=_pow2(d_s), BLOCK_DR=_pow2(d_r),
        EVEN_DS=_pow2(d_s) == d_s, EVEN_DR=_pow2(d_r) == d_r,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    _merge_splits[(tokens * heads * num_slices,)](
        partial_out, partial_lse, out, lse, out.stride(0), out.stride(1),
        heads, num_slices, heads_per_stream, head_base, head_step, num_splits, d_s,
        WRITE_LSE=return_lse, BLOCK_SPLITS=_pow2(num_splits, least=2), BLOCK_DS=_pow2(d_s),
    )
    return (out, lse) if return_lse else out
