"""Calibrated slice scales and activation PCA (mla-to-gla), plain torch on random tensors."""

import pytest
import torch

from mla_plugin.convert.shard_calibration import (
    activation_pca_basis,
    build_fit_problem,
    fit_shard_scales,
    fold_shard_scales,
    latent_second_moment,
    query_positions,
    relative_head_errors,
    sliced_head_outputs,
)
from mla_plugin.ops.sharded_latent import latent_rmsnorm, reference_sharded_latent_attention

F64 = torch.float64


def _case(rng, *, windows=3, window=12, heads=4, d_c=16, nope=6, d_v=5, d_r=4, queries=None, dtype=F64):
    """Random per-layer activations and weights. The queries are strong enough that the
    attention is far from uniform, so the slice scales matter."""
    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=rng, dtype=F64) * std).to(dtype)

    return dict(
        q_nope=randn(windows, window, heads, nope, std=1.5),
        q_rope=randn(windows, window, heads, d_r),
        c=randn(windows, window, d_c) * (torch.rand(d_c, generator=rng, dtype=F64) * 2 + 0.1).to(dtype),
        k_rope=randn(windows, window, d_r),
        w_uk=randn(heads, nope, d_c, std=0.8),
        w_uv=randn(heads, d_v, d_c),
        positions=query_positions(windows, window, queries, seed=int(torch.randint(1 << 30, (1,), generator=rng))),
        scale=0.7,
    )


def _problem(case, num_shards, softmax="partitioned", rmsnorm="global"):
    c = case["c"]
    exact = latent_rmsnorm(c, 1, "global")
    runtime = latent_rmsnorm(c, num_shards, rmsnorm)
    pos = case["positions"]
    q_nope = torch.stack([case["q_nope"][n, pos[n]] for n in range(pos.shape[0])])
    q_rope = torch.stack([case["q_rope"][n, pos[n]] for n in range(pos.shape[0])])
    q_latent = torch.einsum("nqhd,hdc->nqhc", q_nope, case["w_uk"])
    return build_fit_problem(q_latent, q_rope, pos, exact, case["k_rope"], case["w_uv"], case["scale"],
                             num_shards=num_shards, softmax_mode=softmax, runtime_latent=runtime)


def _reference_head_outputs(case, num_shards, softmax, rmsnorm, w_uk, w_uv, logit_scale=None, output_scale=None):
    """[N, T, H, d_v] through the runtime's oracle (every query row), scales applied explicitly."""
    latents = list(latent_rmsnorm(case["c"], num_shards, rmsnorm))
    q_lat = list(torch.einsum("ntha,hac->nthc", case["q_nope"], w_uk))
    outs = reference_sharded_latent_attention(q_lat, list(case["q_rope"]), latents, list(case["k_rope"]),
                                              case["scale"], num_shards=num_shards, softmax_mode=softmax,
                                              logit_scale=logit_scale)
    latent_out = torch.stack(outs)  # [N, T, H, d_c]
    if output_scale is not None:
        d_s = latent_out.shape[-1] // num_shards
        latent_out = latent_out * output_scale.repeat_interleave(d_s, dim=1)
    return torch.einsum("nthc,hvc->nthv", latent_out, w_uv)


@pytest.mark.parametrize("num_shards,softmax,rmsnorm", [(2, "partitioned", "global"), (4, "partitioned", "local"),
                                                        (2, "grouped", "local")])
