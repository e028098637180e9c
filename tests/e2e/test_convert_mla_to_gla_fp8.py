"""mla-to-gla on fp8 block-quantised DeepSeek-V3 sources, and calibrated V3 conversions.

The fp8 sources are made here (mla_plugin/fixtures/fp8_checkpoints.py) from tiny V3 checkpoints
(low-rank query, MoE): attention, MLP and expert projections in float8_e4m3fn with 128 x 128
block scales (the tiny shapes give edge blocks: 576 rows of kv_a_proj_with_mqa, 64-wide experts).
References: transformers (5.19 dequantises fp8 checkpoints on CPU) and the fixture's own float32
dequantisation of the fp8 source (an independent block expansion, not the converter's).

transformers 5.19 refuses an fp8 weight whose shape is not a multiple of its block ("Weight
shape (576, 128) not divisible by scale grid (5, 1)"), as DeepSeek-V3's own kv_a_proj_with_mqa
(576 x 7168) is: the default tiny V3 source is therefore compared through the fixture's
dequantisation, and a second source with rope 128 (kv_a_proj_with_mqa 640 rows) through
transformers loading the fp8 checkpoint itself. The converted checkpoints load in both cases
(the folded weights are bf16). transformers needs `accelerate` to load any fp8 checkpoint
(requirements-cpu.txt).
"""

import json
import shutil

import pytest
import torch

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.fp8_checkpoints import (
    all_tensor_names,
    dequantise_reference,
    dequantised_checkpoint,
    make_fp8_checkpoint,
    move_scales_to_their_own_file,
    raw_tensor_bytes,
)
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from tests.conftest import seed_for
from tests.converters import calibration_text

# Max |logprob difference| over every token and the whole vocabulary, layer 1's experts pinned to the
# reference's (_run). Measured over 8 fresh seeds (2026-12-07, CPU): bf16 storage of the folded weights
# (8-bit mantissa) against float32 logprobs of the fp8 source 0.017-0.029 (exact), 0.023-0.034 (grouped
# group-pca, calibrated); partitioned with fitted λ, μ against the fp32 source 0.059-0.122. Unpinned, 2 of
# the 8 seeds had one token whose top-k flipped, and that token moved 0.62 and 1.05 nats.
# Quantising to fp8 moves the logprobs by about 1.
BF16_LOGPROB_TOL = 0.05
PARTITIONED_LOGPROB_TOL = 0.25
FP8_EFFECT_MIN = 0.3
REWRITTEN = ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj")  # per layer, written in bf16
V3_ROUTING = dict(topk_method="noaux_tc", scoring_func="sigmoid")  # as V3's config.json says (vLLM reads them)


def _gate_weights(gate, router_logits, indices):
    """The weights transformers' V3 router gives the experts ``indices`` [B·T, k] from its own logits."""
    weights = router_logits.sigmoid().gather(1, indices)  # [B·T, k]
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * gate.routed_scaling_factor


