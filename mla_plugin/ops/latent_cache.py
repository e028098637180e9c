"""The paged latent KV cache: rows ``[ĉ_t | k^R_t]`` of width d_c + d_R.

Layout: ``cache[num_blocks, block_size, d_c + d_R]``; token slot ``s`` lives at
``cache.view(-1, d_c + d_R)[s]``. A slot of -1 marks a padded token that must not
be written.

An fp8 cache (``torch.float8_e4m3fn``, one byte per value) stores each value divided by
a per-layer scale σ (vLLM's ``k_scale``, one for the latent and the rope key alike),
saturated to e4m3's range ±448; readers multiply by σ (docs/design.md, "fp8 latent cache").
"""

import torch

# The one fp8 format of the latent cache (vLLM's "fp8" / "fp8_e4m3" on every platform that
# views MLA caches as current_platform.fp8_dtype() = e4m3fn).
FP8_CACHE_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_CACHE_DTYPE).max)  # 448


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_CACHE_DTYPE


def quantize_fp8(values: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``values / σ`` saturated to ±448, as e4m3 (round to nearest even)."""
    return (values.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_CACHE_DTYPE)


def write_latent_cache(
    kv_c_normed: torch.Tensor,  # [T, d_c]
    k_pe: torch.Tensor,  # [T, d_R] or [T, 1, d_R]
    cache: torch.Tensor,  # [num_blocks, block_size, d_c + d_R]
    slot_mapping: torch.Tensor,  # [>= T] int, -1 = padding
    scale: torch.Tensor | float | None = None,  # σ of an fp8 cache ([] or [1] float32); None = 1
) -> None:
    """Store each token's latent and rope key in its slot; skip slots < 0.

    An fp8 cache stores ``value / σ`` (``quantize_fp8``); other caches store the value
    (σ must then be absent)."""
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
    if is_fp8_cache(cache):
        stored = quantize_fp8(rows[valid], 1.0 if scale is None else scale)
    elif scale is not None:
        raise ValueError(f"a cache scale applies to an fp8 cache only, not to a {cache.dtype} cache")
    else:
        stored = rows[valid].to(cache.dtype)
    flat[slots[valid]] = stored


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
