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
    (σ must then be absent).

    No host synchronisation and no size that depends on a tensor's value (a CUDA graph
    captures it; vLLM pads a captured decode batch with slot -1): instead of dropping the
    padded rows, each one is sent to the slot of the first valid row of this call with that
    row's bytes (``_padding_redirect``), so every duplicate target receives identical bytes
    and the result is deterministic. With no valid row at all, slot 0 is rewritten with its
    own current bytes (vLLM's block 0 is its reserved null block)."""
    if cache.numel() == 0:
        return
    d_c = kv_c_normed.shape[-1]
    k_pe = k_pe.reshape(k_pe.shape[0], -1)  # [T, d_R]
    width = cache.shape[-1]
    if d_c + k_pe.shape[-1] != width:
        raise ValueError(
            f"latent ({d_c}) + rope ({k_pe.shape[-1]}) != cache row width ({width})"
        )
    if is_fp8_cache(cache):
        quantize = lambda rows: quantize_fp8(rows, 1.0 if scale is None else scale)  # noqa: E731
    elif scale is not None:
        raise ValueError(f"a cache scale applies to an fp8 cache only, not to a {cache.dtype} cache")
    else:
        quantize = lambda rows: rows.to(cache.dtype)  # noqa: E731
    num_tokens = min(kv_c_normed.shape[0], slot_mapping.numel())
    if num_tokens == 0:
        return
    slots = slot_mapping.reshape(-1)[:num_tokens].to(torch.long)  # [T]
    source, target, any_valid = _padding_redirect(slots)
    rows = torch.cat([kv_c_normed[:num_tokens], k_pe[:num_tokens]], dim=-1)  # [T, d_c + d_R]
    # Bytes (uint8 for fp8, where torch.where and index_copy_ may lack float8 kernels).
    flat = _as_bytes(cache.view(-1, width))  # [num_blocks * block_size, W]
    stored = _as_bytes(quantize(rows.index_select(0, source)))  # [T, W]
    stored = torch.where(any_valid, stored, flat[:1])  # no valid row: slot 0's own bytes
    flat.index_copy_(0, target, stored)


def _padding_redirect(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source row [T], target slot [T], any valid [])`` for ``slots`` [T] long, -1 = padding.

    A valid row t writes its own row to its own slot; a padded row copies the first valid
    row (argmax of the mask: the first maximum) and its slot. No valid row: every target is
    slot 0. All on the device, nothing read on the host."""
    valid = slots >= 0  # [T]
    rows = torch.arange(slots.shape[0], device=slots.device)  # [T]
    first_valid = valid.to(torch.uint8).argmax()  # [] (0 when none is valid)
    source = torch.where(valid, rows, first_valid)  # [T]
    any_valid = valid.any()  # []
    target = torch.where(any_valid, slots.index_select(0, source), 0)  # [T]
    return source, target, any_valid


def _as_bytes(x: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor as its uint8 bytes (same shape); others unchanged."""
    return x.view(torch.uint8) if is_fp8_cache(x) else x


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


# e4m3 (float8_e4m3fn) arithmetic and conversions need compute capability 8.9 (Ada, Hopper
# and newer) on NVIDIA GPUs; Triton refuses to compile them below it.
FP8_MIN_CAPABILITY = (8, 9)


def fp8_cache_refusal(capability: tuple[int, int] | None, how_to_fix: str) -> str | None:
    """The one-line reason an fp8 latent cache cannot run on a CUDA device of ``capability``
    ((major, minor); None: not an NVIDIA GPU, nothing to refuse), or None when it can."""
    if capability is None or tuple(capability) >= FP8_MIN_CAPABILITY:
        return None
    major, minor = capability
    return (f"the fp8 (e4m3) latent cache needs an NVIDIA GPU of compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell); this GPU is "
            f"{major}.{minor}. {how_to_fix}")