def _run(path, ids, *, remote=False, routing=None):
    """transformers' log-softmax [B, T, V] and the experts its MoE layer (layer 1) picked per token [B·T, k].

    ``routing`` (another run's picks) pins layer 1's experts to it, each weighted as this run's router
    weights it: rounding the rewritten weights to bf16 moves the router's scores a little, and where two
    experts' scores are nearly tied the top-k choice flips and that token's output jumps (a discontinuity
    of the MoE function, not an error of the conversion). Pinned, every token can be compared."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=remote).eval()
    picked = []

    def route(gate, args, out):
        router_logits, weights, indices = out
        torch.testing.assert_close(_gate_weights(gate, router_logits, indices), weights)  # the formula is the gate's
        picked.append(indices)
        if routing is not None:
            return router_logits, _gate_weights(gate, router_logits, routing), routing
        return None

    model.model.layers[1].mlp.gate.register_forward_hook(route)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.double(), -1)
    return logprobs, picked[0]


def _logprobs(path, ids, *, remote=False):
    return _run(path, ids, remote=remote)[0]


def max_logprob_diff(a, b) -> float:
    """Max |log p_a - log p_b| over every token of every batch row and the whole vocabulary."""
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, request):
    """{"bf16": original fp32 V3, "fp8": its fp8 version, "reference": the fp8 one dequantised (fp32)}."""
    root = tmp_path_factory.mktemp("fp8_sources")
    seed = seed_for(request.node.nodeid) % 1000
    original = make_tiny_deepseek_family(root / "bf16", "deepseek_v3", seed=seed, q_lora_rank=64, moe=True,
                                         **V3_ROUTING)
    fp8 = make_fp8_checkpoint(original, root / "fp8")
    return {"bf16": original, "fp8": fp8, "reference": dequantised_checkpoint(fp8, root / "reference")}


@pytest.fixture
def ids(rng):
    return torch.randint(3, 4096, (2, 20), generator=rng)  # [batch, tokens], fresh each run


def test_fp8_fixture_is_deepseek_v3_format(sources):
    names = all_tensor_names(sources["fp8"])
    for name in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.1.mlp.experts.2.up_proj.weight",
                 "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        assert raw_tensor_bytes(names[name], name)[0] == "F8_E4M3"
        dtype, shape, _ = raw_tensor_bytes(names[name + "_scale_inv"], name + "_scale_inv")
        weight_shape = raw_tensor_bytes(names[name], name)[1]
        assert dtype == "F32" and shape == [-(-weight_shape[0] // 128), -(-weight_shape[1] // 128)]
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.self_attn.kv_a_layernorm.weight"):
        assert raw_tensor_bytes(names[name], name)[0] == "BF16" and name + "_scale_inv" not in names
    assert json.loads((sources["fp8"] / "config.json").read_text())["quantization_config"]["weight_block_size"] == [
        128, 128]


def test_exact_conversion_of_an_fp8_source(sources, tmp_path, ids):
    out = tmp_path / "out"
    report = convert_mla_to_gla(sources["fp8"], out, shards=2, softmax="exact", show_progress=False)
    before, after = all_tensor_names(sources["fp8"]), all_tensor_names(out)
    rewritten = {f"model.layers.{i}.self_attn.{kind}.weight" for i in range(2) for kind in REWRITTEN}
    scales = {name + "_scale_inv" for name in rewritten}
    # the rewritten weights are bf16 without their block scales; every other tensor is byte for byte
    assert set(after) == set(before) - scales
    for name in rewritten:
        assert raw_tensor_bytes(after[name], name)[0] == "BF16"
    untouched = [n for n in after if n not in rewritten and not n.endswith("kv_a_layernorm.weight")]
    assert len(untouched) == len(before) - 2 * len(rewritten) - 2
    assert any(raw_tensor_bytes(after[n], n)[0] == "F8_E4M3" for n in untouched)
    assert [n for n in untouched if raw_tensor_bytes(before[n], n) != raw_tensor_bytes(after[n], n)] == []
    assert any("dequantised" in note for note in report.notes)

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    modules = sorted({n[: -len(".weight")] for n in rewritten} | {"lm_head"})
    assert quant["modules_to_not_convert"] == quant["ignored_layers"] == modules
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [128, 128]

    # transformers: the converted checkpoint (fp8 experts etc. dequantised on load) = the fp8 source's
    # function, within bf16 storage of the rewritten weights; far from the unquantised original
    reference = _run(sources["reference"], ids)
    converted = _run(out, ids, routing=reference[1])
    worst = max_logprob_diff(converted[0], reference[0])
    assert worst < BF16_LOGPROB_TOL, worst
    assert max_logprob_diff(converted[0], _logprobs(sources["bf16"], ids)) > FP8_EFFECT_MIN


def test_transformers_loads_the_fp8_source_itself(tmp_path, ids, request):
    """With every quantised shape a multiple of the block (or below it), transformers loads the fp8
    checkpoint: it equals the fixture's dequantisation (so it really read the fp8 weights, no random
    init), and the exact conversion equals it within bf16 tolerance."""
    seed = seed_for(request.node.nodeid) % 1000
    original = make_tiny_deepseek_family(tmp_path / "bf16", "deepseek_v3", seed=seed, qk_rope_head_dim=128)
    fp8 = make_fp8_checkpoint(original, tmp_path / "fp8")
    source = _run(fp8, ids)
    assert (source[0] - _logprobs(dequantised_checkpoint(fp8, tmp_path / "ref"), ids)).abs().max().item() < 1e-5
    assert (source[0] - _logprobs(original, ids)).abs().max().item() > FP8_EFFECT_MIN
    convert_mla_to_gla(fp8, tmp_path / "out", shards=2, softmax="exact", basis="pca", show_progress=False)
    worst = max_logprob_diff(_run(tmp_path / "out", ids, routing=source[1])[0], source[0])
    assert worst < BF16_LOGPROB_TOL, worst


CALIBRATED = {  # one calibrated mode per source kind (each runs the transformers capture once)
    "bf16": dict(softmax="partitioned", basis="pca-act", calibrate="logit+output"),
    "fp8": dict(softmax="grouped", basis="group-pca", calibrate="logit"),
}


@pytest.mark.parametrize("source_kind", sorted(CALIBRATED))
def test_calibrated_conversion_of_a_v3_source(sources, tmp_path, ids, source_kind):
    """Calibration (transformers capture) on a V3 source with the low-rank query and MoE, fp32 (partitioned,
    λ and μ fitted in the activation-PCA basis) or fp8 (grouped with per-group subspaces; the capture runs
    on a dequantised scratch copy). The fit does not raise the head-output error; the result loads, stays
    near the source, and the experts come through byte for byte."""
    src, settings = sources[source_kind], CALIBRATED[source_kind]
    reference = _run(sources["reference" if source_kind == "fp8" else "bf16"], ids)
    out = tmp_path / "out"
    convert_mla_to_gla(src, out, shards=2, calib_text=calibration_text(), calib_tokens=512, calib_window=128,
                       show_progress=False, **settings)
    record = json.loads((out / "config.json").read_text())["mla_plugin"]["converted_with"]
    assert record["calibrate"] == settings["calibrate"] and record["calib_tokens"] == 512
    assert record["attention_output_error_after"] <= record["attention_output_error_before"] + 1e-6
    assert not list(tmp_path.glob(".mla-plugin-dequantised-*"))  # the fp8 scratch copy is gone
    expert = "model.layers.1.mlp.experts.1.down_proj.weight"
    assert raw_tensor_bytes(all_tensor_names(out)[expert], expert) == raw_tensor_bytes(
        all_tensor_names(src)[expert], expert)
    converted = _run(out, ids, remote=True, routing=reference[1])
    assert torch.isfinite(converted[0]).all()
    # partitioned with fitted scales stays near the source; group-pca at g = 2 of d_c 512 (4 heads) is exact
    # up to the bf16 storage
    tol = PARTITIONED_LOGPROB_TOL if settings["softmax"] == "partitioned" else BF16_LOGPROB_TOL
    worst = max_logprob_diff(converted[0], reference[0])
    assert worst < tol, worst


def test_transformers_keeps_exactly_the_rewritten_modules_unquantised(sources, tmp_path):
    """transformers' FP8 quantizer (on a GPU: FP8Linear for every linear it converts) reads the converted
    config's modules_to_not_convert: the rewritten modules and lm_head stay nn.Linear, the rest is fp8."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.quantizers_utils import should_convert_module
    from transformers.utils.quantization_config import FineGrainedFP8Config

    convert_mla_to_gla(sources["fp8"], tmp_path / "out", shards=2, softmax="exact", show_progress=False)
    config = AutoConfig.from_pretrained(str(tmp_path / "out"))
    skip = FineGrainedFP8Config.from_dict(config.quantization_config).modules_to_not_convert
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear or n.endswith(".experts")]
    kept = {n for n in linear if not should_convert_module(n, skip)}
    assert kept == {f"model.layers.{i}.self_attn.{kind}" for i in range(2) for kind in REWRITTEN} | {"lm_head"}
    assert "model.layers.1.mlp.experts" in linear and "model.layers.1.self_attn.q_b_proj" in linear


