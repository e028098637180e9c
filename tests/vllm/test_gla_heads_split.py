"""Grouped sharded latent with the heads split over TP ranks (issue 16 items 1, 2 and 5).

In grouped mode a rank builds only its groups' heads: W_Q and W_O sharded by heads,
kv_b_proj narrowed at load to those heads' rows and its latent columns, W_DKV / W_KR / γ
replicated; a latent_projection checkpoint caches P_loc ĉ. Engines started here, once each:
TP=1 in process (three), TP=2 spawn mode in one subprocess (two).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.fixtures import trained_fixture
from mla_plugin.vllm.mla_backend import DECODE_CALLS, LAST_CACHE_SHAPE
from tests.conftest import seed_for
from tests.converters import calibration_text
from tests.vllm.engines import (
    assert_matches_transformers,
    assert_same_logprobs,
    max_diff_from_transformers,
    run_engine,
    run_engines_subprocess,
)
from tests.vllm.helpers import gla, trace_lines, trace_pids
from tests.vllm.projection_checkpoint import make_projection_checkpoint

GLA = "MLA_PLUGIN_GLA"
TP2_NAMES = ("converted", "projected")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The trained DeepSeek fixture, its grouped conversion (g = 2, hadamard basis folded in), and an exact
    latent_projection version of it (g = 4, fresh random B_r)."""
    tmp = tmp_path_factory.mktemp("heads_split")
    trained = str(trained_fixture("deepseek-v2-tiny"))
    # float32 copy of the (bfloat16) fixture, so the converter's folded weights are not rounded
    # to bfloat16 and the conversion equals the load-time options to 1e-4
    trained32 = tmp / "trained32"
    shutil.copytree(trained, trained32)
    weights = load_file(str(trained32 / "model.safetensors"))
    save_file({k: v.float() for k, v in weights.items()}, str(trained32 / "model.safetensors"),
              metadata={"format": "pt"})
    convert_mla_to_gla(trained32, tmp / "converted", shards=2, softmax="grouped", show_progress=False)
    projected = make_projection_checkpoint(trained, tmp / "projected", shards=4,
                                           seed=seed_for("heads_split/projected"))  # fresh per run
    convert_mla_to_gla(trained32, tmp / "group_pca", shards=2, softmax="grouped", basis="group-pca",
                       calib_text=calibration_text(), calib_tokens=512, calib_window=128, show_progress=False)
    return {"trained": trained, "trained32": str(trained32), "converted": str(tmp / "converted"),
            "projected": str(projected), "group_pca": str(tmp / "group_pca")}


@pytest.fixture(scope="module")
def tp1(models):
    """TP=1 in process: grouped from flags (the converter's default basis, applied at load), and
    both checkpoints served with no flag."""
    out = {}
    for name, model, kwargs in (
        ("overrides", models["trained32"],
         dict(backend="mla_plugin_gla", hf_overrides=gla("grouped", basis="hadamard", shards=2))),
        ("converted", models["converted"], {}),
        ("projected", models["projected"], {}),
        ("group_pca", models["group_pca"], {}),
    ):
        before = DECODE_CALLS.get(GLA, 0)
        out[name] = run_engine(model, **kwargs)
        out[name]["decode_calls"] = DECODE_CALLS.get(GLA, 0) - before
        out[name]["cache_shape"] = LAST_CACHE_SHAPE[GLA]
    return out


@pytest.fixture(scope="module")
def tp2(models, tmp_path_factory):
    """name -> (result, trace file) at TP=2, spawn mode, both checkpoints with no flag."""
    tmp = tmp_path_factory.mktemp("heads_split_tp2")
    runs = [dict(model=models[name], tensor_parallel_size=2, distributed_executor_backend="mp",
                 trace_file=str(tmp / f"{name}.trace")) for name in TP2_NAMES]
    results, _ = run_engines_subprocess(tmp, runs, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, timeout=1500)
    return {name: (result, tmp / f"{name}.trace") for name, result in zip(TP2_NAMES, results)}


def _config(model: str) -> dict:
    return json.loads((Path(model) / "config.json").read_text())


