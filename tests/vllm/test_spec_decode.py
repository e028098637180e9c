"""Speculative decoding (ngram, 3 drafts a step) through our vLLM backends (issue 23 item 1).

The builders declare QueryLenSupport.VARLEN, so a verify step's 1 + k query rows per request
are decodes: they run our latent decode (forward_mqa) and none goes to the prefill path.
Evidence, per run: the greedy tokens and their logprobs equal transformers' at 1e-4 (fp32;
speculation must not change them), vLLM's spec-decode counters show accepted drafts, and our
row counters (mla_backend.DECODE_ROWS / PREFILL_ROWS, counted during ``generate``) show that
the decode rows beyond one per request are exactly the drafted tokens in every layer, and that
the prefill path saw the prompts only (no call with cached context). TP 2 workers report the
same through the trace file. The trained tiny fixture's greedy text repeats itself, so the
ngram drafts are often right.
"""

import json
import re

import pytest

from mla_plugin.fixtures import trained_fixture
from tests.vllm.engines import assert_matches_transformers, assert_same_logprobs, run_engines_subprocess
from tests.vllm.helpers import gla, trace_lines, trace_pids
from tests.vllm.spec_runs import NGRAM, rows_trace_file, run_each_in_own_process

MLA, GLA = "MLA_PLUGIN", "MLA_PLUGIN_GLA"
RUNS = {  # name -> (backend, hf_overrides, speculation)
    "mla": ("mla_plugin", None, NGRAM),
    "exact": ("mla_plugin_gla", gla("exact"), NGRAM),
    "grouped": ("mla_plugin_gla", gla("grouped", "local"), NGRAM),
    "grouped_plain": ("mla_plugin_gla", gla("grouped", "local"), None),  # grouped is not MLA: its own reference
}
SPECULATIVE = [name for name, (_, _, spec) in RUNS.items() if spec]
TP2_RUNS = ("mla", "exact")


def model() -> str:
    return str(trained_fixture("deepseek-v2-tiny"))


def num_layers() -> int:
    return json.loads((trained_fixture("deepseek-v2-tiny") / "config.json").read_text())["num_hidden_layers"]


def backend_name(run: str) -> str:
    return MLA if RUNS[run][0] == "mla_plugin" else GLA


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    """Each run at TP 1, in process in a Python of its own (spec_runs.run_each_in_own_process): tokens,
    logprobs, spec-decode counters and our row counts."""
    runs = [dict(model=model(), backend=backend, hf_overrides=overrides, speculative_config=spec)
            for backend, overrides, spec in RUNS.values()]
    return dict(zip(RUNS, run_each_in_own_process(tmp_path_factory.mktemp("spec_tp1"), runs)))


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """mla_plugin and mla_plugin_gla exact with speculation at TP 2, one after the other in one Python
    (each engine's core and workers are fresh spawned processes)."""
    tmp = tmp_path_factory.mktemp("spec_tp2")
    runs = [dict(model=model(), backend=RUNS[name][0], hf_overrides=RUNS[name][1], speculative_config=NGRAM,
                 tensor_parallel_size=2, distributed_executor_backend="mp", trace_file=str(tmp / f"{name}.trace"))
            for name in TP2_RUNS]
    results, log = run_engines_subprocess(tmp, runs, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, timeout=1200,
                                          module="tests.vllm.spec_runs")
    return {name: (result, tmp / f"{name}.trace") for name, result in zip(TP2_RUNS, results)}


@pytest.mark.parametrize("run", ["mla", "exact"])
def test_speculative_output_equals_transformers(tp1, run):
    """Greedy tokens, prompt and decode logprobs as transformers' (which has no speculation)."""
    assert_matches_transformers(tp1[run], model(), atol=1e-4)


def test_grouped_same_with_and_without_speculation(tp1):
    assert_same_logprobs(tp1["grouped"], tp1["grouped_plain"], atol=1e-4)


@pytest.mark.parametrize("run", SPECULATIVE)
def test_drafts_were_accepted(tp1, run):
    metrics = tp1[run]["metrics"]
    assert metrics["vllm:spec_decode_num_drafts"] > 0, metrics
    assert metrics["vllm:spec_decode_num_accepted_tokens"] >= 10, metrics


@pytest.mark.parametrize("run", SPECULATIVE)
def test_every_verify_row_ran_our_decode(tp1, run):
    """Decode rows beyond one per request = drafted tokens, in every layer; prefill saw prompts only."""
    result, name = tp1[run], backend_name(run)
    decode, prefill = result["rows"]["decode"][name], result["rows"]["prefill"][name]
    drafted = result["metrics"]["vllm:spec_decode_num_draft_tokens"]
    assert decode["rows"] - decode["requests"] == num_layers() * drafted, (decode, drafted)
    assert any(int(q) > 1 for q in decode["by_query_len"]), decode
    assert prefill["with_context"] == 0, prefill
    assert prefill["rows"] == num_layers() * sum(len(ids) for ids in result["prompt_ids"]), prefill


def test_without_speculation_one_row_per_request(tp1):
    """The counters can tell: the plain run's decode calls all have one row per request."""
    decode = tp1["grouped_plain"]["rows"]["decode"][GLA]
    assert decode["rows"] == decode["requests"] > 0 and set(decode["by_query_len"]) == {"1"}, decode
    assert tp1["grouped_plain"]["metrics"]["vllm:spec_decode_num_drafts"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("run", TP2_RUNS)
def test_tp2_speculative_output_and_verify_rows(tp2, run):
    result, trace = tp2[run]
    assert_matches_transformers(result, model(), atol=1e-4)
    assert result["metrics"]["vllm:spec_decode_num_accepted_tokens"] >= 10, result["metrics"]
    name = backend_name(run)
    lines = trace_lines(trace)
    assert len(trace_pids(trace)) == 2 and len(lines) == 2, lines  # both ranks ran our decode, one line each
    rows = trace_lines(rows_trace_file(trace))
    multi = [line for line in rows if line.startswith(f"{name} multi-token decode ")]
    assert len({re.search(r"pid=(\d+)", line).group(1) for line in multi}) == 2, rows
    assert all(int(re.search(r"max_query_len=(\d+)", line).group(1)) > 1 for line in multi), multi
    assert not [line for line in rows if "prefill with context" in line], rows


def test_both_builders_take_varlen_decodes():
    from mla_plugin.vllm.compat import QueryLenSupport
    from mla_plugin.vllm.gla_backend import ShardedLatentMetadataBuilder
    from mla_plugin.vllm.mla_backend import MLAPluginMetadataBuilder

    for builder in (MLAPluginMetadataBuilder, ShardedLatentMetadataBuilder):
        assert builder.query_len_support is QueryLenSupport.VARLEN, builder


@pytest.mark.parametrize("offsets,bound,expected", [
    ([0, 1, 5, 6, 8], 4, 4),  # verify rows of 1, 4, 1, 2
    ([0, 1, 2, 3], 4, 1),  # plain decode
    ([0, 3, 9], 4, 4),  # vLLM's bound caps it
    ([0], 4, 4),  # no request: the bound
])
def test_decode_query_bound(offsets, bound, expected):
    import torch

    from mla_plugin.vllm.mla_backend import decode_query_bound

    assert decode_query_bound(torch.tensor(offsets, dtype=torch.int32), bound) == expected