def test_objective_is_the_runtime_math_with_explicit_scales(rng, num_shards, softmax, rmsnorm):
    """sliced_head_outputs (the fit's objective) = the sharded-latent oracle, then W_UV with μ per slice."""
    case = _case(rng, queries=5)
    heads = case["w_uk"].shape[0]
    lam = torch.rand(heads, num_shards, generator=rng, dtype=F64) * 3 + 0.5
    mu = torch.rand(heads, num_shards, generator=rng, dtype=F64) + 0.5
    problem = _problem(case, num_shards, softmax, rmsnorm)
    ours = sliced_head_outputs(problem, lam, mu)  # [N, H, Q, d_v]
    ref = _reference_head_outputs(case, num_shards, softmax, rmsnorm, case["w_uk"], case["w_uv"], lam, mu)
    pos = case["positions"]
    ref = torch.stack([ref[n, pos[n]] for n in range(pos.shape[0])]).transpose(1, 2)  # [N, H, Q, d_v]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # the target is exact MLA: the oracle's exact mode with the global norm
    exact = _reference_head_outputs(case, num_shards, "exact", "global", case["w_uk"], case["w_uv"])
    exact = torch.stack([exact[n, pos[n]] for n in range(pos.shape[0])]).transpose(1, 2)
    torch.testing.assert_close(problem.target, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("num_shards", [2, 4])
def test_folding_the_scales_equals_applying_them(rng, num_shards):
    case = _case(rng)
    heads = case["w_uk"].shape[0]
    lam = torch.rand(heads, num_shards, generator=rng, dtype=F64) * 3 + 0.5
    mu = torch.rand(heads, num_shards, generator=rng, dtype=F64) + 0.5
    explicit = _reference_head_outputs(case, num_shards, "partitioned", "global", case["w_uk"], case["w_uv"],
                                       lam, mu)
    w_uk, w_uv = fold_shard_scales(case["w_uk"], case["w_uv"], lam, mu)
    folded = _reference_head_outputs(case, num_shards, "partitioned", "global", w_uk, w_uv)
    torch.testing.assert_close(folded, explicit, rtol=1e-10, atol=1e-12)
    # without μ, W_UV is untouched
    w_uk_only, w_uv_only = fold_shard_scales(case["w_uk"], case["w_uv"], lam)
    assert w_uv_only is case["w_uv"]
    torch.testing.assert_close(w_uk_only, w_uk)


@pytest.mark.parametrize("num_shards,fit_output", [(2, False), (2, True), (4, True)])
def test_fit_lowers_the_error(rng, num_shards, fit_output):
    case = _case(rng, windows=4, window=16, queries=8)
    problem = _problem(case, num_shards)
    fit = fit_shard_scales(problem, init_logit_scale=float(num_shards), fit_output=fit_output, steps=40)
    heads = case["w_uk"].shape[0]
    assert fit.logit_scale.shape == fit.output_scale.shape == (heads, num_shards)
    assert bool((fit.error_after <= fit.error_before).all())
    assert fit.error_after.sum() < 0.99 * fit.error_before.sum()  # random heads are far from the optimum
    # the reported errors are those of the returned scales
    torch.testing.assert_close(relative_head_errors(problem, fit.logit_scale, fit.output_scale), fit.error_after)
    if not fit_output:
        assert bool((fit.output_scale == 1).all())


def test_fit_keeps_the_start_when_it_is_already_best(rng):
    """g = 1: the sliced softmax is the exact one, λ = 1 is optimal (error 0) and is kept."""
    case = _case(rng, queries=6)
    problem = _problem(case, 1)
    fit = fit_shard_scales(problem, init_logit_scale=1.0, fit_output=True, steps=10)
    assert float(fit.error_before.max()) < 1e-20
    assert bool((fit.logit_scale == 1).all()) and bool((fit.output_scale == 1).all())


def test_activation_pca_basis_is_orthogonal_and_ordered(rng):
    d_c = 24
    mix = torch.randn(d_c, d_c, generator=rng, dtype=F64) * torch.linspace(3, 0.01, d_c, dtype=F64)
    c = torch.randn(5, 40, d_c, generator=rng, dtype=F64) @ mix.T
    moment = latent_second_moment(c)
    rot = activation_pca_basis(moment)
    torch.testing.assert_close(rot.T @ rot, torch.eye(d_c, dtype=F64), rtol=0, atol=1e-12)
    # ĉ R has a diagonal second moment, in descending order
    normed = latent_rmsnorm(c, 1, "global").reshape(-1, d_c)
    energy = normed @ rot
    moment_rot = energy.T @ energy
    diag = torch.diagonal(moment_rot)
    torch.testing.assert_close(moment_rot - torch.diag(diag), torch.zeros_like(moment_rot), rtol=0,
                               atol=1e-9 * float(diag.max()))
    assert bool((diag[:-1] >= diag[1:]).all())
    # sign-fixed: the largest-magnitude entry of each column is positive (deterministic)
    cols = torch.arange(d_c)
    assert bool((rot[rot.abs().argmax(dim=0), cols] > 0).all())
    torch.testing.assert_close(activation_pca_basis(moment * 3.0), rot, rtol=0, atol=1e-10)
    # rotating by it before slicing is exact under the global norm: the first slice gets the most energy
    halves = energy.pow(2).reshape(-1, 2, d_c // 2).sum(dim=(0, 2))
    assert halves[0] > halves[1]


def test_query_positions_are_sorted_distinct_samples():
    pos = query_positions(5, 32, 7, seed=3)
    assert pos.shape == (5, 7)
    for row in pos:
        assert row.unique().numel() == 7 and bool((row[1:] > row[:-1]).all()) and int(row.max()) < 32
    assert torch.equal(query_positions(2, 8, None), torch.arange(8).expand(2, 8))
    assert torch.equal(query_positions(2, 8, 100), torch.arange(8).expand(2, 8))


# --------------------------------------------------------------------------------------
# Capture and the converter (transformers only, no vLLM)

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from mla_plugin.convert.mla_to_gla import ConversionError, convert_mla_to_gla  # noqa: E402
from mla_plugin.convert.shard_calibration import capture_activations  # noqa: E402
from mla_plugin.fixtures import make_tiny_deepseek_v2  # noqa: E402
from tests.paths import wikitext_file  # noqa: E402

TEXT_IDS = [0, 54, 260, 3576, 379, 12, 901, 77, 1200, 45, 3000, 18, 640, 2222, 9, 31]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_deepseek_v2(tmp_path_factory.mktemp("src"), seed=21, kv_lora_rank=128,
                                 qk_rope_head_dim=32, num_heads=4)


@pytest.fixture(scope="module")
def calib_text():
    return wikitext_file("valid.tokens.txt")


def _logprobs(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([TEXT_IDS])).logits[0].double(), -1)


def test_captured_activations_reproduce_the_attention_output(tiny, calib_text):
    """The exact target built from the capture = transformers' own attention output (o_proj input)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mla_plugin.eval.perplexity import make_windows, tokenize_once
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
    assert (used["calib_text"], used["calib_tokens"], used["calib_window"]) == ("valid.tokens.txt", 512, 128)
    assert "calibration: 4 windows x 128 tokens of valid.tokens.txt" in report.summary()
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
