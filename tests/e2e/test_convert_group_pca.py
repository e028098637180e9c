"""`mla-plugin convert mla-to-gla --softmax grouped --basis group-pca` end to end (transformers,
no vLLM): per head group its own projection of the latent, written as the latent_projection
tensor; the converted checkpoint loads with trust_remote_code and computes the declared function.
Calibrated on the held-out tail of the wikitext-2 validation text (tests/converters.calibration_text)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mla_plugin.checkpoint_format import CONVERTED_ARCHITECTURE, REMOTE_CODE_FILE
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.fixtures import make_tiny_deepseek_v2
from tests.converters import TEXT_IDS, calibration_text

D_C, HEADS, NOPE, V = 64, 4, 32, 32  # H (d_nope + d_v) / d_c = 4: a group's heads need more than d_c / g
CALIB = dict(calib_tokens=256, calib_window=64, show_progress=False)


def _source(root, seed: int):
    return make_tiny_deepseek_v2(root, seed=seed, kv_lora_rank=D_C, qk_rope_head_dim=16, num_heads=HEADS,
                                 qk_nope_head_dim=NOPE, v_head_dim=V)


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    """A random tiny DeepSeek-V2 whose heads use every latent direction."""
    return _source(tmp_path_factory.mktemp("generic"), seed=31)


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory):
    """A random tiny DeepSeek-V2 whose every head reads only d_c/4 latent directions (its own),
    so each group of H/g heads uses at most d_c/g of them at g = 2 and 4."""
    src = _source(tmp_path_factory.mktemp("low_rank"), seed=32)
    gen = torch.Generator().manual_seed(32)
    weights = load_file(str(src / "model.safetensors"))
    rank = D_C // 4
    for name in [n for n in weights if n.endswith("kv_b_proj.weight")]:
        per_head = [torch.randn(NOPE + V, rank, generator=gen) @ torch.randn(rank, D_C, generator=gen)
                    for _ in range(HEADS)]
        weights[name] = (torch.cat(per_head) * 0.08 / rank**0.5).contiguous()  # [H (d_nope + d_v), d_c]
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=True).eval()


def _logprobs(model) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([TEXT_IDS])).logits[0].double(), -1)  # [T, V]


def _kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other)."""
    return float((reference.exp() * (reference - other)).sum(-1).mean())


def _convert(src, dst, shards, **kwargs):
    return convert_mla_to_gla(src, dst, shards=shards, softmax="grouped", basis="group-pca",
                              calib_text=calibration_text(), **CALIB, **kwargs)


