"""Paged latent attention, the one seam every backend calls (MLA and the sharded latent).

Symbols as in docs/design.md (Glossary; sections 2-4); ō_h is head h's latent output,
before W_UV.

Request b owns query rows ``query_start_loc[b] : query_start_loc[b+1]`` (q_len_b of them,
1 for a decode); they are its last q_len_b cached tokens, so query i sits at position
p_b,i = L_b − q_len_b + i (L_b = ``seq_lens[b]``) and attends to positions t ≤ p_b,i.
The cache holds rows ``[ĉ_t | k^R_t]`` (this rank's latent slices, then the rope key);
the absorbed query is ``q̃_h`` (d_loc values) with the rope query ``q^R_h`` (d_R values).

A *stream* is one softmax. With τ the scale and λ_{h,j} the slice logit scale
(``LatentSlices``, see ``sharded_latent.py``):

    exact (one stream per head; MLA is one slice with λ = 1):
        s_h,t = τ (Σ_j λ_h,j q̃_h^(j) · ĉ_t^(j) + q^R_h · k^R_t)
        (Σ_j over slices of other ranks by ``all_reduce``),   ō_h = Σ_t softmax_t(s_h) ĉ_t
    partitioned / grouped (one stream per (local slice j, head h reading it)):
        s^(j)_h,t = τ (λ_h,j q̃_h^(j) · ĉ_t^(j) + q^R_h · k^R_t),   ō_h^(j) = Σ_t softmax_t(s^(j)_h) ĉ_t^(j)

Requests are batched: queries are padded to ``max_query_len`` per request and keys
past L_b (or past the causal position) are masked to -inf; their slots, whatever the
unused cache memory holds there (NaN included), are never read: the gather reads the
request's last token in their place. The context is
processed in chunks of whole blocks (split-K, as a GPU kernel would) whose normalised
partial results (ō_a, lse_a) are merged by their log-sum-exp:

    lse = log(e^lse_a + e^lse_b),   ō = ō_a e^(lse_a − lse) + ō_b e^(lse_b − lse)

An empty part has lse = −inf and contributes nothing; a stream with no key at all
(an empty request) gives ō = 0, lse = −inf, never NaN.

An fp8 cache (``latent_cache.py``) holds values / σ; every row read is multiplied by σ
(``cache_scale``, a device tensor: never read on the host) before any product.

Nothing here reads a tensor's value on the host (no ``.item()``, ``.tolist()``,
``bool(tensor)``): loop bounds come from shapes and from the host-side hints
``max_query_len`` / ``max_seq_len``, so a GPU kernel can replace this one function and
CUDA graphs can capture it. Computed in float32 (float64 for float64 queries).
"""

from collections.abc import Callable

import torch

from mla_plugin.ops.kernel_choice import kernel_for, note_kernel_ran
from mla_plugin.ops.latent_cache import is_fp8_cache
from mla_plugin.ops.sharded_latent import ONE_SLICE, LatentSlices, compute_dtype_for

# Upper bound on one chunk's working set (gathered rows + logits), in elements.
_CHUNK_ELEMENTS = 1 << 22

AllReduce = Callable[[torch.Tensor], torch.Tensor | None]


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


