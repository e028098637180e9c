"""One simulated decode step of our backends at the ops level, for the host-sync detector
(CPU) and the CUDA-graph capture (GPU): the cache write of the step's new tokens (padded
rows with slot -1, as vLLM pads a captured batch), the attention over the paged cache, and
for the exact softmax the merge of two partial results by their log-sum-exp (as vLLM merges
a decode's result with another part: a cascade prefix, a context-parallel shard).

The modes are the backends' calls of the seam: ``mla`` (mla_plugin; mla_plugin_gla exact at
TP 1), ``exact_tp`` (an mla_plugin_gla rank holding one of two slices: the partial logits go
through ``all_reduce``), ``partitioned`` and ``grouped`` (a rank of mla_plugin_gla).
Every tensor a step reads lives in ``StepBuffers``: a captured graph replays over them.
"""

from dataclasses import dataclass

import torch

from mla_plugin.ops import latent_cache, paged_attention
from mla_plugin.ops.latent_cache import FP8_CACHE_DTYPE, quantize_fp8
from mla_plugin.ops.sharded_latent import LatentSlices

MODES = ("mla", "exact_tp", "partitioned", "grouped")


def slices_for(mode: str) -> LatentSlices:
    return {
        "mla": LatentSlices(),
        "exact_tp": LatentSlices(num_shards=2, shard_offset=1, shards_local=1, softmax="exact"),
        "partitioned": LatentSlices(num_shards=2, shards_local=2, softmax="partitioned"),
        "grouped": LatentSlices(num_shards=2, shard_offset=1, shards_local=1, softmax="grouped"),
    }[mode]


def stand_in_all_reduce(logits: torch.Tensor) -> None:
    """In place, as NCCL's: the sum over two ranks whose slices hold the same partial logits."""
    logits.mul_(2.0)


@dataclass
class StepBuffers:
    """Static inputs of one step: B decode requests (one query each) plus padded rows."""

    kv_c: torch.Tensor  # [T, d_loc] new latent rows
    k_pe: torch.Tensor  # [T, 1, d_R] new rope keys
    slots: torch.Tensor  # [T] long, -1 = padded row
    q_latent: torch.Tensor  # [T, H, d_loc]
    q_rope: torch.Tensor  # [T, H, d_R]
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_table: torch.Tensor  # [B, W] int32
    prefix_lens: torch.Tensor  # [B] int32, the other part's lengths (exact modes)
    prefix_table: torch.Tensor  # [B, W] int32
    cache: torch.Tensor  # [num_blocks, block_size, d_loc + d_R], NaN where unused
    cache_scale: torch.Tensor | None  # [1] float32, σ of an fp8 cache


def make_buffers(batch, padded, heads, d_loc, d_r, block_size, width, cache_dtype, query_dtype=torch.float32,
                 device="cpu"):
    """Buffers of the right shapes (contents from ``fill``): room for every request's blocks
    in its own table and in the other part's, plus vLLM's null block 0."""
    tokens = batch + padded
    num_blocks = 1 + batch * width + batch * width // 2
    cache = torch.full((num_blocks, block_size, d_loc + d_r), float("nan"))
    fp8 = cache_dtype == FP8_CACHE_DTYPE
    buffers = StepBuffers(
        kv_c=torch.zeros(tokens, d_loc, dtype=query_dtype), k_pe=torch.zeros(tokens, 1, d_r, dtype=query_dtype),
        slots=torch.zeros(tokens, dtype=torch.long),
        q_latent=torch.zeros(tokens, heads, d_loc, dtype=query_dtype),
        q_rope=torch.zeros(tokens, heads, d_r, dtype=query_dtype),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
        seq_lens=torch.zeros(batch, dtype=torch.int32), block_table=torch.zeros(batch, width, dtype=torch.int32),
        prefix_lens=torch.zeros(batch, dtype=torch.int32), prefix_table=torch.zeros(batch, width, dtype=torch.int32),
        cache=quantize_fp8(cache, 0.05) if fp8 else cache.to(cache_dtype),
        cache_scale=torch.tensor([0.05]) if fp8 else None,
    )
    for name, value in vars(buffers).items():
        if value is not None:
            setattr(buffers, name, value.to(device))
    return buffers


