"""mla-to-gla calibration end to end (transformers, no vLLM): the capture
(convert/calibration_capture.py) and calibrated conversions of a tiny model, calibrated on
the held-out tail of the wikitext-2 validation text (tests/converters.calibration_text)."""

import json
import subprocess
import sys

import pytest
import torch

from mla_plugin.convert.calibration_capture import capture_activations
from mla_plugin.convert.calibration_fit import build_fit_problem
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.fixtures.training_text import HELD_OUT_NAME
from mla_plugin.ops.sharded_latent import latent_rmsnorm
from tests.converters import calibration_text, tiny_deepseek
from tests.converters import transformers_logprobs as _logprobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_deepseek(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def calib_text():
    return calibration_text()


def test_captured_activations_reproduce_the_attention_output(tiny, calib_text):
    """The exact target built from the capture = transformers' own attention output (o_proj input)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mla_plugin.text_windows import make_windows, tokenize_once
    from mla_plugin.ops.latent_basis import fold_latent_weights

    capture = capture_activations(tiny, calib_text, tokens=256, window=64, queries_per_window=16,
                                  show_progress=False)
    assert (capture.windows, capture.window, capture.tokens) == (4, 64, 256)
    layer = capture.layers[1]
    assert layer.latent.shape == (4, 64, 128) and layer.q_nope.shape == (4, 16, 4, 32)

    windows = make_windows(tokenize_once(AutoTokenizer.from_pretrained(str(tiny)), calib_text.read_text()), 64, 4)
    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()
    seen = []
    model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.tensor(windows), use_cache=False)
    attn_out = seen[0].reshape(4, 64, 4, 32)  # [N, T, H, d_v]

    weights = load_file(str(tiny / "model.safetensors"))
    prefix = "model.layers.1.self_attn."
    rot, _, w_uk, w_uv = fold_latent_weights(weights[prefix + "kv_b_proj.weight"], weights[prefix + "kv_a_layernorm.weight"],
                                             num_heads=4, nope_dim=32, v_dim=32, basis="hadamard")
    c = (layer.latent.double() @ rot)
    exact = latent_rmsnorm(c, 1, "global", layer.eps)
    q_latent = torch.einsum("nqhd,hdc->nqhc", layer.q_nope.double(), w_uk)
    problem = build_fit_problem(q_latent, layer.q_rope.double(), capture.positions, exact, layer.k_rope.double(),
                                w_uv, layer.scale, num_shards=2)
    pos = capture.positions
    expected = torch.stack([attn_out[n, pos[n]] for n in range(4)]).transpose(1, 2).double()  # [N, H, Q, d_v]
    torch.testing.assert_close(problem.target, expected, rtol=1e-4, atol=1e-5)


def test_pca_act_exact_conversion_keeps_the_function(tiny, tmp_path, calib_text):
    report = convert_mla_to_gla(tiny, tmp_path / "out", shards=4, softmax="exact", basis="pca-act",
                                calib_text=calib_text, calib_tokens=512, calib_window=128, show_progress=False)
    config = json.loads((tmp_path / "out/config.json").read_text())
    used = config["mla_plugin"]["converted_with"]
    assert used["basis"] == "pca-act" and used["calibrate"] == "none"
    assert (used["calib_text"], used["calib_tokens"], used["calib_window"]) == (HELD_OUT_NAME, 512, 128)
    assert f"calibration: 4 windows x 128 tokens of {HELD_OUT_NAME}" in report.summary()
    assert (_logprobs(tmp_path / "out") - _logprobs(tiny)).abs().max().item() < 1e-4


@pytest.mark.parametrize("mode,softmax", [("logit", "partitioned"), ("logit+output", "partitioned"),
                                          ("logit+output", "grouped")])
def test_calibrated_scales_are_folded_per_head_and_slice(tiny, tmp_path, calib_text, mode, softmax):
    """The calibrated kv_b_proj = the uncalibrated one (scale 1) with each (head, slice) column block
    scaled by one number: λ on W_UK, μ on W_UV (1 unless fitted)."""
    from safetensors.torch import load_file

    init = 2.0 if softmax == "partitioned" else 1.0  # logit scale "auto"
    kwargs = dict(shards=2, softmax=softmax, rmsnorm="global" if softmax == "partitioned" else "local",
                  basis="hadamard", show_progress=False)
    report = convert_mla_to_gla(tiny, tmp_path / "cal", calibrate=mode, calib_text=calib_text, calib_tokens=512,
                                calib_window=128, **kwargs)
    convert_mla_to_gla(tiny, tmp_path / "plain", logit_scale=1.0, **kwargs)
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    cal = load_file(str(tmp_path / "cal/model.safetensors"))[key].double().reshape(4, 64, 2, 64)
    plain = load_file(str(tmp_path / "plain/model.safetensors"))[key].double().reshape(4, 64, 2, 64)
    ratio = cal / plain  # [H, d_nope + d_v, g, d_s]
    lam, mu = ratio[:, :32].mean(dim=(1, 3)), ratio[:, 32:].mean(dim=(1, 3))  # [H, g]
    torch.testing.assert_close(ratio[:, :32], lam[:, None, :, None].expand(4, 32, 2, 64), rtol=1e-4, atol=0)
    torch.testing.assert_close(ratio[:, 32:], mu[:, None, :, None].expand(4, 32, 2, 64), rtol=1e-4, atol=0)
    assert bool((lam > 0.2).all()) and bool((lam < 8).all()) and float((lam - init).abs().max()) > 1e-3
    if mode == "logit":
        torch.testing.assert_close(mu, torch.ones_like(mu), rtol=1e-4, atol=0)
    if softmax == "grouped":  # head h reads slice h // 2 only: the other slice keeps its start values
        unread = torch.tensor([[False, True], [False, True], [True, False], [True, False]])
        torch.testing.assert_close(lam[unread], torch.full((4,), init, dtype=lam.dtype), rtol=1e-4, atol=0)
        torch.testing.assert_close(mu[unread], torch.ones(4, dtype=mu.dtype), rtol=1e-4, atol=0)
    used = json.loads((tmp_path / "cal/config.json").read_text())["mla_plugin"]["converted_with"]
    assert used["calibrate"] == mode and used["logit_scale"] == init
    assert used["attention_output_error_after"] <= used["attention_output_error_before"]
    assert ("mean_output_scale" in used) == (mode == "logit+output")
    assert "calibrated logit scales" in report.summary()


def test_calibration_errors_are_clear(tiny, tmp_path, calib_text):
    with pytest.raises(ConversionError, match="needs calibration text: --calib-text FILE"):
        convert_mla_to_gla(tiny, tmp_path / "a", shards=2, basis="pca-act", show_progress=False)
    with pytest.raises(ConversionError, match="needs calibration text: --calib-text FILE"):
        convert_mla_to_gla(tiny, tmp_path / "b", shards=2, calibrate="logit", show_progress=False)
    with pytest.raises(ConversionError, match="nothing to calibrate"):
        convert_mla_to_gla(tiny, tmp_path / "c", shards=2, softmax="exact", calibrate="logit",
                           calib_text=calib_text, show_progress=False)
    with pytest.raises(ConversionError, match="not found"):
        convert_mla_to_gla(tiny, tmp_path / "d", shards=2, calibrate="logit", calib_text=tmp_path / "nope.txt",
                           show_progress=False)
    with pytest.raises(ConversionError, match="calibrate must be one of"):
        convert_mla_to_gla(tiny, tmp_path / "e", shards=2, calibrate="all", calib_text=calib_text,
                           show_progress=False)
    with pytest.raises(ConversionError, match="at least one window"):
        convert_mla_to_gla(tiny, tmp_path / "f", shards=2, calibrate="logit", calib_text=calib_text,
                           calib_tokens=10, show_progress=False)
    assert not any((tmp_path / name).exists() for name in "abcdef")  # nothing written
    cli = [sys.executable, "-m", "mla_plugin.cli", "convert", "mla-to-gla", str(tiny)]
    for extra, message in ((["--basis", "pca-act"], "needs calibration text: --calib-text FILE"),
                           (["--calibrate", "logit", "--softmax", "exact", "--calib-text", str(calib_text)],
                            "nothing to calibrate"),
                           (["--calibrate", "logit+output", "--calib-text", str(tmp_path / "nope.txt")],
                            "not found")):
        proc = subprocess.run(cli + [str(tmp_path / "z"), "--shards", "2", *extra], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