def _check_inputs(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slices: LatentSlices,
    all_reduce: AllReduce | None,
    return_lse: bool,
    cache_scale: torch.Tensor | None = None,
) -> None:
    """Shape and option checks (host metadata only, never tensor values)."""
    if cache_scale is not None and not is_fp8_cache(cache):
        raise ValueError(f"cache_scale applies to an fp8 (float8_e4m3fn) cache only, not to a {cache.dtype} cache")
    if cache_scale is not None and (not isinstance(cache_scale, torch.Tensor) or cache_scale.numel() != 1):
        raise ValueError("cache_scale must be a one-element tensor (σ of the fp8 cache, e.g. vLLM's layer._k_scale)")
    if cache.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16) and not is_fp8_cache(cache):
        raise ValueError(f"cache dtype {cache.dtype} is not a latent cache dtype (float32/bfloat16/float16, "
                         "float64, or float8_e4m3fn with cache_scale)")
    if q_latent.dim() != 3:
        raise ValueError(f"q_latent must be [T, H, d_loc], got {tuple(q_latent.shape)}")
    tokens, heads, d_loc = q_latent.shape
    d_r = q_rope.shape[-1]
    if q_rope.dim() != 3 or q_rope.shape[:2] != (tokens, heads):
        raise ValueError(f"q_rope shape {tuple(q_rope.shape)} does not match q_latent {tuple(q_latent.shape)}")
    slices.check(heads, d_loc)
    if cache.dim() != 3 or cache.shape[-1] != d_loc + d_r:
        raise ValueError(
            f"cache row width {cache.shape[-1]} != d_loc {d_loc} + d_R {d_r}: the cache must be "
            "[num_blocks, block_size, d_loc + d_R] with this rank's latent slices, then the rope key"
        )
    if slices.softmax == "exact" and (all_reduce is None) != slices.holds_all:
        raise ValueError(
            "exact mode needs all_reduce exactly when this rank holds only some shards "
            f"(shards_local={slices.shards_local}, num_shards={slices.num_shards}, all_reduce={all_reduce!r})"
        )
    if return_lse and slices.softmax != "exact":
        raise ValueError(
            f"return_lse: the {slices.softmax!r} softmax has one log-sum-exp per slice, not per head; "
            "ask for it with softmax='exact' only"
        )
    batch = query_start_loc.numel() - 1
    if batch < 0 or seq_lens.numel() < batch or block_table.dim() != 2 or block_table.shape[0] < batch:
        raise ValueError(
            f"query_start_loc ({query_start_loc.numel()} entries = B + 1), seq_lens ({seq_lens.numel()}) "
            f"and block_table ({tuple(block_table.shape)}, [B, max_blocks]) do not describe one batch"
        )


class _QueryLayout:
    """Token-major rows ``[T, ...]`` <-> request-major ``[B, P, ...]`` (P = max_query_len,
    query rows per request).

    Row i of request b is token ``starts[b] + i`` when i < q_len_b; other padded rows
    read a real token and are dropped on the way back.
    """

    def __init__(self, starts: torch.Tensor, tokens: int, max_query_len: int):  # starts [B + 1] long
        offsets = torch.arange(max_query_len, device=starts.device)
        token = starts[:-1].unsqueeze(1) + offsets  # [B, P]
        self.gather_rows = token.clamp(max=tokens - 1).reshape(-1)  # [B * P]
        q_lens = (starts[1:] - starts[:-1]).unsqueeze(1)  # [B, 1]
        # Padded rows go to a spare row T, cut off after the copy.
        self.scatter_rows = torch.where(offsets < q_lens, token, tokens).reshape(-1)  # [B * P]
        self.shape = (starts.numel() - 1, max_query_len)
        self.tokens = tokens

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, ...]`` -> ``[B, P, ...]``."""
        return x.index_select(0, self.gather_rows).reshape(*self.shape, *x.shape[1:])

    def unpad(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """``[B, P, ...]`` -> ``[T, ...]``, ``fill`` in rows no request owns."""
        rows = x.reshape(-1, *x.shape[2:])  # [B * P, ...]
        out = rows.new_full((self.tokens + 1, *rows.shape[1:]), fill)
        return out.index_copy_(0, self.scatter_rows, rows)[: self.tokens]


def _slots(cache: torch.Tensor) -> torch.Tensor:  # [num_blocks, block_size, D]
    """The cache as ``[num_blocks * block_size, D]`` slot rows (a view; latent_cache.py's layout)."""
    try:
        return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2])
    except RuntimeError as exc:
        raise ValueError(
            f"the cache's blocks and slots must be one run of rows (slot s at cache.view(-1, D)[s], as "
            f"write_latent_cache stores them); got shape {tuple(cache.shape)} strides {cache.stride()}"
        ) from exc


