"""Random paged latent caches and batches for tests: permuted block tables, NaN in every
unused slot, padded query rows; and the per-request views the float64 oracles take."""

from dataclasses import dataclass

import torch

from mla_plugin.ops.reference import causal_absorbed_attention


@dataclass
class PagedCase:
    cache: torch.Tensor  # [num_blocks, block_size, d_c + d_R]
    block_table: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    latents: list[torch.Tensor]  # per request [L, d_c], float64 truth
    rope_keys: list[torch.Tensor]  # per request [L, d_R], float64 truth


def make_paged_case(
    seq_lens: list[int],
    d_c: int,
    d_r: int,
    block_size: int,
    dtype: torch.dtype,
    generator: torch.Generator,
    spare_blocks: int = 3,
) -> PagedCase:
    """Scatter each request's rows over randomly chosen blocks of a NaN-filled cache."""
    blocks_per_req = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_req) + spare_blocks
    cache = torch.full((num_blocks, block_size, d_c + d_r), float("nan"), dtype=dtype)
    order = torch.randperm(num_blocks, generator=generator)
    max_blocks = max(blocks_per_req) + 2  # padded table columns
    # Padding entries point at real (NaN) blocks: the kernel must mask, not trust them.
    block_table = order[torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=generator)]
    latents, rope_keys = [], []
    used = 0
    for i, n in enumerate(seq_lens):
        mine = order[used : used + blocks_per_req[i]]
        used += blocks_per_req[i]
        block_table[i, : len(mine)] = mine
        lat = torch.randn(n, d_c, generator=generator, dtype=torch.float64)
        rope = torch.randn(n, d_r, generator=generator, dtype=torch.float64)
        rows = torch.cat([lat, rope], dim=-1).to(dtype)
        for pos in range(n):
            cache[mine[pos // block_size], pos % block_size] = rows[pos]
        # the truth is what the cache holds, after rounding to its dtype
        latents.append(rows[:, :d_c].to(torch.float64))
        rope_keys.append(rows[:, d_c:].to(torch.float64))
    return PagedCase(
        cache=cache,
        block_table=block_table.to(torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        latents=latents,
        rope_keys=rope_keys,
    )


# (q_len, seq_len) per request: a prefill on top of a cached prefix, a fresh prefill,
# and decodes at different lengths.
MIXED_REQUESTS = [(9, 23), (1, 1), (1, 40), (5, 5), (1, 17)]


def make_batch(requests, d_c, d_r, heads, block_size, dtype, gen, padded_rows: int = 2):
    """A NaN-poisoned paged case plus random queries; returns (case, q_lat, q_rope, qsl).

    ``requests`` is a list of (q_len, seq_len); ``padded_rows`` query rows follow the last
    request (padding the attention must leave zero).
    """
    q_lens = [q for q, _ in requests]
    case = make_paged_case([n for _, n in requests], d_c, d_r, block_size, dtype, gen)
    tokens = sum(q_lens) + padded_rows
    q_lat = torch.randn(tokens, heads, d_c, generator=gen, dtype=torch.float64).to(dtype)
    q_rope = torch.randn(tokens, heads, d_r, generator=gen, dtype=torch.float64).to(dtype)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    return case, q_lat, q_rope, qsl


def per_request(tensor, qsl):
    """Split [T, ...] rows by query_start_loc into float64 pieces."""
    bounds = qsl.tolist()
    return [tensor[a:b].double() for a, b in zip(bounds[:-1], bounds[1:])]


def rank_view(cache, q_lat, d_c, num_shards, offset, local):
    """The cache and queries one rank sees: its latent slices, then the full rope key."""
    d_s = d_c // num_shards
    cols = slice(offset * d_s, (offset + local) * d_s)
    rank_cache = torch.cat([cache[..., cols], cache[..., d_c:]], dim=-1)  # [nb, bs, d_loc + d_R]
    return rank_cache, q_lat[..., cols]


def random_logit_scale(heads, num_shards, gen):
    return 0.5 + 2.0 * torch.rand(heads, num_shards, generator=gen, dtype=torch.float64)


def mla_reference(q_lat, q_rope, qsl, case, scale):
    """Unsharded causal MLA per request (float64 oracle): list of out[q_len, H, d_c]."""
    pieces = zip(per_request(q_lat, qsl), per_request(q_rope, qsl), case.latents, case.rope_keys)
    return [causal_absorbed_attention(ql, qr, lat, kr, scale)[0] for ql, qr, lat, kr in pieces]


class SimulatedAllReduce:
    """The all-reduce of simulated TP ranks run one after another in one process, in two passes:
    first every rank runs with ``of_rank(rank, collect=True)``, which keeps its partial logits
    (one buffer per call, i.e. per chunk of context) and leaves them as they are; then with
    ``collect=False`` each call returns the sum over ranks of the buffers of that call."""

    def __init__(self):
        self.partials: dict[int, list[torch.Tensor]] = {}
        self.calls: dict[int, int] = {}

    def of_rank(self, rank: int, collect: bool):
        def all_reduce(logits):
            if collect:
                self.partials.setdefault(rank, []).append(logits.clone())
                return None
            call = self.calls.get(rank, 0)
            self.calls[rank] = call + 1
            return sum(kept[call].to(logits.device) for kept in self.partials.values())

        return all_reduce
