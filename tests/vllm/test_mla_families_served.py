"""Every MLA family vLLM and transformers both build, through ``mla_plugin`` (issue 22 item 2).

vLLM's MLA layer is shared by the families; our backend sits below it. The DeepSeek-V2 and
V3/R1/Kimi-K2 shapes are test_model_families.py's; here GLM-4.7-Flash (``glm4_moe_lite``,
whose attention class extends DeepSeek-V2's: before issue 22 its module did not even import with
the plugin installed), built tiny by tests/families.py, equal to transformers within 1e-4 (fp32,
prompt logprobs + 32 greedy steps) at TP 1 (in process) and TP 2 (vLLM's multiprocess executor,
both ranks traced). ``mla_plugin_gla`` on it is refused at start-up in one line naming why. Why the
other families both libraries know are not here: tests/families.py.
"""

import json
from pathlib import Path

import pytest

from mla_plugin.vllm.mla_backend import DECODE_CALLS, LAST_CACHE_SHAPE
from tests.conftest import seed_for
from tests.families import FAMILIES, make_family
from tests.vllm.engines import (
    _hf_model,
    assert_matches_transformers,
    assert_same_logprobs,
    hf_logprobs,
    logprob_spread,
    run_engine,
    run_engines_subprocess,
)
from tests.vllm.helpers import trace_lines, trace_pids

MLA = "MLA_PLUGIN"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mla_families")
    return {family: str(make_family(tmp / family, family, seed=seed_for(f"mla_families/{family}")))
            for family in FAMILIES}


@pytest.fixture(scope="module")
def tp1(models):
    """family -> result at TP=1 in process, with our decode calls counted."""
    out = {}
    for family, model in models.items():
        before = DECODE_CALLS.get(MLA, 0)
        out[family] = run_engine(model, backend="mla_plugin")
        out[family]["decode_calls"] = DECODE_CALLS.get(MLA, 0) - before
        out[family]["cache_shape"] = LAST_CACHE_SHAPE[MLA]
    return out


@pytest.fixture(scope="module")
def tp2(models, tmp_path_factory):
    """family -> (result, trace file, log) at TP=2, all families in one subprocess."""
    tmp = tmp_path_factory.mktemp("mla_families_tp2")
    runs = [dict(model=model, backend="mla_plugin", tensor_parallel_size=2, distributed_executor_backend="mp",
                 trace_file=str(tmp / f"{family}.trace")) for family, model in models.items()]
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    results, log = run_engines_subprocess(tmp, runs, env=env, timeout=1500)
    return {family: (result, tmp / f"{family}.trace", log) for family, result in zip(models, results)}


def worst_difference(result: dict, model: str) -> float:
    """Largest |logprob - transformers'| over the prompts and the greedy steps."""
    worst = 0.0
    for i, prompt_ids in enumerate(result["prompt_ids"]):
        full = prompt_ids + result["tokens"][i]
        ref = hf_logprobs(model, full)
        ours = result["prompt_logprobs"][i] + result["token_logprobs"][i]
        worst = max(worst, max(abs(a - float(ref[t - 1, full[t]])) for a, t in zip(ours, range(1, len(full)))))
    return worst


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_is_the_family_transformers_computes(models, family):
    config = json.loads((Path(models[family]) / "config.json").read_text())
    assert config["model_type"] == family and config["architectures"] == [FAMILIES[family][1]]
    model = _hf_model(models[family])
    assert type(model).__name__ == FAMILIES[family][1]
    attention = model.model.layers[0].self_attn
    assert attention.kv_a_proj_with_mqa.out_features == config["kv_lora_rank"] + config["qk_rope_head_dim"]
    assert hasattr(model.model.layers[1].mlp, "experts") and not hasattr(model.model.layers[0].mlp, "experts")


@pytest.mark.parametrize("family", FAMILIES)
def test_tp1_equals_transformers(tp1, models, family):
    result = tp1[family]
    assert result["decode_calls"] > 0, "our backend's decode never ran"
    assert result["cache_shape"][-1] == 512 + 64
    assert logprob_spread(result) > 1.0  # the comparison below can fail
    assert_matches_transformers(result, models[family], atol=1e-4)
    print(f"\n{family} TP=1 mla_plugin: max |logprob - transformers| = {worst_difference(result, models[family]):.3g}")


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_equals_transformers_and_both_ranks_ran_ours(tp1, tp2, models, family):
    result, trace, log = tp2[family]
    assert_matches_transformers(result, models[family], atol=1e-4)
    assert_same_logprobs(result, tp1[family], atol=1e-4)
    lines = trace_lines(trace)
    assert len(trace_pids(trace)) == 2 and all(line.startswith(f"{MLA} ") for line in lines), lines
    assert "CPUUnquantizedExperts" in log, "vLLM did not build its CPU MoE experts"
    print(f"\n{family} TP=2 mla_plugin: max |logprob - transformers| = {worst_difference(result, models[family]):.3g}")


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_latent_is_refused_in_one_line(models, family):
    with pytest.raises(ValueError) as err:
        run_engine(models[family], backend="mla_plugin_gla", max_tokens=1)
    message = str(err.value)
    line = next(line for line in message.splitlines() if "--attention-backend mla_plugin_gla" in line)
    assert f"is '{family}', whose model builds its own" in line and "--attention-backend mla_plugin " in line, message
    print(f"\n{family} with mla_plugin_gla: {type(err.value).__name__}: {message}")
