"""GQA -> latent attention math (convert/gqa_latent.py) against plain float64 references."""

import pytest
import torch

from mla_plugin.convert.gqa_latent import LatentPlan, convert_layer, rope_frequencies, rorope_key_rotation

F64 = torch.float64


def llama_rope(x, positions, inv_freq):  # x [T, heads, d], Llama's rotate-half layout
    angles = positions[:, None].to(F64) * inv_freq.to(F64)[None]  # [T, d/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def interleaved_rope(x, positions, inv_freq):  # DeepSeek's layout: pairs (2p, 2p + 1)
    angles = positions[:, None].to(F64) * inv_freq.to(F64)[None]  # [T, d_R / 2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
    return out


def causal_attention(q, k, v, scale):  # [T, H, dk], [T, H, dk], [T, H, dv]
    logits = torch.einsum("thd,shd->hts", q, k) * scale
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).triu(1)
    probs = logits.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


def gqa_reference(x, w, inv_freq, H, K, d):
    T = x.shape[0]
    q = (x @ w["q"].T + w["bq"]).view(T, H, d)
    k = (x @ w["k"].T + w["bk"]).view(T, K, d)
    v = (x @ w["v"].T + w["bv"]).view(T, K, d)
    pos = torch.arange(T)
    q, k = llama_rope(q, pos, inv_freq), llama_rope(k, pos, inv_freq)
    rep = H // K
    out = causal_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), d ** -0.5)
    return out.reshape(T, H * d) @ w["o"].T


def latent_forward(x, layer, plan, inv_freq):
    """DeepSeek-V2 attention (no latent norm) from a converted layer, expanded form."""
    H, d, d_r, d_c, dn = plan.heads, plan.head_dim, plan.rope_dim, plan.kv_lora_rank, plan.nope_dim
    T = x.shape[0]
    q = x @ layer.q_proj.T + (0 if layer.q_bias is None else layer.q_bias)
    q = q.view(T, H, dn + d_r)
    kv_a = x @ layer.kv_a_proj_with_mqa.T + (0 if layer.kv_a_bias is None else layer.kv_a_bias)
    c, k_rope = kv_a[:, :d_c], kv_a[:, d_c:]  # [T, d_c], [T, d_R]
    kv = (c @ layer.kv_b_proj.T).view(T, H, dn + d)
    pos = torch.arange(T)
    q_rope = interleaved_rope(q[..., dn:], pos, inv_freq)
    k_rope = interleaved_rope(k_rope[:, None], pos, inv_freq).expand(T, H, d_r)
    keys = torch.cat([kv[..., :dn], k_rope], -1)
    out = causal_attention(torch.cat([q[..., :dn], q_rope], -1), keys, kv[..., dn:], (dn + d_r) ** -0.5)
    return out.reshape(T, H * d) @ layer.o_proj.T


def random_layer(rng, D, H, K, d, bias):
    def mat(*shape):
        return torch.randn(*shape, generator=rng, dtype=F64) / shape[-1] ** 0.5

    def vec(n):
        return torch.randn(n, generator=rng, dtype=F64) if bias else torch.zeros(n, dtype=F64)

    return dict(q=mat(H * d, D), k=mat(K * d, D), v=mat(K * d, D), o=mat(D, H * d),
                bq=vec(H * d), bk=vec(K * d), bv=vec(K * d))


def convert(w, plan, moment, bias):
    return convert_layer(plan, w_q=w["q"], b_q=w["bq"] if bias else None, w_k=w["k"],
                         b_k=w["bk"] if bias else None, w_v=w["v"], b_v=w["bv"] if bias else None,
                         w_o=w["o"], moment=moment)


def calibration_moment(rng, x_calib, w):
    y = torch.cat([x_calib @ w["k"].T + w["bk"], x_calib @ w["v"].T + w["bv"]], dim=1)
    return y.T @ y / y.shape[0]