def _read(folder, name):
    from mla_plugin.convert.safetensors_stream import read_tensor

    return read_tensor(all_tensor_names(folder)[name], name)


def test_dequantize_writes_every_fp8_weight_in_bf16(sources, tmp_path, capsys):
    """--dequantize (CLI): no fp8 tensor, no block scale, no quantization_config left, the index rewritten;
    every copied fp8 weight = its float64 dequantisation (the fixture's block expansion) rounded to bf16,
    exactly, its scale read from another file; the folded ones = the fp32 reference's conversion in bf16;
    the rest byte for byte."""
    from mla_plugin.cli import main

    with pytest.raises(SystemExit) as shown:
        main(["convert", "mla-to-gla", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert shown.value.code == 0 and "--dequantize" in help_text
    assert "drop the block scales and quantization_config" in help_text
    src = move_scales_to_their_own_file(shutil.copytree(sources["fp8"], tmp_path / "src"))
    out, ref = tmp_path / "out", tmp_path / "ref"
    assert main(["convert", "mla-to-gla", str(src), str(out), "--shards", "2", "--softmax", "exact",
                 "--dequantize"]) == 0
    assert "--dequantize: every fp8 weight" in capsys.readouterr().out
    convert_mla_to_gla(sources["reference"], ref, shards=2, softmax="exact", show_progress=False)

    before, after = all_tensor_names(src), all_tensor_names(out)
    assert set(after) == {n for n in before if not n.endswith("_scale_inv")}
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {n: p.name for n, p in after.items()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert {raw_tensor_bytes(after[n], n)[0] for n in after} == {"BF16"}  # no F8_E4M3 left, nothing else widened
    folded = {f"model.layers.{i}.self_attn.{k}.weight" for i in range(2)
              for k in ("kv_a_proj_with_mqa", "kv_b_proj", "kv_a_layernorm")}
    fp8 = [n for n in before if raw_tensor_bytes(before[n], n)[0] == "F8_E4M3"]
    assert len(fp8) > 20 and before[fp8[0]] != before[fp8[0] + "_scale_inv"]  # scales in the other file
    for name in fp8:
        if name not in folded:
            expected = dequantise_reference(_read(src, name), _read(src, name + "_scale_inv"), dtype=torch.float64)
            assert torch.equal(_read(out, name), expected.to(torch.bfloat16)), name
    for name in folded:
        torch.testing.assert_close(_read(out, name).float(), _read(ref, name).to(torch.bfloat16).float(),
                                   rtol=2 ** -7, atol=1e-6)
    for name in set(after) - folded - set(fp8):
        assert raw_tensor_bytes(before[name], name) == raw_tensor_bytes(after[name], name), name


def test_dequantize_on_an_unquantised_source_is_a_noted_no_op(sources, tmp_path):
    """A bf16/fp32 source has nothing to dequantise: the same output as without the flag, and a note."""
    plain = convert_mla_to_gla(sources["bf16"], tmp_path / "a", shards=2, show_progress=False)
    flagged = convert_mla_to_gla(sources["bf16"], tmp_path / "b", shards=2, dequantize=True, show_progress=False)
    assert any("nothing to dequantise" in note for note in flagged.notes) and plain.notes == []
    names = all_tensor_names(tmp_path / "a")
    for name, path in all_tensor_names(tmp_path / "b").items():
        assert raw_tensor_bytes(path, name) == raw_tensor_bytes(names[name], name), name


def test_dequantize_refuses_an_fp8_weight_without_its_scale_before_writing(sources, tmp_path):
    from safetensors.torch import load_file, save_file

    from mla_plugin.convert.pipeline import ConversionError

    src = move_scales_to_their_own_file(shutil.copytree(sources["fp8"], tmp_path / "src"))
    lost = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    scales_file = src / "model-00002-of-00002.safetensors"
    scales = load_file(str(scales_file))
    del scales[lost]
    save_file(scales, str(scales_file), metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    del index["weight_map"][lost]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"1 fp8 weight\(s\) lack their _scale_inv.*experts\.3\.down_proj"):
        convert_mla_to_gla(src, tmp_path / "out", shards=2, dequantize=True, show_progress=False)
    assert not (tmp_path / "out").exists()
