"""The sharded-latent (GLA-style) TP variant, MLA_PLUGIN_GLA, inside vLLM on CPU."""

import re

import pytest

from mla_plugin.fixtures import trained_fixture
from tests.vllm.engines import assert_same_logprobs, run_engine
from tests.vllm.helpers import TP2_RUNS, gla, trace_lines, trace_pids


def max_diff(a: dict, b: dict) -> float:
    return max(abs(x - y) for key in ("prompt_logprobs",)
               for ra, rb in zip(a[key], b[key]) for x, y in zip(ra, rb))


@pytest.fixture(scope="module")
def mla_trained():
    return run_engine(str(trained_fixture("deepseek-v2-tiny")), backend="mla_plugin")


@pytest.fixture(scope="module")
def tp1_runs(tiny_ds_576):
    """The TP=1 counterparts of TP2_RUNS (all g = 2 slices on one rank)."""
    models = {"random": tiny_ds_576, "trained": str(trained_fixture("deepseek-v2-tiny"))}
    return {name: run_engine(models[spec["model"]], backend=spec["backend"],
                             hf_overrides=spec.get("hf_overrides"))
            for name, spec in TP2_RUNS.items() if name != "mla_random"}


def test_exact_equals_mla_at_tp1(tp1_runs, ours_576, mla_trained):
    assert_same_logprobs(tp1_runs["exact_random"], ours_576, atol=1e-4)
    assert_same_logprobs(tp1_runs["exact_trained"], mla_trained, atol=1e-4)


@pytest.mark.slow
def test_exact_at_tp2_equals_mla_at_tp1(tp2_runs, ours_576, mla_trained):
    assert_same_logprobs(tp2_runs["exact_random"][0], ours_576, atol=1e-4)
    assert_same_logprobs(tp2_runs["exact_trained"][0], mla_trained, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["exact_random", "partitioned_random", "grouped_random", "exact_trained"])
def test_every_mode_same_at_tp1_and_tp2(tp1_runs, tp2_runs, name):
    assert_same_logprobs(tp2_runs[name][0], tp1_runs[name], atol=1e-4)


def test_approximate_modes_really_differ(tp1_runs, ours_576):
    """Partitioned and grouped are other functions than MLA: the modes are not no-ops."""
    assert max_diff(tp1_runs["partitioned_random"], ours_576) > 1e-3
    assert max_diff(tp1_runs["grouped_random"], ours_576) > 1e-3


@pytest.mark.slow
def test_cache_per_rank_shrinks(tp2_runs):
    _, gla_log, gla_trace = tp2_runs["exact_random"]
    _, mla_log, _ = tp2_runs["mla_random"]
    lines = trace_lines(gla_trace)
    assert len(trace_pids(gla_trace)) == 2 and all(line.startswith("MLA_PLUGIN_GLA ") for line in lines)
    for line in lines:  # each rank's cache: [blocks, block_size, d_c / 2 + d_R]
        assert re.search(r"cache=\[\d+, \d+, (\d+)\]", line).group(1) == str(512 // 2 + 64), line
    capacity = {}
    for label, log in (("mla", mla_log), ("gla", gla_log)):
        found = re.findall(r"KV cache size: ([\d,]+) tokens", log)
        assert found, f"no KV capacity line in the {label} run"
        capacity[label] = int(found[-1].replace(",", ""))
    assert capacity["gla"] >= 1.75 * capacity["mla"], capacity


@pytest.mark.parametrize("overrides,message", [
    (gla(shards=3), "not divisible by mla_plugin.shards=3"),
    (gla("grouped", shards=8), "heads divisible by shards=8"),
    ({"mla_plugin": {"softmx": "exact"}}, "unknown mla_plugin option"),
    (gla("fast"), "softmax must be one of"),
    (gla(basis="random"), "basis must be one of"),
    (gla(logit_scale=-1.0), "logit_scale must be a positive number"),
])
def test_bad_options_are_clear_errors(tiny_ds_576, overrides, message):
    with pytest.raises(ValueError, match=message):
        run_engine(tiny_ds_576, backend="mla_plugin_gla", hf_overrides=overrides, max_tokens=1)


def test_gla_refuses_model_without_mla(tiny_llama):
    with pytest.raises(ValueError, match="needs a model with multi-head latent attention"):
        run_engine(tiny_llama, backend="mla_plugin_gla", max_tokens=1)


def test_declared_layout_needs_no_flags(tiny_ds_576, ours_576, tmp_path):
    """A checkpoint whose config.json declares the sharded layout is served as such."""
    import json
    import shutil

    from mla_plugin.vllm.mla_backend import DECODE_CALLS

    model = tmp_path / "declared"
    shutil.copytree(tiny_ds_576, model)
    config = json.loads((model / "config.json").read_text())
    config["mla_plugin"] = {"layout": "sharded_latent", "shards": 2, "softmax": "exact"}
    (model / "config.json").write_text(json.dumps(config))
    before = DECODE_CALLS.get("MLA_PLUGIN_GLA", 0)
    result = run_engine(str(model))  # no attention_backend, no hf_overrides
    assert DECODE_CALLS.get("MLA_PLUGIN_GLA", 0) > before
    assert_same_logprobs(result, ours_576, atol=1e-4)