def fill(buffers: StepBuffers, seq_lens: list[int], prefix_lens: list[int], gen: torch.Generator) -> None:
    """New random contents in place: lengths, a random block assignment, slots of each
    request's newest token (-1 for the padded rows), queries, new rows, the cached rows."""
    batch, width = buffers.block_table.shape
    num_blocks, block_size, _ = buffers.cache.shape
    device = buffers.cache.device
    order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0: vLLM's null block
    assert max(seq_lens + prefix_lens) <= width * block_size
    table = order[: batch * width].reshape(batch, width)
    # The other part's blocks: half of them shared with the step's (as a common prefix is).
    prefix_table = order[batch * width // 2:][: batch * width].reshape(batch, width)
    rows = buffers.cache.shape[-1]
    noise = torch.full((num_blocks, block_size, rows), float("nan"))  # NaN in every unused slot
    for tab, lens in ((table, seq_lens), (prefix_table, prefix_lens)):
        for b, n in enumerate(lens):
            for pos in range(n):
                noise[tab[b, pos // block_size], pos % block_size] = torch.randn(rows, generator=gen)
    if buffers.cache_scale is not None:
        cache = quantize_fp8(noise, buffers.cache_scale.cpu())
    else:
        cache = noise.to(buffers.cache.dtype)
    buffers.cache.copy_(cache.to(device))
    newest = torch.tensor([n - 1 for n in seq_lens])
    slots = table.gather(1, (newest // block_size).unsqueeze(1)).squeeze(1) * block_size + newest % block_size
    padded = buffers.slots.shape[0] - batch
    buffers.slots.copy_(torch.cat([slots, torch.full((padded,), -1)]).to(device))
    buffers.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32).to(device))
    buffers.prefix_lens.copy_(torch.tensor(prefix_lens, dtype=torch.int32).to(device))
    buffers.block_table.copy_(table.to(torch.int32).to(device))
    buffers.prefix_table.copy_(prefix_table.to(torch.int32).to(device))
    for name in ("kv_c", "k_pe", "q_latent", "q_rope"):
        target = getattr(buffers, name)
        target.copy_(torch.randn(target.shape, generator=gen).to(target.dtype).to(device))


def decode_step(buffers: StepBuffers, mode: str, kernel: str, max_seq_len: int, scale: float = 0.125):
    """Write, attend, merge; returns the step's outputs (out, and lse in the exact modes)."""
    b = buffers
    fp8 = b.cache.dtype == FP8_CACHE_DTYPE
    # Through the module attribute: a test can plant another write here.
    latent_cache.write_latent_cache(b.kv_c, b.k_pe, b.cache, b.slots, scale=b.cache_scale if fp8 else None)
    slices = slices_for(mode)
    exact = slices.softmax == "exact"
    common = dict(slices=slices, all_reduce=stand_in_all_reduce if mode == "exact_tp" else None, max_query_len=1,
                  max_seq_len=max_seq_len, return_lse=exact, kernel=kernel, cache_scale=b.cache_scale)
    result = paged_attention.paged_latent_attention(
        b.q_latent, b.q_rope, b.cache, b.query_start_loc, b.seq_lens, b.block_table, scale, **common)
    if not exact:
        return (result,)
    out, lse = result
    other_out, other_lse = paged_attention.paged_latent_attention(
        b.q_latent, b.q_rope, b.cache, b.query_start_loc, b.prefix_lens, b.prefix_table, scale, **common)
    merged, merged_lse = paged_attention.merge_partial_attention(out.float(), lse, other_out.float(), other_lse)
    return merged, merged_lse
