"""mla-to-gla on DeepSeek-V3-style sources (fp32): the low-rank query and MoE layers.

Tiny checkpoints from mla_plugin.fixtures.tiny_models.make_tiny_deepseek_family: V3 (q_lora_rank
64, layer 0 dense, layer 1 with 4 routed experts, 2 per token, 1 shared, sigmoid routing with a
correction bias) and V2 full (low-rank query, softmax routing). transformers is the reference.
"""

import json
import shutil

import pytest
import torch

from mla_plugin.convert.declared_config import REMOTE_CODE, write_config
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.fp8_checkpoints import all_tensor_names, raw_tensor_bytes
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from tests.conftest import seed_for

# Rewritten by mla-to-gla in every layer; every other tensor must come through byte for byte.
FOLDED = ("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight")
LOW_RANK_QUERY = ("self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight")
MOE = ("mlp.experts.0.gate_proj.weight", "mlp.experts.3.down_proj.weight", "mlp.gate.weight",
       "mlp.gate.e_score_correction_bias", "mlp.shared_experts.up_proj.weight")


@pytest.fixture(scope="module")
def v3(tmp_path_factory, request):
    return make_tiny_deepseek_family(tmp_path_factory.mktemp("v3") / "src", "deepseek_v3",
                                     seed=seed_for(request.node.nodeid) % 1000, q_lora_rank=64, moe=True)


def _token_ids(rng) -> torch.Tensor:
    return torch.randint(3, 4096, (2, 20), generator=rng)  # [batch, tokens], fresh each run


def _logprobs(path, ids, *, remote=False) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=remote).eval()
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.double(), -1)  # [B, T, V]


def untouched_tensors_differ(src, dst, skip=()) -> list[str]:
    """Names present in both checkpoints, outside ``skip``, whose stored dtype, shape or bytes differ."""
    a, b = all_tensor_names(src), all_tensor_names(dst)
    return [name for name in a if name in b and not name.endswith(skip)
            and raw_tensor_bytes(a[name], name) != raw_tensor_bytes(b[name], name)]


@pytest.mark.parametrize("basis", ["identity", "hadamard", "pca"])
def test_exact_conversion_of_a_v3_source_keeps_the_function_and_the_moe_bytes(v3, tmp_path, rng, basis):
    out = tmp_path / "out"
    report = convert_mla_to_gla(v3, out, shards=2, softmax="exact", basis=basis, show_progress=False)
    assert report.changed_tensors == 6  # 3 per layer: the latent weights only; the query is not touched
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert "auto_map" not in config and not (out / "modeling_mla_plugin.py").exists()
    ids = _token_ids(rng)
    diff = (_logprobs(out, ids) - _logprobs(v3, ids)).abs().max().item()
    assert diff < 1e-4, diff
    names = all_tensor_names(v3)
    assert all(f"model.layers.1.{part}" in names for part in LOW_RANK_QUERY + MOE)
    assert set(all_tensor_names(out)) == set(names)
    assert untouched_tensors_differ(v3, out, skip=FOLDED) == []
    if basis != "identity":  # the folded weights really changed
        name = "model.layers.1.self_attn.kv_b_proj.weight"
        assert raw_tensor_bytes(names[name], name) != raw_tensor_bytes(out / "model.safetensors", name)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_modeling_file_computes_mla_with_the_low_rank_query(tmp_path, rng, family):
    """The sharded-latent attention of modeling_mla_plugin.py, at one slice and λ = 1 (MLA's function
    through its own code path), equals transformers' stock model: low-rank query, the family's rope and MoE."""
    src = make_tiny_deepseek_family(tmp_path / "src", family, seed=int(torch.randint(1000, (1,), generator=rng)))
    declared = tmp_path / "declared"
    shutil.copytree(src, declared)
    config = json.loads((src / "config.json").read_text())
    config["mla_plugin"] = {"shards": 1, "softmax": "partitioned", "logit_scale": 1.0}
    write_config(declared, config)
    cls = "MLAPluginDeepseekV3ForCausalLM" if family == "deepseek_v3" else "MLAPluginDeepseekV2ForCausalLM"
    # λ = 1 on one slice is MLA, so write_config declares it ordinary; route it through the modeling file anyway
    config.update(architectures=["MLAPluginDeepseekV2ForCausalLM"],
                  auto_map={"AutoModelForCausalLM": f"modeling_mla_plugin.{cls}"})
    (declared / "config.json").write_text(json.dumps(config))
    shutil.copy2(REMOTE_CODE, declared / REMOTE_CODE.name)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(declared), dtype=torch.float32, trust_remote_code=True)
    attn = model.model.layers[1].self_attn
    assert type(model).__name__ == cls and type(attn).__name__.startswith("ShardedLatentDeepseek")
    assert attn.q_lora_rank == 64 and type(model.model.layers[1].mlp).__name__.lower().endswith("moe")
    ids = _token_ids(rng)
    with torch.no_grad():
        ours = torch.log_softmax(model(ids).logits.double(), -1)
    diff = (ours - _logprobs(src, ids)).abs().max().item()
    assert diff < 1e-4, diff


