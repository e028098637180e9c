"""The deployed MLA shapes under SGLang: tiny random DeepSeek-V2 (full: low-rank query, softmax
"greedy" routing) and DeepSeek-V3 (V3/R1, Kimi-K2 shape: low-rank query, sigmoid routing with a
correction bias) checkpoints, each with layer 0 dense and layer 1 MoE (4 routed experts, 2 per
token, 1 shared expert), built here with fresh seeds (``make_tiny_deepseek_family``).

Two ``.venv-sglang`` subprocesses run their engines one after another (offline ``sglang.Engine``,
fp32, prompt logprobs and 32 greedy steps):

- TP=1, per family: ``mla_plugin``; ``mla_plugin_gla`` exact (one slice); for DeepSeek-V3 also
  ``mla_plugin_gla`` grouped (g = 2 slices, all heads on the rank);
- TP=2, per family: ``mla_plugin_gla`` exact (each rank caches d_c/2 + d_R); for DeepSeek-V3 also
  grouped (g = 2, the heads split with the latent: each rank its own group's H/2 heads and
  q_b_proj rows).

Grouped runs on V3 only (the suite's time budget): the attention, its query and its sharding
are the same code for both families; they differ in the MoE routing, which the exact runs check.

Checked: ``mla_plugin`` and exact ``mla_plugin_gla`` at TP=1 and TP=2 equal transformers within
1e-4 (so SGLang's CPU MoE, run with the plugin's config fill-ins, equals transformers' too);
grouped equals itself across TP=1 and TP=2 and is another function than MLA; the trace shows
which backend every scheduler process ran, in prefill and decode, with its pool width and heads.
"""

import json

import pytest
from safetensors import safe_open

from mla_plugin.fixtures.tiny_models import make_tiny_deepseek_family
from tests.conftest import seed_for
from tests.sglang.helpers import TP2_ENV, prompt_ids, run_sglang_engines, trace_by_pid
from tests.vllm.engines import (
    assert_matches_transformers,
    assert_same_logprobs,
    logprob_spread,
    max_diff_from_transformers,
)

pytestmark = pytest.mark.slow

FAMILIES = ("deepseek_v2", "deepseek_v3")
GLA = "mla_plugin_gla"
ATOL = 1e-4
D_C, D_R, D_Q, HEADS = 512, 64, 64, 4  # the builder's kv_lora_rank, rope dim, q_lora_rank, heads
EXACT = json.dumps({"mla_plugin": {"softmax": "exact"}})
GROUPED = json.dumps({"mla_plugin": {"shards": 2, "softmax": "grouped"}})
MLA_RUN, EXACT_RUN, GROUPED_RUN = ("mla", "mla_plugin", None), ("exact", GLA, EXACT), ("grouped", GLA, GROUPED)
# (name, backend, options) of each engine, per family, in run order.
TP1_RUNS = {"deepseek_v2": (MLA_RUN, EXACT_RUN), "deepseek_v3": (MLA_RUN, EXACT_RUN, GROUPED_RUN)}
TP2_RUNS = {"deepseek_v2": (EXACT_RUN,), "deepseek_v3": (EXACT_RUN, GROUPED_RUN)}


def _engine_names(table) -> list[str]:
    return [name for family in FAMILIES for name, _, _ in table[family]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: make_tiny_deepseek_family(root / family, family, seed=seed_for(f"sglang/families/{family}"))
            for family in FAMILIES}


def _runs(checkpoints, table, **engine) -> list[dict]:
    runs = []
    for family in FAMILIES:
        model = checkpoints[family]
        for _, backend, options in table[family]:
            run = dict(model=str(model), prompt_ids=prompt_ids(model), attention_backend=backend, **engine)
            if options:
                run["json_model_override_args"] = options
            runs.append(run)
    return runs


def _by_name(results, trace, table) -> dict:
    """``{family: {run name: result}}`` and the trace lines of each engine's schedulers, in run order."""
    out, step = {}, 0
    for family in FAMILIES:
        out[family] = {}
        for name, _, _ in table[family]:
            out[family][name] = results[step]
            step += 1
    out["trace"] = list(trace_by_pid(trace).values())
    return out


