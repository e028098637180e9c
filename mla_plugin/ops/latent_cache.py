"""The paged latent KV cache: rows ``[ĉ_t | k^R_t]`` of width d_c + d_R.

Layout: ``cache[num_blocks, block_size, d_c + d_R]``; token slot ``s`` lives at
``cache.view(-1, d_c + d_R)[s]``. A slot of -1 marks a padded token that must not
be written.
"""

import torch


def write_latent_cache(
    kv_c_normed: torch.Tensor,  # [T, d_c]
    k_pe: torch.Tensor,  # [T, d_R] or [T, 1, d_R]
    cache: torch.Tensor,  # [num_blocks, block_size, d_c + d_R]
    slot_mapping: torch.Tensor,  # [>= T] int, -1 = padding
) -> None:
    """Store each token's latent and rope key in its slot; skip slots < 0."""
    if cache.numel() == 0:
        return
    d_c = kv_c_normed.shape[-1]
    k_pe = k_pe.reshape(k_pe.shape[0], -1)  # [T, d_R]
    width = cache.shape[-1]
    if d_c + k_pe.shape[-1] != width:
        raise ValueError(
            f"latent ({d_c}) + rope ({k_pe.shape[-1]}) != cache row width ({width})"
        )
    num_tokens = min(kv_c_normed.shape[0], slot_mapping.numel())
    slots = slot_mapping.reshape(-1)[:num_tokens].to(torch.long)
    valid = slots >= 0
    rows = torch.cat([kv_c_normed[:num_tokens], k_pe[:num_tokens]], dim=-1)  # [T, d_c+d_R]
    flat = cache.view(-1, width)  # [num_blocks * block_size, d_c + d_R]
    flat[slots[valid]] = rows[valid].to(cache.dtype)


def gather_sequence(
    cache: torch.Tensor,  # [num_blocks, block_size, D]
    block_table_row: torch.Tensor,  # [max_blocks]
    seq_len: int,
) -> torch.Tensor:
    """One sequence's cached rows in order, ``[seq_len, D]`` (a plain loop; for tests)."""
    block_size = cache.shape[1]
    rows = []
    for pos in range(seq_len):
        block = int(block_table_row[pos // block_size])
        rows.append(cache[block, pos % block_size])
    if not rows:
        return cache.new_empty((0, cache.shape[-1]))
    return torch.stack(rows)
