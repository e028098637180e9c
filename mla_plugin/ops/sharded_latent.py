"""MLA attention with the latent split into shards (the GLA-style TP variant), plain torch.

The normalised latent ĉ_t (d_c values) is cut into ``num_shards`` = g equal contiguous
slices ĉ^(1..g) of d_s = d_c / g values; the absorbed query q̃_h and the output are cut
the same way. A rank holds ``shards_local`` consecutive shards starting at global shard
``shard_offset``, plus the full rope key k^R (d_R values, shared by all heads). Its cache
rows are ``[ĉ_local | k^R]``, paged as in ``latent_cache.py``. With λ_{h,j} a per-(head,
shard) multiplier on the partial latent logit (``logit_scale``, default 1):

- ``exact``: s_h,t = τ(Σ_j λ_{h,j} q̃_h^(j)·ĉ_t^(j) + q^R_h·k^R_t), the partial sums of
  all ranks combined by an all-reduce before one softmax; o_h = Σ_t p_h,t ĉ_t^local.
  With λ = 1 this is unsharded MLA to rounding.
- ``partitioned``: every shard j runs its own softmax over
  τ(λ_{h,j} q̃_h^(j)·ĉ_t^(j) + q^R_h·k^R_t) for every head, and fills output slice j.
- ``grouped``: heads are split into g consecutive groups; head h (group
  j = h // (H/g)) attends only over shard j, as in ``partitioned``, and fills slice j;
  its other slices are zero. A rank without shard j outputs zeros for those heads.

Outputs of the ranks are summed later (after W_UV / o_proj), so no communication is
needed here except the logit all-reduce of ``exact``.

RMSNorm before the cache (weightless, γ folded elsewhere): ``global`` divides c by the
RMS over all d_c dims (exact); ``local`` by each shard's own RMS (GLA-trained models).
"""

from collections.abc import Callable

import torch

from mla_plugin.ops.latent_decode import merge_partial_attention

SOFTMAX_MODES = ("exact", "partitioned", "grouped")
NORM_MODES = ("global", "local")

# Upper bound on the per-chunk working set of one request, in elements.
_CHUNK_ELEMENTS = 1 << 22


