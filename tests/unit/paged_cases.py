"""Random paged latent caches for tests: permuted block tables, NaN in every unused slot."""

from dataclasses import dataclass

import torch


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
