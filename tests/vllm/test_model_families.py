"""The deployed MLA families through both vLLM backends (issue 15 item 1): tiny random
DeepSeek-V2 (full: low-rank query, softmax greedy routing) and DeepSeek-V3/R1/Kimi-K2-shaped
(low-rank query, sigmoid routing with a correction bias) checkpoints, layer 0 dense and layer 1
mixture of experts (4 routed, 2 per token, 1 shared), fp32.

vLLM builds these models itself (its MoE layers run on CPU in fp32); only the attention is
ours: ``mla_plugin`` (vLLM's layer, our impl) and ``mla_plugin_gla`` (our layer: the low-rank
query's fused [q_a_proj; kv_a_proj_with_mqa] and q_a_layernorm replicated, q_b_proj held like
q_proj: whole, or split by heads in grouped mode). Engines, once each: TP=1 in process (seven),
TP=2 in one subprocess (seven, multiprocess executor).
"""

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from mla_plugin.vllm.mla_backend import DECODE_CALLS, LAST_CACHE_SHAPE
from tests.conftest import seed_for
from tests.vllm.engines import (
    _hf_model,
    assert_matches_transformers,
    assert_same_logprobs,
    logprob_spread,
    run_engine,
    run_engines_subprocess,
)
from tests.vllm.helpers import gla, trace_lines, trace_pids