def _check_choice(value: str, valid: tuple[str, ...], what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")


def _shard_width(d_c: int, num_shards: int) -> int:
    """d_c / num_shards, or a ValueError when it does not divide."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if d_c % num_shards:
        raise ValueError(f"latent width d_c={d_c} is not divisible by num_shards={num_shards}")
    return d_c // num_shards


def _check_grouped_heads(heads: int, num_shards: int) -> None:
    if heads % num_shards:
        raise ValueError(
            f"grouped mode needs the head count ({heads}) divisible by num_shards ({num_shards})"
        )


def latent_rmsnorm(
    c: torch.Tensor,  # [..., d_c]
    num_shards: int,
    mode: str,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Weightless RMSNorm of the latent, ``global`` (over all d_c) or ``local`` (per shard).

    Computed in float32 (float64 for float64 input), returned in ``c``'s dtype.
    """
    _check_choice(mode, NORM_MODES, "norm mode")
    d_c = c.shape[-1]
    d_s = _shard_width(d_c, num_shards)
    compute_dtype = torch.float64 if c.dtype == torch.float64 else torch.float32
    x = c.to(compute_dtype)
    if mode == "global":
        out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        shards = x.reshape(*x.shape[:-1], num_shards, d_s)  # [..., g, d_s]
        out = (shards * torch.rsqrt(shards.pow(2).mean(dim=-1, keepdim=True) + eps)).reshape(x.shape)
    return out.to(c.dtype)


def _stream_heads(
    heads: int, num_shards: int, shard_offset: int, shards_local: int, softmax_mode: str
) -> torch.Tensor:
    """Heads that read each local shard, ``[S_local, H_k]`` (all heads unless grouped)."""
    if softmax_mode != "grouped":
        return torch.arange(heads).expand(shards_local, heads)
    per_group = heads // num_shards
    groups = torch.arange(shard_offset, shard_offset + shards_local)  # [S]
    return groups.unsqueeze(1) * per_group + torch.arange(per_group)  # [S, H/g]


def _gather_chunk(
    cache: torch.Tensor,  # [num_blocks, block_size, D]
    table_row: torch.Tensor,  # [max_blocks] long
    first_block: int,
    num: int,
    seq_len: int,
    compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of table columns ``first_block .. +num``: ``(rows[C, D], positions[C], valid[C])``.

    Invalid rows (past ``seq_len`` or past the table) are zeroed, whatever they held.
    """
    num_blocks, block_size, width = cache.shape
    table_width = table_row.shape[0]
    cols = torch.arange(first_block, first_block + num, device=cache.device)
    in_table = cols < table_width
    # Padded table entries may hold any value: clamp into range, then mask.
    blocks = table_row[cols.clamp(max=table_width - 1)].clamp(0, num_blocks - 1)
    positions = (cols.unsqueeze(1) * block_size + torch.arange(block_size, device=cache.device)).reshape(-1)
    valid = (positions < seq_len) & in_table.repeat_interleave(block_size)  # [C]
    rows = cache[blocks].reshape(-1, width).to(compute_dtype)  # [C, D]
    rows = torch.where(valid.unsqueeze(-1), rows, torch.zeros((), dtype=compute_dtype))
    return rows, positions, valid


def _masked_softmax_chunk(
    scores: torch.Tensor,  # [K, q, H_k, C]  scaled logits
    allowed: torch.Tensor,  # [q, C] bool
    values: torch.Tensor,  # [K, C, d]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-normalised partial attention over one chunk: ``(out[K, q, H_k, d], lse[K, q, H_k])``."""
    streams, q_len, heads, ctx = scores.shape
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [K, q, H_k]
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe.unsqueeze(-1))  # [K, q, H_k, C]
    out = torch.bmm(probs.reshape(streams, q_len * heads, ctx), values)  # [K, q*H_k, d]
    return out.reshape(streams, q_len, heads, -1), lse


def _reduce(all_reduce: Callable | None, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks; accept in-place all-reduces and ones that return the sum."""
    if all_reduce is None:
        return tensor
    result = all_reduce(tensor)
    return tensor if result is None else result


def _request_attention(
    q_lat: torch.Tensor,  # [q, H, d_loc]
    q_rope: torch.Tensor,  # [q, H, d_R]
    cache: torch.Tensor,  # [num_blocks, block_size, d_loc + d_R]
    table_row: torch.Tensor,  # [max_blocks] long
    seq_len: int,
    scale: float,
    stream_heads: torch.Tensor,  # [S, H_k]
    lam: torch.Tensor,  # [S, H_k]
    softmax_mode: str,
    chunk_blocks: int,
    all_reduce: Callable | None,
) -> torch.Tensor:
    """One request's latent output ``[q, H, d_loc]`` over its paged context, chunk by chunk."""
    q_len, heads, d_loc = q_lat.shape
    shards = stream_heads.shape[0]
    d_s = d_loc // shards
    block_size = cache.shape[1]
    shard_ids = torch.arange(shards).unsqueeze(1)  # [S, 1]
    by_shard = q_lat.reshape(q_len, heads, shards, d_s)  # [q, H, S, d_s]
    q_streams = by_shard[:, stream_heads, shard_ids, :].permute(1, 0, 2, 3)  # [S, q, H_k, d_s]
    lam = lam.unsqueeze(1).unsqueeze(-1)  # [S, 1, H_k, 1]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q_lat.device)  # [q]
    exact = softmax_mode == "exact"

    num_streams = 1 if exact else shards
    out = q_lat.new_zeros((num_streams, q_len, stream_heads.shape[1], d_loc if exact else d_s))
    lse = q_lat.new_full(out.shape[:-1], float("-inf"))
    needed_blocks = (seq_len + block_size - 1) // block_size
    for first in range(0, needed_blocks, chunk_blocks):
        num = min(chunk_blocks, needed_blocks - first)
        rows, positions, valid = _gather_chunk(cache, table_row, first, num, seq_len, q_lat.dtype)
        ctx = rows.shape[0]
        latent = rows[:, :d_loc].reshape(ctx, shards, d_s)  # [C, S, d_s]
        rope_logits = torch.einsum("qhr,cr->qhc", q_rope, rows[:, d_loc:])  # [q, H, C]
        partial = torch.einsum("sqhd,csd->sqhc", q_streams, latent) * lam  # [S, q, H_k, C]
        if exact:
            latent_logits = _reduce(all_reduce, partial.sum(dim=0).contiguous())  # [q, H, C]
            scores = (latent_logits + rope_logits).unsqueeze(0)  # [1, q, H, C]
            values = rows[:, :d_loc].unsqueeze(0)  # [1, C, d_loc]
        else:
            scores = partial + rope_logits[:, stream_heads].permute(1, 0, 2, 3)  # [S, q, H_k, C]
            values = latent.permute(1, 0, 2)  # [S, C, d_s]
        allowed = valid.unsqueeze(0) & (positions.unsqueeze(0) <= q_pos.unsqueeze(1))  # [q, C]
        part_out, part_lse = _masked_softmax_chunk(scores * scale, allowed, values)
        out, lse = merge_partial_attention(out, lse, part_out, part_lse)

    if exact:
        return out[0]
    result = q_lat.new_zeros((q_len, heads, shards, d_s))
    result[:, stream_heads, shard_ids, :] = out.permute(1, 0, 2, 3)  # [q, S, H_k, d_s]
    return result.reshape(q_len, heads, d_loc)


def paged_sharded_latent_attention(
    q_latent: torch.Tensor,  # [T, H, d_loc]  absorbed queries over this rank's shards
    q_rope: torch.Tensor,  # [T, H, d_R]
    cache: torch.Tensor,  # [num_blocks, block_size, d_loc + d_R]
    query_start_loc: torch.Tensor,  # [B + 1] int
    seq_lens: torch.Tensor,  # [B] int, cached tokens per request, queries included
    block_table: torch.Tensor,  # [B, max_blocks] int
    scale: float,
    *,
    num_shards: int,
    shard_offset: int,
    shards_local: int,
    softmax_mode: str,
    logit_scale: torch.Tensor | None = None,  # [H, num_shards], by global shard
    all_reduce: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Causal sharded-latent attention over a paged cache; returns ``out[T, H, d_loc]``.

    Request b owns query rows ``query_start_loc[b]:query_start_loc[b+1]``; they are its
    last q_len cached tokens, so query i sits at position ``seq_lens[b] - q_len + i`` and
    attends to positions ``0..`` that one. Rows past ``query_start_loc[B]`` (padding) are 0.

    ``all_reduce`` sums a tensor over the ranks that hold the other shards (in place, or
    returning the sum). It is used only by ``exact`` and is required there exactly when
    this rank does not hold all shards; every rank must call this function with the same
    query_start_loc, seq_lens and chunk_tokens so their all-reduces pair up. ``exact``
    equals unsharded MLA only with ``logit_scale`` all ones (or None).

    ``chunk_tokens`` bounds the context processed at once (rounded to whole blocks);
    chunks are merged by log-sum-exp. The default depends only on values shared by all
    ranks. Computed in float32 (float64 for float64 input); returned in q_latent's dtype.
    """
    _check_choice(softmax_mode, SOFTMAX_MODES, "softmax mode")
    if q_latent.dim() != 3:
        raise ValueError(f"q_latent must be [T, H, d_loc], got {tuple(q_latent.shape)}")
    tokens, heads, d_loc = q_latent.shape
    d_r = q_rope.shape[-1]
    if q_rope.shape[:2] != (tokens, heads):
        raise ValueError(f"q_rope shape {tuple(q_rope.shape)} does not match q_latent")
    if shards_local < 1 or shard_offset < 0 or shard_offset + shards_local > num_shards:
        raise ValueError(
            f"shards {shard_offset}..{shard_offset + shards_local - 1} are not within "
            f"0..{num_shards - 1} (shard_offset={shard_offset}, shards_local={shards_local})"
        )
    if d_loc % shards_local:
        raise ValueError(
            f"local latent width {d_loc} is not divisible by shards_local={shards_local} "
            f"(d_c must be divisible by num_shards={num_shards})"
        )
    if softmax_mode == "grouped":
        _check_grouped_heads(heads, num_shards)
    num_blocks, block_size, width = cache.shape
    if width != d_loc + d_r:
        raise ValueError(f"cache row width {width} != d_loc {d_loc} + d_R {d_r}")
    if logit_scale is not None and tuple(logit_scale.shape) != (heads, num_shards):
        raise ValueError(
            f"logit_scale must be [H, num_shards] = [{heads}, {num_shards}], got {tuple(logit_scale.shape)}"
        )
    if softmax_mode == "exact" and (all_reduce is None) != (shards_local == num_shards):
        raise ValueError(
            "exact mode needs all_reduce exactly when this rank holds only some shards "
            f"(shards_local={shards_local}, num_shards={num_shards}, all_reduce={all_reduce!r})"
        )

    starts = [int(x) for x in query_start_loc.reshape(-1).tolist()]
    lens = [int(x) for x in seq_lens.reshape(-1).tolist()]
    batch = len(starts) - 1
    if batch < 0 or len(lens) < batch or block_table.shape[0] < batch or (batch and starts[-1] > tokens):
        raise ValueError(
            f"query_start_loc ({len(starts)}), seq_lens ({len(lens)}), block_table "
            f"({block_table.shape[0]} rows) and T={tokens} do not describe one batch"
        )

    compute_dtype = torch.float64 if q_latent.dtype == torch.float64 else torch.float32
    q_lat = q_latent.to(compute_dtype)
    q_rp = q_rope.to(compute_dtype)
    stream_heads = _stream_heads(heads, num_shards, shard_offset, shards_local, softmax_mode)
    shard_ids = torch.arange(shard_offset, shard_offset + shards_local).unsqueeze(1)  # [S, 1]
    if logit_scale is None:
        lam = torch.ones(stream_heads.shape, dtype=compute_dtype, device=q_latent.device)
    else:
        lam = logit_scale.to(compute_dtype)[stream_heads, shard_ids]  # [S, H_k]
    table = block_table.to(torch.long)
    d_s = d_loc // shards_local

    out = q_lat.new_zeros((tokens, heads, d_loc))
    for b in range(batch):
        start, end, seq_len = starts[b], starts[b + 1], lens[b]
        q_len = end - start
        if q_len <= 0:
            continue
        if seq_len < q_len:
            raise ValueError(f"request {b}: seq_len {seq_len} < its {q_len} queries")
        if chunk_tokens is None:
            # Only values every rank shares, so all ranks chunk (and all-reduce) alike.
            per_token = (num_shards + 2) * q_len * heads + num_shards * d_s + d_r
            chunk = max(block_size, _CHUNK_ELEMENTS // per_token)
        else:
            chunk = chunk_tokens
        out[start:end] = _request_attention(
            q_lat[start:end], q_rp[start:end], cache, table[b], seq_len, scale,
            stream_heads, lam, softmax_mode, max(1, chunk // block_size), all_reduce,
        )
    return out.to(q_latent.dtype)


def reference_sharded_latent_attention(
    q_latents: list[torch.Tensor],  # per request [q_len, H, d_c]
    q_ropes: list[torch.Tensor],  # per request [q_len, H, d_R]
    latents: list[torch.Tensor],  # per request [L, d_c]
    rope_keys: list[torch.Tensor],  # per request [L, d_R]
    scale: float,
    *,
    num_shards: int,
    softmax_mode: str,
    logit_scale: torch.Tensor | None = None,  # [H, num_shards]
) -> list[torch.Tensor]:
    """Slow, obvious float64 sharded-latent attention over all shards (the test oracle).

    The queries are each request's last q_len tokens (causal). Returns per request the
    latent output ``[q_len, H, d_c]`` in float64.
    """
    _check_choice(softmax_mode, SOFTMAX_MODES, "softmax mode")
    f64 = torch.float64
    outs = []
    for q_lat, q_rp, lat, kr in zip(q_latents, q_ropes, latents, rope_keys):
        q_lat, q_rp, lat, kr = (t.to(f64) for t in (q_lat, q_rp, lat, kr))
        q_len, heads, d_c = q_lat.shape
        d_s = _shard_width(d_c, num_shards)
        if softmax_mode == "grouped":
            _check_grouped_heads(heads, num_shards)
        lam = torch.ones(heads, num_shards, dtype=f64) if logit_scale is None else logit_scale.to(f64)
        length = lat.shape[0]
        out = torch.zeros(q_len, heads, d_c, dtype=f64)
        for i in range(q_len):
            keys = slice(0, length - q_len + i + 1)  # causal prefix
            for h in range(heads):
                rope = kr[keys] @ q_rp[i, h]  # [n]
                parts = [
                    lat[keys, j * d_s : (j + 1) * d_s] @ q_lat[i, h, j * d_s : (j + 1) * d_s]
                    for j in range(num_shards)
                ]  # each [n]
                if softmax_mode == "exact":
                    logits = sum(lam[h, j] * parts[j] for j in range(num_shards)) + rope
                    out[i, h] = torch.softmax(scale * logits, dim=0) @ lat[keys]
                    continue
                if softmax_mode == "partitioned":
                    shards = range(num_shards)
                else:
                    shards = [h // (heads // num_shards)]
                for j in shards:
                    probs = torch.softmax(scale * (lam[h, j] * parts[j] + rope), dim=0)
                    out[i, h, j * d_s : (j + 1) * d_s] = probs @ lat[keys, j * d_s : (j + 1) * d_s]
        outs.append(out)
    return outs