@pytest.mark.parametrize("H,K,d", [(8, 2, 16), (4, 4, 8), (6, 1, 16)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
def test_exact_form_equals_gqa(rng, H, K, d, bias, calibrated):
    D, T = 24, 11
    w = random_layer(rng, D, H, K, d, bias)
    plan = LatentPlan(heads=H, kv_heads=K, head_dim=d, rope_dim=K * d, kv_lora_rank=K * d, freqfold=1)
    assert plan.exact
    plan.check()
    moment = calibration_moment(rng, torch.randn(64, D, generator=rng, dtype=F64), w) if calibrated else None
    layer = convert(w, plan, moment, bias)
    source_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=F64) / d))
    x = torch.randn(T, D, generator=rng, dtype=F64)
    expected = gqa_reference(x, w, source_freq, H, K, d)
    got = latent_forward(x, layer, plan, rope_frequencies(plan, source_freq))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("f", [1, 2])
def test_rotation_is_orthogonal_and_exact_without_dropping(rng, f):
    K, d = 3, 16
    plan = LatentPlan(heads=6, kv_heads=K, head_dim=d, rope_dim=d // f, kv_lora_rank=1, freqfold=f)
    a = torch.randn(K * d, K * d, generator=rng, dtype=F64)
    rows = rorope_key_rotation(plan, a @ a.T)
    torch.testing.assert_close(rows @ rows.T, torch.eye(K * d, dtype=F64), rtol=0, atol=1e-12)


def test_partial_rope_keeps_the_rope_energy(rng):
    """RoRoPE puts the largest share of key energy into the kept rope dims."""
    K, d, D = 4, 16, 32
    w = random_layer(rng, D, 8, K, d, False)
    w["k"][: d] *= 5.0  # one dominant kv head
    x = torch.randn(256, D, generator=rng, dtype=F64)
    moment = calibration_moment(rng, x, w)
    plan = LatentPlan(heads=8, kv_heads=K, head_dim=d, rope_dim=d, kv_lora_rank=K * d * 2 - d, freqfold=1)
    rows = rorope_key_rotation(plan, moment[: K * d, : K * d])
    energy = torch.diagonal(rows @ moment[: K * d, : K * d] @ rows.T)
    assert energy[:d].sum() > 0.9 * energy.sum() / K * 1.5  # well above the 1/K share
    unrotated = torch.diagonal(moment[: K * d, : K * d])[d:2 * d].sum()  # head 1, not the dominant one
    assert energy[:d].sum() > unrotated


def test_compression_error_falls_with_rank(rng):
    H, K, d, D, T = 8, 2, 16, 32, 24
    w = random_layer(rng, D, H, K, d, True)
    moment = calibration_moment(rng, torch.randn(512, D, generator=rng, dtype=F64), w)
    source_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=F64) / d))
    x = torch.randn(T, D, generator=rng, dtype=F64)
    expected = gqa_reference(x, w, source_freq, H, K, d)
    errors = []
    for rank in (8, 24, 40, 48):
        plan = LatentPlan(heads=H, kv_heads=K, head_dim=d, rope_dim=d, kv_lora_rank=rank, freqfold=1)
        got = latent_forward(x, convert(w, plan, moment, True), plan, rope_frequencies(plan, source_freq))
        errors.append(float((got - expected).norm() / expected.norm()))
    # Rank 40 already spans z (the inputs have 32 dims), so 40 and 48 agree to rounding.
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > errors[1] + 1e-3  # rank 8 loses something: the test can tell


@pytest.mark.parametrize("kwargs,message", [
    (dict(rope_dim=12), "multiple of"),
    (dict(rope_dim=2 * 2 * 16 + 16), "between"),
    (dict(kv_lora_rank=1000), "kv-lora-rank"),
    (dict(freqfold=3), "freqfold"),
])
def test_bad_plans(kwargs, message):
    settings = dict(heads=8, kv_heads=2, head_dim=16, rope_dim=16, kv_lora_rank=32, freqfold=1)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=message):
        LatentPlan(**settings).check()