def _default_chunk_blocks(
    batch: int, max_query_len: int, heads: int, slices: LatentSlices, d_loc: int, d_r: int, block_size: int
) -> int:
    """Blocks per chunk within ``_CHUNK_ELEMENTS``; from values every rank shares.

    All ranks of an exact all-reduce must chunk alike, so this uses the global latent
    width, never the local one.
    """
    d_c = slices.num_shards * (d_loc // slices.shards_local)
    logits = (slices.num_shards + 2) * max_query_len * heads
    per_token = max(1, batch * (logits + d_c + d_r))
    return max(1, _CHUNK_ELEMENTS // per_token // block_size)


def _gather_chunk(
    cache_rows: torch.Tensor,  # [num_blocks * block_size, D], the cache's slots
    table: torch.Tensor,  # [B, max_blocks] long, clamped into range
    seq_lens: torch.Tensor,  # [B] long
    block_size: int,
    first_block: int,
    num: int,
    compute_dtype: torch.dtype,
    cache_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of table columns ``first_block .. +num``: ``(rows[B, C, D], positions[C], valid[B, C])``.

    A slot at or past a request's length (whatever the cache holds there, NaN included)
    is read from the request's last token instead, so every row is a real one; the
    caller masks those logits. An empty request has no real row: its rows are garbage
    and all of its logits are masked.
    """
    batch = table.shape[0]
    device = cache_rows.device
    positions = first_block * block_size + torch.arange(num * block_size, device=device)  # [C]
    valid = positions.unsqueeze(0) < seq_lens.unsqueeze(1)  # [B, C]
    last = (seq_lens - 1).clamp(min=0).unsqueeze(1)  # [B, 1]
    safe = torch.where(valid, positions.unsqueeze(0), last)  # [B, C], positions with a real row
    columns = (safe // block_size).clamp(max=table.shape[1] - 1)
    slots = table.gather(1, columns) * block_size + safe % block_size  # [B, C]
    rows = cache_rows.index_select(0, slots.reshape(-1))  # [B * C, D]
    rows = rows.reshape(batch, -1, cache_rows.shape[-1]).to(compute_dtype)
    if cache_scale is not None:  # fp8: stored values times σ
        rows = rows * cache_scale.to(compute_dtype).reshape(())
    return rows, positions, valid


def _reduce(all_reduce: AllReduce | None, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks; accept in-place all-reduces and ones that return the sum."""
    if all_reduce is None:
        return tensor
    result = all_reduce(tensor)
    return tensor if result is None else result


def _chunk_softmax(
    scores: torch.Tensor,  # [B, K, M, C], masked with -inf
    values: torch.Tensor,  # [B, K, C, d] or broadcastable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-normalised attention over one chunk: ``(out[B, K, M, d], lse[B, K, M])``."""
    peak = scores.amax(dim=-1)  # [B, K, M]
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    probs = torch.exp(scores - peak.unsqueeze(-1))  # [B, K, M, C], 0 where masked
    total = probs.sum(dim=-1, keepdim=True)  # [B, K, M, 1]
    out = torch.matmul(probs, values) / total  # [B, K, M, d]
    # No key at all (an empty request): 0 and -inf, whatever its garbage rows held.
    out = torch.where(total > 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, peak + torch.log(total.squeeze(-1))


class _Streams:
    """The queries of every softmax stream, request-major, ready for chunked products.

    exact: one stream of all heads over the local latent (λ folded into the query).
    partitioned / grouped: one stream per local slice over the heads that read it.
    """

    def __init__(
        self,
        queries: torch.Tensor,  # [B, P, H, d_loc + d_R]  [q̃ | q^R], compute dtype
        d_loc: int,
        slices: LatentSlices,
        fused_rope: bool,
    ):
        batch, max_query_len, heads, width = queries.shape
        self.shards = slices.shards_local
        self.d_loc, self.d_s = d_loc, d_loc // self.shards
        self.max_query_len = max_query_len
        self.exact = slices.softmax == "exact"
        lam = slices.local_logit_scale(queries.dtype, queries.device)  # [H, S] or None
        if lam is not None:
            scaled = queries[..., :d_loc].reshape(batch, max_query_len, heads, self.shards, self.d_s)
            scaled = (scaled * lam.unsqueeze(-1)).reshape(batch, max_query_len, heads, d_loc)
            queries = torch.cat([scaled, queries[..., d_loc:]], dim=-1)
        if self.exact:
            flat = queries.reshape(batch, max_query_len * heads, width)  # [B, M, D]
            self.fused = flat if fused_rope else None
            self.latent = flat[..., :d_loc].unsqueeze(1)  # [B, 1, M, d_loc]
            self.rope = flat[..., d_loc:].unsqueeze(1)  # [B, 1, M, d_R]
            self.heads_per_stream = heads
            return
        self.fused = None
        self.stream_heads = slices.stream_heads(heads, queries.device)  # [S, H_k]
        self.shard_ids = torch.arange(self.shards, device=queries.device).unsqueeze(1)  # [S, 1]
        self.heads_per_stream = self.stream_heads.shape[1]
        by_slice = queries[..., :d_loc].reshape(batch, max_query_len, heads, self.shards, self.d_s)
        latent = by_slice[:, :, self.stream_heads, self.shard_ids, :]  # [B, P, S, H_k, d_s]
        rope = queries[..., d_loc:][:, :, self.stream_heads, :]  # [B, P, S, H_k, d_R]
        rows = max_query_len * self.heads_per_stream
        self.latent = latent.transpose(1, 2).reshape(batch, self.shards, rows, self.d_s)  # [B, S, M_k, d_s]
        self.rope = rope.transpose(1, 2).reshape(batch, self.shards, rows, -1)  # [B, S, M_k, d_R]

    def scores_and_values(
        self, rows: torch.Tensor, scale: float, all_reduce: AllReduce | None  # rows [B, C, D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled logits ``[B, K, M, C]`` (unmasked) and the values ``[B, K, C, d]`` of one chunk."""
        batch, ctx = rows.shape[:2]
        latent_rows, rope_rows = rows[..., : self.d_loc], rows[..., self.d_loc :]  # [B, C, d_loc], [B, C, d_R]
        if self.fused is not None:  # exact, every slice here: one product over [ĉ | k^R]
            scores = torch.baddbmm(
                rows.new_empty(()), self.fused, rows.transpose(1, 2), beta=0.0, alpha=scale
            )  # [B, M, C]
            return scores.unsqueeze(1), latent_rows.unsqueeze(1)
        rope_scores = torch.matmul(self.rope, rope_rows.transpose(1, 2).unsqueeze(1))  # [B, K, M, C]
        if self.exact:
            partial = torch.bmm(self.latent[:, 0], latent_rows.transpose(1, 2))  # [B, M, C]
            latent_scores = _reduce(all_reduce, partial).unsqueeze(1)  # [B, 1, M, C]
            return (latent_scores + rope_scores) * scale, latent_rows.unsqueeze(1)
        keys = latent_rows.reshape(batch, ctx, self.shards, self.d_s).transpose(1, 2)  # [B, S, C, d_s]
        latent_scores = torch.matmul(self.latent, keys.transpose(2, 3))  # [B, S, M_k, C]
        return (latent_scores + rope_scores) * scale, keys

    def to_heads(self, out: torch.Tensor, heads: int) -> torch.Tensor:
        """Stream outputs ``[B, K, M_k, d]`` as ``[B, P, H, d_loc]`` (zeros where no stream wrote)."""
        batch = out.shape[0]
        if self.exact:
            return out.reshape(batch, self.max_query_len, heads, self.d_loc)
        by_stream = out.reshape(batch, self.shards, self.max_query_len, self.heads_per_stream, self.d_s)
        result = out.new_zeros((batch, self.max_query_len, heads, self.shards, self.d_s))
        result[:, :, self.stream_heads, self.shard_ids, :] = by_stream.transpose(1, 2)  # [B, P, S, H_k, d_s]
        return result.reshape(batch, self.max_query_len, heads, self.d_loc)


def paged_latent_attention(
    q_latent: torch.Tensor,  # [T, H, d_loc]  absorbed queries q̃ over this rank's slices
    q_rope: torch.Tensor,  # [T, H, d_R]  rope queries q^R (already rotated)
    cache: torch.Tensor,  # [num_blocks, block_size, d_loc + d_R]
    query_start_loc: torch.Tensor,  # [B + 1] int, nondecreasing
    seq_lens: torch.Tensor,  # [B] int, cached tokens per request, its queries included
    block_table: torch.Tensor,  # [B, max_blocks] int
    scale: float,
    *,
    slices: LatentSlices = ONE_SLICE,
    all_reduce: AllReduce | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    chunk_tokens: int | None = None,
    return_lse: bool = False,
    kernel: str | None = None,
    cache_scale: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Causal latent attention over a paged cache; ``out[T, H, d_loc]`` (and ``lse[T, H]``).

    ``out`` is in q_latent's dtype; rows past ``query_start_loc[B]`` (padding) are 0.
    ``lse`` (``return_lse``, exact softmax only) is the natural-log log-sum-exp of the
    scaled logits in float32 (float64 for float64 queries), -inf for a query with no key.

    ``max_query_len`` and ``max_seq_len`` are host-side upper bounds on the requests'
    q_len and L (the caller has them as Python ints, e.g. from vLLM's metadata); they
    size the query padding and the chunk loop. Without them the bounds are T and the
    block table's width (shapes, never a host sync), correct but slower.

    ``all_reduce`` sums a tensor over the ranks that hold the other slices (in place, or
    returning the sum). Only ``exact`` uses it, and needs it exactly when this rank does
    not hold every slice; every rank must call with the same batch, hints and
    ``chunk_tokens`` so their all-reduces pair up. ``chunk_tokens`` bounds the context
    processed at once (rounded down to whole blocks; the default depends only on values
    all ranks share).

    Workspace, bounded independently of T·L: here one chunk's rows and logits, about
    ``_CHUNK_ELEMENTS`` (4 Mi) values unless one block of the batch is already larger; in the
    Triton path the exact softmax over ranks chunks its float32 partial logits to at most
    max(256 MiB, T·H·64·4 bytes), i.e. 256 MiB at 128 heads for up to 8192 query rows at
    any context (``triton_paged_attention.LOGITS_BUDGET_BYTES``).

    ``kernel`` picks the implementation: ``"torch"`` (this module) or ``"triton"``
    (``triton_paged_attention.py``, the same function); None follows ``MLA_PLUGIN_KERNEL``
    and otherwise takes Triton on CUDA (``kernel_choice.py``).

    ``cache_scale`` is σ of an fp8 (``float8_e4m3fn``) cache, a one-element float32 tensor
    (None: 1); the cache holds values / σ (``write_latent_cache``).
    """
    _check_inputs(q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, slices, all_reduce, return_lse,
                  cache_scale)
    kernel = kernel_for(q_latent.device, q_latent.dtype, kernel)
    if kernel == "triton":
        from mla_plugin.ops.triton_paged_attention import triton_paged_latent_attention

        return triton_paged_latent_attention(
            q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, scale, slices, all_reduce,
            max_seq_len, return_lse, cache_scale=cache_scale,
        )
    batch = query_start_loc.numel() - 1
    max_query_len = q_latent.shape[0] if max_query_len is None else min(max_query_len, q_latent.shape[0])
    context = block_table.shape[1] * cache.shape[1] if max_seq_len is None else max_seq_len
    needed_blocks = min(-(-context // cache.shape[1]), block_table.shape[1])
    if batch == 0 or max_query_len <= 0 or needed_blocks <= 0:
        tokens, heads, d_loc = q_latent.shape
        out = q_latent.new_zeros((tokens, heads, d_loc))
        lse = torch.full((tokens, heads), float("-inf"), dtype=compute_dtype_for(q_latent.dtype),
                         device=q_latent.device)
        return (out, lse) if return_lse else out
    batch_view = _TorchBatch(q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, slices, all_reduce,
                             max_query_len, cache_scale)
    if chunk_tokens is None:
        chunk_blocks = _default_chunk_blocks(batch, max_query_len, q_latent.shape[1], slices, q_latent.shape[2],
                                             q_rope.shape[-1], cache.shape[1])
    else:
        chunk_blocks = max(1, chunk_tokens // cache.shape[1])
    out, lse = batch_view.attend(scale, needed_blocks, chunk_blocks, return_lse)
    note_kernel_ran("torch")
    return (out, lse) if return_lse else out


class _TorchBatch:
    """One call of the plain-torch path: the batch request-major, attended chunk by chunk."""

    def __init__(self, q_latent, q_rope, cache, query_start_loc, seq_lens, block_table, slices, all_reduce,
                 max_query_len: int, cache_scale):
        tokens, self.heads, d_loc = q_latent.shape
        batch = query_start_loc.numel() - 1
        self.out_dtype, self.all_reduce, self.cache_scale = q_latent.dtype, all_reduce, cache_scale
        self.compute_dtype = compute_dtype_for(q_latent.dtype)
        self.block_size = cache.shape[1]
        self.max_query_len = max_query_len
        starts = query_start_loc.reshape(-1).to(torch.long)  # [B + 1]
        self.lens = seq_lens.reshape(-1)[:batch].to(torch.long)  # [B]
        # Padded table entries may hold any value: clamp into range; masking drops their rows.
        self.table = block_table[:batch].to(torch.long).clamp(0, cache.shape[0] - 1)  # [B, max_blocks]
        self.cache_rows = _slots(cache)  # [num_blocks * block_size, D]
        self.layout = _QueryLayout(starts, tokens, max_query_len)
        queries = self.layout.pad(torch.cat([q_latent, q_rope], dim=-1)).to(self.compute_dtype)  # [B, P, H, D]
        self.streams = _Streams(queries, d_loc, slices, fused_rope=all_reduce is None)
        self.q_positions = None
        if max_query_len > 1:
            q_lens = starts[1:] - starts[:-1]  # [B]
            offsets = torch.arange(max_query_len, device=q_latent.device)
            self.q_positions = (self.lens - q_lens).unsqueeze(1) + offsets  # [B, P]

    def chunk(self, scale: float, first: int, num: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax-normalised ``(out[B, K, M, d], lse[B, K, M])`` over table columns ``first .. +num``."""
        rows, positions, valid = _gather_chunk(self.cache_rows, self.table, self.lens, self.block_size, first, num,
                                               self.compute_dtype, self.cache_scale)
        scores, values = self.streams.scores_and_values(rows, scale, self.all_reduce)  # [B, K, M, C]
        allowed = valid.unsqueeze(1)  # [B, 1, C]: a decode sees its whole context
        if self.q_positions is not None:
            allowed = allowed & (positions <= self.q_positions.unsqueeze(-1))  # [B, P, C]
        batch, streams = scores.shape[:2]
        per_query = scores.view(batch, streams, self.max_query_len, -1, scores.shape[-1])  # [B, K, P, H_k, C]
        per_query.masked_fill_(~allowed.unsqueeze(1).unsqueeze(3), float("-inf"))
        return _chunk_softmax(scores, values)

    def attend(self, scale: float, needed_blocks: int, chunk_blocks: int, return_lse: bool):
        """``(out[T, H, d_loc], lse[T, H] or None)`` over the first ``needed_blocks`` table columns
        (the LSE of the exact softmax only: one per head)."""
        out = lse = None
        for first in range(0, needed_blocks, chunk_blocks):
            part_out, part_lse = self.chunk(scale, first, min(chunk_blocks, needed_blocks - first))
            out, lse = (part_out, part_lse) if out is None else merge_partial_attention(out, lse, part_out, part_lse)
        batch = out.shape[0]
        out = self.layout.unpad(self.streams.to_heads(out, self.heads).to(self.out_dtype), 0.0)  # [T, H, d_loc]
        if not return_lse:
            return out, None
        return out, self.layout.unpad(lse.reshape(batch, self.max_query_len, self.heads), float("-inf"))  # [T, H]