@pytest.mark.parametrize("shards", [2, 4])
def test_exact_where_each_group_uses_at_most_d_s_directions(low_rank, tmp_path, shards):
    report = _convert(low_rank, tmp_path / "out", shards)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [CONVERTED_ARCHITECTURE] and (out / REMOTE_CODE_FILE).is_file()
    declared = config["mla_plugin"]
    assert declared["latent_projection"] is True and declared["softmax"] == "grouped"
    assert (declared["layout"], declared["rmsnorm"], declared["shards"]) == ("sharded_latent", "global", shards)
    assert declared["converted_with"]["basis"] == "group-pca"
    assert report.kv_values_per_token_per_layer_per_rank_after == D_C // shards + 16

    weights, source = load_file(str(out / "model.safetensors")), load_file(str(low_rank / "model.safetensors"))
    d_s = D_C // shards
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        assert weights[prefix + "latent_projection.weight"].shape == (D_C, D_C)
        torch.testing.assert_close(weights[prefix + "kv_a_proj_with_mqa.weight"],
                                   source[prefix + "kv_a_proj_with_mqa.weight"], rtol=0, atol=0)  # W_DKV unchanged
        assert bool((weights[prefix + "kv_a_layernorm.weight"] == 1).all())  # γ folded
        kv_b = weights[prefix + "kv_b_proj.weight"].reshape(HEADS, NOPE + V, shards, d_s)
        for head in range(HEADS):
            others = [j for j in range(shards) if j != head // (HEADS // shards)]
            assert not kv_b[head, :, others].any()  # head h reads only its group's slice of z

    model = _model(out)
    assert type(model).__name__ == CONVERTED_ARCHITECTURE
    assert all(hasattr(layer.self_attn, "latent_projection") for layer in model.model.layers)
    reference = _logprobs(_model(low_rank))
    got = _logprobs(model)
    assert (got - reference).abs().max().item() < 1e-4


def test_cached_decode_equals_the_full_forward(low_rank, tmp_path):
    _convert(low_rank, tmp_path / "out", 4)
    model = _model(tmp_path / "out")
    ids = torch.tensor([TEXT_IDS])
    with torch.no_grad():
        full = model(ids).logits[0]  # [T, V]
        step = model(ids[:, :6], use_cache=True)
        cache, rows = step.past_key_values, [step.logits[0]]
        for t in range(6, ids.shape[1]):
            step = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            rows.append(step.logits[0])
    torch.testing.assert_close(torch.cat(rows), full, rtol=1e-4, atol=1e-4)


def test_error_falls_as_g_falls_and_beats_the_naive_grouped_load(generic, tmp_path):
    reference = _logprobs(_model(generic))
    kl = {}
    for shards in (4, 2, 1):
        _convert(generic, tmp_path / f"pca{shards}", shards)
        kl[shards] = _kl(reference, _logprobs(_model(tmp_path / f"pca{shards}")))
    assert kl[4] > kl[2] > kl[1] and kl[1] < 1e-8, kl
    assert kl[4] > 1e-3  # really lossy at g = 4
    for shards in (4, 2):  # the naive grouped load: group r reads slice r of ĉ as it is
        convert_mla_to_gla(generic, tmp_path / f"naive{shards}", shards=shards, softmax="grouped", basis="identity",
                           show_progress=False)
        naive = _kl(reference, _logprobs(_model(tmp_path / f"naive{shards}")))
        assert kl[shards] < 0.6 * naive, (shards, kl[shards], naive)


def test_calibrated_scales_fold_into_the_group_read_out(generic, tmp_path):
    """--calibrate logit+output after group-pca: the same projection P, each (head, own slice)
    column block of kv_b_proj scaled by one number (λ on W_UK, μ on W_UV), the fit's error no worse."""
    _convert(generic, tmp_path / "plain", 4)
    report = _convert(generic, tmp_path / "cal", 4, calibrate="logit+output")
    plain, cal = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("plain", "cal"))
    prefix = "model.layers.1.self_attn."
    torch.testing.assert_close(cal[prefix + "latent_projection.weight"], plain[prefix + "latent_projection.weight"],
                               rtol=0, atol=0)
    d_s = D_C // 4
    a = cal[prefix + "kv_b_proj.weight"].double().reshape(HEADS, NOPE + V, 4, d_s)
    b = plain[prefix + "kv_b_proj.weight"].double().reshape(HEADS, NOPE + V, 4, d_s)
    for head in range(HEADS):
        own_a, own_b = a[head, :, head], b[head, :, head]  # [d_nope + d_v, d_s]
        lam, mu = (own_a[:NOPE] / own_b[:NOPE]).mean(), (own_a[NOPE:] / own_b[NOPE:]).mean()
        torch.testing.assert_close(own_a[:NOPE], own_b[:NOPE] * lam, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(own_a[NOPE:], own_b[NOPE:] * mu, rtol=1e-4, atol=1e-7)
    used = json.loads((tmp_path / "cal/config.json").read_text())["mla_plugin"]["converted_with"]
    assert used["calibrate"] == "logit+output"
    assert used["attention_output_error_after"] <= used["attention_output_error_before"]
    assert "calibrated logit scales" in report.summary()


def test_bad_combinations_are_refused(generic, tmp_path):
    text = calibration_text()
    for kwargs, message in (
        (dict(softmax="partitioned", calib_text=text), "needs --softmax grouped"),
        (dict(softmax="exact", calib_text=text), "needs --softmax grouped"),
        (dict(softmax="grouped"), "needs calibration text: --calib-text FILE"),
        (dict(softmax="grouped", rmsnorm="local", calib_text=text), "needs --rmsnorm global"),
    ):
        with pytest.raises(ConversionError, match=message):
            convert_mla_to_gla(generic, tmp_path / "x", shards=2, basis="group-pca", show_progress=False, **kwargs)
        assert not (tmp_path / "x").exists()
    cli = [sys.executable, "-m", "mla_plugin.cli", "convert", "mla-to-gla", str(generic), str(tmp_path / "z"),
           "--shards", "2", "--basis", "group-pca", "--calib-text", str(text)]
    for extra, message in ((["--softmax", "partitioned"], "needs --softmax grouped"),
                           (["--softmax", "grouped", "--rmsnorm", "local"], "needs --rmsnorm global")):
        proc = subprocess.run(cli + extra, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