FAMILIES = ("deepseek_v2", "deepseek_v3")
# Routing keys the released configs carry and vLLM reads (transformers' config classes do not
# write them): V2's n_group / topk_group (vLLM's CPU router asserts they are set; 1 / 1 as in
# V2-Lite, where greedy and group-limited routing agree), V3's topk_method "noaux_tc" (vLLM
# builds gate.e_score_correction_bias only then; without it loading fails with KeyError
# 'layers.1.mlp.gate.e_score_correction_bias') and scoring_func "sigmoid" (else softmax).
RELEASED_ROUTING = {
    "deepseek_v2": dict(n_group=1, topk_group=1),
    "deepseek_v3": dict(topk_method="noaux_tc", scoring_func="sigmoid"),
}
MLA, GLA = "MLA_PLUGIN", "MLA_PLUGIN_GLA"
MODES = {
    "mla": dict(backend="mla_plugin"),
    "exact": dict(backend="mla_plugin_gla", hf_overrides=gla("exact")),
    "partitioned": dict(backend="mla_plugin_gla", hf_overrides=gla("partitioned", "local", "hadamard")),
    "grouped": dict(backend="mla_plugin_gla", hf_overrides=gla("grouped", "local")),
}
APPROXIMATE = ("partitioned", "grouped")
# Partitioned holds the query exactly as exact does (every rank all heads), which both families
# test at TP=2; it runs on the V3 shape only, to keep this module's engines to fourteen.
CASES = [(family, mode) for family in FAMILIES for mode in MODES
         if (family, mode) != ("deepseek_v2", "partitioned")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("families")
    return {family: str(make_tiny_deepseek_family(tmp / family, family, q_lora_rank=64, moe=True,
                                                  seed=seed_for(f"model_families/{family}"),  # fresh per run
                                                  **RELEASED_ROUTING[family]))
            for family in FAMILIES}


@pytest.fixture(scope="module")
def tp1(models):
    """(family, mode) -> result at TP=1, in process, with the decode calls our backend counted."""
    out = {}
    for family, mode in CASES:
        spec = MODES[mode]
        name = MLA if spec["backend"] == "mla_plugin" else GLA
        before = DECODE_CALLS.get(name, 0)
        out[family, mode] = run_engine(models[family], **spec)
        out[family, mode]["decode_calls"] = DECODE_CALLS.get(name, 0) - before
        out[family, mode]["cache_shape"] = LAST_CACHE_SHAPE[name]
    return out


@pytest.fixture(scope="module")
def tp2(models, tmp_path_factory):
    """(family, mode) -> (result, trace file, log section) at TP=2, all in one subprocess."""
    tmp = tmp_path_factory.mktemp("families_tp2")
    runs = [dict(MODES[mode], model=models[family], tensor_parallel_size=2, distributed_executor_backend="mp",
                 trace_file=str(tmp / f"{family}_{mode}.trace")) for family, mode in CASES]
    # The engine core in the subprocess itself (no third process per engine): the two TP
    # workers are still spawned by vLLM's multiprocess executor.
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    results, log = run_engines_subprocess(tmp, runs, env=env, timeout=1500)
    sections = log.split("=== engine run ")[1:]
    assert len(sections) == len(runs), log[-3000:]
    return {case: (result, tmp / f"{case[0]}_{case[1]}.trace", section)
            for case, result, section in zip(CASES, results, sections)}


def _config(model: str) -> dict:
    return json.loads((Path(model) / "config.json").read_text())


def attention_parameters(config: dict, *, tp: int, heads_split: bool) -> int:
    """Parameters of one sharded-latent attention layer on one rank with a low-rank query: the
    fused [W_DQ; W_DKV; W_KR], both norms (replicated); W_UQ (q_b_proj) and W_O by heads and
    kv_b_proj's block when the heads are split, else whole."""
    heads, d_model, d_c, d_q = (config[k] for k in ("num_attention_heads", "hidden_size", "kv_lora_rank",
                                                      "q_lora_rank"))
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    local_heads = heads // tp if heads_split else heads
    replicated = (d_q + d_c + rope) * d_model + d_q + d_c
    per_head = local_heads * ((nope + rope) * d_q + (nope + v) * (d_c // tp if heads_split else d_c)
                              + v * d_model)
    return replicated + per_head


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoints_have_low_rank_query_and_experts(models, family):
    """What the other tests claim to cover is in the checkpoint transformers computes from."""
    config = _config(models[family])
    assert config["model_type"] == family and config["q_lora_rank"] == 64
    layers = _hf_model(models[family]).model.layers
    assert layers[1].mlp.experts.num_experts == 4 and hasattr(layers[1].mlp, "shared_experts")
    assert not hasattr(layers[0].mlp, "experts")  # first_k_dense_replace = 1
    with safe_open(str(Path(models[family]) / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    attn = "model.layers.0.self_attn"
    assert {f"{attn}.{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj")} <= names
    assert f"{attn}.q_proj.weight" not in names


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mla", "exact"])
def test_tp1_equals_transformers(tp1, models, family, mode):
    result = tp1[family, mode]
    assert result["decode_calls"] > 0, "our backend's decode never ran"
    assert result["cache_shape"][-1] == 512 + 64  # one rank: the whole latent and the rope key
    assert logprob_spread(result) > 1.0  # the comparison below can fail
    assert_matches_transformers(result, models[family], atol=1e-4)


@pytest.mark.parametrize("family,mode", [case for case in CASES if case[1] in APPROXIMATE])
def test_approximate_modes_ran_and_are_other_functions(tp1, family, mode):
    """Partitioned and grouped are not MLA: the TP=1 / TP=2 equality below means something."""
    result = tp1[family, mode]
    assert result["decode_calls"] > 0
    worst = max(abs(a - b) for ours, exact in zip(result["prompt_logprobs"], tp1[family, "exact"]["prompt_logprobs"])
                for a, b in zip(ours, exact))
    assert worst > 1e-3, f"{mode} equals exact to {worst:.2g}: the mode did nothing"


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["mla", "exact"])
def test_tp2_equals_transformers(tp2, models, family, mode):
    assert_matches_transformers(tp2[family, mode][0], models[family], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family,mode", CASES)
def test_tp2_equals_tp1(tp1, tp2, family, mode):
    assert_same_logprobs(tp2[family, mode][0], tp1[family, mode], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_ranks_ran_our_backends_and_hold_their_query_rows(tp2, models, family):
    """Each TP=2 engine's two worker processes ran our decode; vLLM built the MoE layer on CPU;
    sharded-latent ranks cache d_c / 2 + d_R and hold the query rows the mode gives them
    (attn_params: q_b_proj whole, or its heads' half in grouped mode)."""
    config = _config(models[family])
    heads = config["num_attention_heads"]
    for mode in (mode for fam, mode in CASES if fam == family):
        _, trace, log = tp2[family, mode]
        assert "CPUUnquantizedExperts" in log, f"{mode}: vLLM did not build its CPU MoE experts"
        lines = trace_lines(trace)
        backend = MLA if mode == "mla" else GLA
        assert len(trace_pids(trace)) == 2 and all(line.startswith(f"{backend} ") for line in lines), lines
        if mode == "mla":
            continue
        split = mode == "grouped"
        offsets = set()
        for line in lines:
            width = int(re.search(r"cache=\[\d+, \d+, (\d+)\]", line).group(1))
            assert width == config["kv_lora_rank"] // 2 + config["qk_rope_head_dim"], line
            offset, local, total = map(int, re.search(r"heads=(\d+)\+(\d+)/(\d+)", line).groups())
            assert (local, total) == ((heads // 2 if split else heads), heads), line
            offsets.add(offset)
            expected = attention_parameters(config, tp=2, heads_split=split)
            assert int(re.search(r"attn_params=(\d+)", line).group(1)) == expected, line
        assert offsets == ({0, heads // 2} if split else {0}), lines
