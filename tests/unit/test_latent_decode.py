import math

import pytest
import torch

from mla_plugin.ops import gather_sequence, paged_latent_decode, write_latent_cache
from mla_plugin.ops.reference import absorbed_attention, expanded_attention
from tests.unit.paged_cases import make_paged_case

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

SHAPES = [  # (d_c, d_R, heads, block_size)
    (512, 64, 4, 16),
    (256, 32, 3, 8),
    (96, 16, 2, 1),
    (64, 0, 2, 32),  # NoPE latent
    (128, 64, 16, 64),
]


@pytest.mark.parametrize("d_c,d_r,heads,block_size", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_decode_matches_float64_reference(d_c, d_r, heads, block_size, dtype, rng):
    gen = rng
    seq_lens = [1, 37, block_size, 3 * block_size + 5, 70]
    case = make_paged_case(seq_lens, d_c, d_r, block_size, dtype, gen)
    q_lat = torch.randn(len(seq_lens), heads, d_c, generator=gen, dtype=torch.float64)
    q_rope = torch.randn(len(seq_lens), heads, d_r, generator=gen, dtype=torch.float64)
    q_lat_d, q_rope_d = q_lat.to(dtype), q_rope.to(dtype)
    scale = 1.0 / math.sqrt(d_c + d_r)

    # Small chunks force the split-context merge path as well.
    for chunk in (None, max(1, block_size)):
        out, lse = paged_latent_decode(
            q_lat_d, q_rope_d, case.cache, case.block_table, case.seq_lens, scale, chunk_tokens=chunk
        )
        assert out.shape == (len(seq_lens), heads, d_c) and out.dtype == dtype
        assert lse.shape == (len(seq_lens), heads)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()
        for b in range(len(seq_lens)):
            ref_out, ref_lse = absorbed_attention(
                q_lat_d[b].double(), q_rope_d[b].double(), case.latents[b], case.rope_keys[b], scale
            )
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(out[b].double(), ref_out, atol=tol, rtol=tol)
            torch.testing.assert_close(lse[b].double(), ref_lse, atol=tol, rtol=tol)


def test_absorbed_equals_expanded(rng):
    gen = rng
    heads, d_nope, d_v, d_c, d_r, length = 4, 24, 20, 48, 8, 29
    f64 = dict(dtype=torch.float64, generator=gen)
    q_nope, q_rope = torch.randn(heads, d_nope, **f64), torch.randn(heads, d_r, **f64)
    latent, k_rope = torch.randn(length, d_c, **f64), torch.randn(length, d_r, **f64)
    w_uk, w_uv = torch.randn(heads, d_nope, d_c, **f64), torch.randn(heads, d_v, d_c, **f64)
    scale = 0.11
    ref_out, ref_lse = expanded_attention(q_nope, q_rope, latent, k_rope, w_uk, w_uv, scale)
    q_latent = torch.einsum("hn,hnc->hc", q_nope, w_uk)  # [H, d_c] absorbed query
    lat_out, lse = absorbed_attention(q_latent, q_rope, latent, k_rope, scale)
    out = torch.einsum("hc,hvc->hv", lat_out, w_uv)  # [H, d_v]
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)

    # and through the paged fast path
    block_size = 4
    case = make_paged_case([length], d_c, d_r, block_size, torch.float64, gen)
    case_latent, case_rope = case.latents[0], case.rope_keys[0]
    ref_out, ref_lse = expanded_attention(q_nope, q_rope, case_latent, case_rope, w_uk, w_uv, scale)
    paged_out, paged_lse = paged_latent_decode(
        q_latent[None], q_rope[None], case.cache, case.block_table, case.seq_lens, scale
    )
    torch.testing.assert_close(torch.einsum("hc,hvc->hv", paged_out[0], w_uv), ref_out)
    torch.testing.assert_close(paged_lse[0], ref_lse)


def test_write_latent_cache_skips_padding_slots(rng):
    gen = rng
    d_c, d_r, block_size, num_blocks = 20, 6, 4, 5
    cache = torch.full((num_blocks, block_size, d_c + d_r), float("nan"))
    tokens = 6
    latent = torch.randn(tokens, d_c, generator=gen)
    k_pe = torch.randn(tokens, 1, d_r, generator=gen)  # vLLM passes [T, 1, d_R]
    slots = torch.tensor([13, -1, 2, 7, -1, 19, 5, 6])  # longer than T: padded mapping
    write_latent_cache(latent, k_pe, cache, slots)
    flat = cache.view(-1, d_c + d_r)
    for t, s in enumerate(slots[:tokens].tolist()):
        if s >= 0:
            torch.testing.assert_close(flat[s], torch.cat([latent[t], k_pe[t, 0]]))
    written = {s for s in slots[:tokens].tolist() if s >= 0}
    for s in range(flat.shape[0]):
        if s not in written:
            assert torch.isnan(flat[s]).all(), f"slot {s} was written"


def test_write_then_decode_round_trip(rng):
    gen = rng
    d_c, d_r, block_size, heads = 32, 8, 16, 2
    cache = torch.full((6, block_size, d_c + d_r), float("nan"))
    block_table = torch.tensor([[4, 1, 0]], dtype=torch.int32)
    length = 20
    latent = torch.randn(length, d_c, generator=gen)
    k_pe = torch.randn(length, d_r, generator=gen)
    slots = torch.tensor([int(block_table[0, p // block_size]) * block_size + p % block_size for p in range(length)])
    write_latent_cache(latent, k_pe, cache, slots)
    torch.testing.assert_close(
        gather_sequence(cache, block_table[0], length), torch.cat([latent, k_pe], dim=-1)
    )
    q_lat, q_rope = torch.randn(1, heads, d_c, generator=gen), torch.randn(1, heads, d_r, generator=gen)
    out, lse = paged_latent_decode(q_lat, q_rope, cache, block_table, torch.tensor([length]), 0.2)
    ref_out, ref_lse = absorbed_attention(q_lat[0], q_rope[0], latent.double(), k_pe.double(), 0.2)
    torch.testing.assert_close(out[0].double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_shape_errors_are_clear():
    cache = torch.zeros(2, 4, 10)
    with pytest.raises(ValueError, match="row width"):
        paged_latent_decode(
            torch.zeros(1, 2, 8), torch.zeros(1, 2, 4), cache, torch.zeros(1, 2, dtype=torch.int32),
            torch.tensor([3]), 1.0,
        )
    with pytest.raises(ValueError, match="cache row width"):
        write_latent_cache(torch.zeros(2, 8), torch.zeros(2, 4), cache, torch.tensor([0, 1]))
