"""Absorbed MLA decode over the paged latent cache, in plain torch.

Each decode query is one token per request. With the absorbed query
``q̃_h = W_UK,h q^C_h`` (d_c values) and the rope query ``q^R_h`` (d_R values),
attention is MQA over the cached rows ``[ĉ_t | k^R_t]``:

    s_h,t = τ (q̃_h · ĉ_t + q^R_h · k^R_t),   p_h = softmax_t(s_h),   o_h = Σ_t p_h,t ĉ_t

The result is the latent output ``o_h`` (d_c values; the layer applies W_UV) and the
natural-log log-sum-exp of the scaled logits. The context is processed in chunks
whose partial results are merged by their log-sum-exp (split-K, as a GPU kernel
would), so memory stays bounded for long contexts and large batches.
"""

import torch

# Upper bound on the gathered chunk, in elements of the compute dtype.
_CHUNK_ELEMENTS = 1 << 22


def merge_partial_attention(
    out_a: torch.Tensor,  # [..., d]
    lse_a: torch.Tensor,  # [...]
    out_b: torch.Tensor,  # [..., d]
    lse_b: torch.Tensor,  # [...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two softmax-normalised partial results over disjoint key sets.

    An empty part has lse = -inf and contributes nothing; two empty parts give
    out = 0, lse = -inf (never NaN).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse))
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse))
    out = out_a * w_a.unsqueeze(-1) + out_b * w_b.unsqueeze(-1)
    return out, lse


def _chunk_attention(
    q: torch.Tensor,  # [B, H, d_c + d_R]
    rows: torch.Tensor,  # [B, C, d_c + d_R]
    valid: torch.Tensor,  # [B, C] bool
    d_c: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    all_valid = bool(valid.all())
    if not all_valid:
        # Unused slots may hold anything (NaN included): zero them before any product.
        rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=rows.dtype))
    scores = torch.baddbmm(
        rows.new_empty(()), q, rows.transpose(1, 2), beta=0.0, alpha=scale
    )  # [B, H, C]
    if not all_valid:
        scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H]
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.bmm(probs, rows[..., :d_c])  # [B, H, d_c]
    return out, lse


def paged_latent_decode(
    q_latent: torch.Tensor,  # [B, H, d_c]  absorbed query q̃
    q_rope: torch.Tensor,  # [B, H, d_R]  rope query q^R (already rotated)
    cache: torch.Tensor,  # [num_blocks, block_size, d_c + d_R]
    block_table: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int, tokens in the cache per request
    scale: float,
    *,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over a paged latent cache.

    Returns ``(out[B, H, d_c], lse[B, H])``; ``out`` in the query's dtype, ``lse`` in
    float32 (float64 for float64 inputs). Any d_c, d_R and block size.
    """
    batch, heads, d_c = q_latent.shape
    d_r = q_rope.shape[-1]
    num_blocks, block_size, width = cache.shape
    if width != d_c + d_r:
        raise ValueError(f"cache row width {width} != d_c {d_c} + d_R {d_r}")
    if q_rope.shape[:2] != (batch, heads):
        raise ValueError(f"q_rope shape {tuple(q_rope.shape)} does not match q_latent")
    compute_dtype = torch.float64 if q_latent.dtype == torch.float64 else torch.float32

    q = torch.cat([q_latent, q_rope], dim=-1).to(compute_dtype)  # [B, H, d_c + d_R]
    seq_lens = seq_lens.to(torch.long).reshape(-1)[:batch]
    block_table = block_table[:batch].to(torch.long)
    max_len = int(seq_lens.max()) if batch else 0

    if chunk_tokens is None:
        per_token = max(1, batch * width)
        chunk_tokens = max(block_size, (_CHUNK_ELEMENTS // per_token) // block_size * block_size)
    needed_blocks = (max_len + block_size - 1) // block_size
    chunk_blocks = max(1, min(chunk_tokens // block_size, needed_blocks))

    out = q.new_zeros((batch, heads, d_c))
    lse = q.new_full((batch, heads), float("-inf"))
    table_width = block_table.shape[1]
    for first_block in range(0, needed_blocks, chunk_blocks):
        cols = torch.arange(first_block, first_block + chunk_blocks, device=q.device)
        in_table = cols < table_width
        blocks = block_table[:, cols.clamp(max=table_width - 1)]  # [B, nb]
        positions = (cols * block_size).unsqueeze(1) + torch.arange(
            block_size, device=q.device
        )  # [nb, block_size]
        valid = (positions.reshape(1, -1) < seq_lens.unsqueeze(1)) & in_table.repeat_interleave(
            block_size
        ).unsqueeze(0)  # [B, nb * block_size]
        # Padded table entries may be any value: clamp into range, then mask.
        blocks = blocks.clamp(0, num_blocks - 1)
        rows = cache[blocks].reshape(batch, -1, width).to(compute_dtype)  # [B, nb*bs, D]
        part_out, part_lse = _chunk_attention(q, rows, valid, d_c, scale)
        out, lse = merge_partial_attention(out, lse, part_out, part_lse)
    return out.to(q_latent.dtype), lse