@pytest.fixture(scope="module")
def tp1(tmp_path_factory, checkpoints):
    tmp = tmp_path_factory.mktemp("families_tp1")
    trace = tmp / "trace.txt"
    results, _ = run_sglang_engines(tmp, _runs(checkpoints, TP1_RUNS), trace_file=trace)
    return _by_name(results, trace, TP1_RUNS)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, checkpoints):
    tmp = tmp_path_factory.mktemp("families_tp2")
    trace = tmp / "trace.txt"
    results, _ = run_sglang_engines(tmp, _runs(checkpoints, TP2_RUNS, tp_size=2), trace_file=trace, env=TP2_ENV)
    return _by_name(results, trace, TP2_RUNS)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_has_low_rank_query_and_moe(checkpoints, family):
    """What the engines below load: q_a_proj/q_a_layernorm/q_b_proj (no q_proj), experts in layer 1."""
    config = json.loads((checkpoints[family] / "config.json").read_text())
    assert config["q_lora_rank"] == D_Q and config["n_routed_experts"] == 4 and config["n_shared_experts"] == 1
    with safe_open(checkpoints[family] / "model.safetensors", "pt") as f:
        names = set(f.keys())
    attn = "model.layers.1.self_attn."
    assert {attn + "q_a_proj.weight", attn + "q_a_layernorm.weight", attn + "q_b_proj.weight"} <= names
    assert not any(".q_proj." in name for name in names)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert ("model.layers.1.mlp.gate.e_score_correction_bias" in names) == (family == "deepseek_v3")


@pytest.mark.parametrize("family", FAMILIES)
def test_mla_plugin_tp1_matches_transformers(tp1, checkpoints, family):
    result = tp1[family]["mla"]
    assert all(len(tokens) == 32 for tokens in result["tokens"])
    assert logprob_spread(result) > 1.0  # a 1e-4 agreement means something
    assert_matches_transformers(result, str(checkpoints[family]), atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gla_exact_tp1_matches_transformers(tp1, checkpoints, family):
    assert_matches_transformers(tp1[family]["exact"], str(checkpoints[family]), atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
def test_gla_exact_tp2_matches_transformers(tp2, checkpoints, family):
    result = tp2[family]["exact"]
    assert all(len(tokens) == 32 for tokens in result["tokens"])
    assert_matches_transformers(result, str(checkpoints[family]), atol=ATOL)


def test_grouped_tp2_equals_tp1_and_is_not_mla(tp1, tp2, checkpoints):
    family = "deepseek_v3"
    assert all(len(tokens) == 32 for tokens in tp2[family]["grouped"]["tokens"])
    assert_same_logprobs(tp2[family]["grouped"], tp1[family]["grouped"], atol=ATOL)
    # the options took effect: another function than MLA, by more than 10x exact's tolerance
    assert max_diff_from_transformers(tp1[family]["grouped"], str(checkpoints[family])) > 1e-3


def test_tp1_trace_each_engine_ran_its_backend(tp1):
    """One scheduler per engine, in run order, each running the backend it was given."""
    engines, names = tp1["trace"], _engine_names(TP1_RUNS)
    assert len(engines) == len(names) == 5, engines
    for name, lines in zip(names, engines):
        backend = "mla_plugin" if name == "mla" else GLA
        assert all(line.startswith(f"{backend} sglang ") for line in lines), lines
        assert {m for line in lines for m in ("extend", "decode") if f" {m} " in line} == {"extend", "decode"}
        if name == "exact":
            assert all(f"pool_width={D_C + D_R} shards=0+1/1 softmax=exact" in line for line in lines), lines
        if name == "grouped":
            assert all("shards=0+2/2 softmax=grouped" in line and f"local_heads={HEADS}/{HEADS}" in line
                       for line in lines), lines


def test_tp2_trace_each_rank_holds_its_slice_and_heads(tp2):
    """Three engines x two ranks: every rank caches d_c/2 + d_R; grouped ranks hold H/2 heads each."""
    ranks, names = tp2["trace"], _engine_names(TP2_RUNS)
    assert len(ranks) == 2 * len(names) == 6, ranks
    width = D_C // 2 + D_R
    for index, lines in enumerate(ranks):
        name = names[index // 2]
        assert all(line.startswith(f"{GLA} sglang ") and f"d_loc={D_C // 2} pool_width={width} " in line
                   and f"softmax={name}" in line for line in lines), lines
        assert {m for line in lines for m in ("extend", "decode") if f" {m} " in line} == {"extend", "decode"}
        heads = HEADS // 2 if name == "grouped" else HEADS
        assert all(f"local_heads={heads}/{HEADS}" in line for line in lines), lines
    grouped_offsets = {line.split(" head_offset=")[1].split()[0] for lines in ranks[4:6] for line in lines}
    assert grouped_offsets == {"0", str(HEADS // 2)}