def attention_parameters(config: dict, *, tp: int, heads_split: bool, projection: bool) -> tuple[int, int]:
    """(parameters of one attention layer on one rank, of which replicated) from the config."""
    heads, d_model, d_c = config["num_attention_heads"], config["hidden_size"], config["kv_lora_rank"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    shards = config["mla_plugin"]["shards"]
    local_heads = heads // tp if heads_split else heads
    d_loc = d_c // tp
    replicated = (d_c + rope) * d_model + d_c  # W_DKV, W_KR and γ
    split = (local_heads * (nope + rope) * d_model  # W_Q
             + local_heads * (nope + v) * (d_loc if heads_split else d_c)  # kv_b_proj's block
             + d_model * local_heads * v  # W_O
             + (d_loc * d_c if projection else 0))  # P's rows
    assert shards % tp == 0
    return split + replicated, replicated


def test_converted_grouped_needs_no_flag_and_equals_flags(tp1):
    assert tp1["converted"]["decode_calls"] > 0
    assert_same_logprobs(tp1["converted"], tp1["overrides"], atol=1e-4)


def test_projection_checkpoint_is_its_source_model(tp1, models):
    """The exact latent_projection construction served at TP=1 = transformers on the source."""
    assert tp1["projected"]["decode_calls"] > 0
    assert tp1["projected"]["cache_shape"][-1] == 512 + 64  # all four groups' z on one rank
    assert_matches_transformers(tp1["projected"], models["trained"], atol=1e-4)
    # and a plain grouped load of the same model is another function: the check can fail
    assert max_diff_from_transformers(tp1["overrides"], models["trained"]) > 1e-3


def test_projection_checkpoints_equal_their_modeling_file(tp1, models):
    """vLLM = the converter's transformers modeling file (trust_remote_code) on the built
    checkpoint and on a real `--basis group-pca` conversion (calibrated on held-out text)."""
    assert_matches_transformers(tp1["projected"], models["projected"], atol=1e-4)
    config = _config(models["group_pca"])["mla_plugin"]
    assert config["latent_projection"] is True and tp1["group_pca"]["decode_calls"] > 0
    assert tp1["group_pca"]["cache_shape"][-1] == 512 + 64
    assert_matches_transformers(tp1["group_pca"], models["group_pca"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", TP2_NAMES)
def test_tp2_equals_tp1(tp1, tp2, name):
    assert_same_logprobs(tp2[name][0], tp1[name], atol=1e-4)


@pytest.mark.slow
def test_projection_checkpoint_at_tp2_is_its_source_model(tp2, models):
    assert_matches_transformers(tp2["projected"][0], models["trained"], atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", TP2_NAMES)
def test_each_rank_holds_its_heads_and_slices(tp2, models, name):
    """Per rank: H/2 heads, kv_b_proj's block, P's rows; cache d_c/2 + d_R; attention
    parameters about half the whole (plus the replicated down-projection)."""
    config = _config(models[name])
    projection = name == "projected"
    per_rank, replicated = attention_parameters(config, tp=2, heads_split=True, projection=projection)
    whole, _ = attention_parameters(config, tp=1, heads_split=True, projection=projection)
    assert per_rank - replicated <= (whole - replicated) / 2
    lines = trace_lines(tp2[name][1])
    assert len(trace_pids(tp2[name][1])) == 2 and all(line.startswith(f"{GLA} ") for line in lines), lines
    heads = config["num_attention_heads"]
    seen_offsets = set()
    for line in lines:
        offset, local, total = map(int, re.search(r"heads=(\d+)\+(\d+)/(\d+)", line).groups())
        assert (local, total) == (heads // 2, heads), line
        seen_offsets.add(offset)
        assert int(re.search(r"attn_params=(\d+)", line).group(1)) == per_rank, line
        width = int(re.search(r"cache=\[\d+, \d+, (\d+)\]", line).group(1))
        assert width == config["kv_lora_rank"] // 2 + config["qk_rope_head_dim"], line
    assert seen_offsets == {0, heads // 2}


def test_grouped_pca_at_load_is_refused_at_tp2_before_any_worker(tiny_ds_576):
    """pca at load needs every head's weights; a rank holding half the heads cannot form it."""
    with pytest.raises(ValueError, match="splits the heads over the ranks"):
        run_engine(tiny_ds_576, backend="mla_plugin_gla", hf_overrides=gla("grouped", basis="pca"),
                   tensor_parallel_size=2, distributed_executor_backend="mp", max_tokens=1)