def test_partitioned_conversion_of_a_v3_source_equals_the_load_time_options(v3, tmp_path, rng):
    """Folded λ (converted checkpoint) = the same options applied at load time by the modeling file's V3
    class; and it is not MLA's function."""
    out = tmp_path / "out"
    convert_mla_to_gla(v3, out, shards=2, softmax="partitioned", basis="identity", show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MLAPluginDeepseekV2ForCausalLM"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_mla_plugin.MLAPluginDeepseekV3ForCausalLM"}
    load_time = tmp_path / "load_time"
    shutil.copytree(v3, load_time)
    source_config = json.loads((v3 / "config.json").read_text())
    write_config(load_time, dict(source_config, mla_plugin={"shards": 2, "softmax": "partitioned"}))
    ids = _token_ids(rng)
    converted = _logprobs(out, ids, remote=True)
    assert (converted - _logprobs(load_time, ids, remote=True)).abs().max().item() < 1e-4
    assert (converted - _logprobs(v3, ids)).abs().max().item() > 1e-2
    assert untouched_tensors_differ(v3, out, skip=FOLDED) == []


def test_quantised_sources_the_converter_cannot_read_are_clear_errors(v3, tmp_path):
    from mla_plugin.convert.pipeline import ConversionError
    from mla_plugin.fixtures.fp8_checkpoints import make_fp8_checkpoint

    awq = tmp_path / "awq"
    shutil.copytree(v3, awq)
    config = json.loads((v3 / "config.json").read_text())
    (awq / "config.json").write_text(json.dumps(dict(config, quantization_config={"quant_method": "awq", "bits": 4})))
    with pytest.raises(ConversionError, match="quantization_config .* is not supported.*dequantise"):
        convert_mla_to_gla(awq, tmp_path / "out_awq", shards=2, show_progress=False)
    fp8 = make_fp8_checkpoint(v3, tmp_path / "fp8")
    (fp8 / "config.json").write_text(json.dumps(config))  # fp8 weights, but no quantization_config
    with pytest.raises(ConversionError, match="float8_e4m3fn but config.json has no quantization_config"):
        convert_mla_to_gla(fp8, tmp_path / "out_fp8", shards=2, show_progress=False)
    assert not (tmp_path / "out_awq").exists() and not (tmp_path / "out_fp8").exists()


def test_kimi_k2_config_is_refused_in_one_line(v3, tmp_path):
    """Kimi-K2 ships the V3 shape under its own model_type (remote code): not read as V3 silently."""
    from mla_plugin.convert.pipeline import ConversionError

    kimi = tmp_path / "kimi"
    shutil.copytree(v3, kimi)
    config = json.loads((v3 / "config.json").read_text())
    (kimi / "config.json").write_text(json.dumps(dict(config, model_type="kimi_k2")))
    with pytest.raises(ConversionError, match="model_type 'kimi_k2'") as error:
        convert_mla_to_gla(kimi, tmp_path / "out", shards=2, show_progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
