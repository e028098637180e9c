"""Prefix caching and chunked prefill through both backends (tests/vllm/cached_context.py runs them).

vLLM's CPU platform turns both off for MLA models on CPUs without AMX tiles and leaves them on
with AMX; with one of our backends selected the user's settings stand (registration.py,
SchedulingChoice), so these tests set both explicitly and run the same code on every CPU.

Each engine: a prompt prefilled over several steps (chunked prefill; later steps read earlier
steps' cache rows), then a prompt sharing four whole blocks with it (a prefix-cache hit, counted
by vLLM's metrics), then the same prompt with the cache read skipped (the caching-off reference).
"""

import pytest

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.vllm.cached_context import BUDGET, LONG, SHARED, run_cached_context
from tests.vllm.engines import hf_logprobs, run_engines_subprocess
from tests.vllm.helpers import gla, trace_pids

ATOL = 1e-4  # fp32 against transformers
FP8_NEAR = 0.25  # an fp8 cache against the fp32 model, largest |logprob diff| (measured 0.118 on this model)


def _reference_diffs(request: dict, model: str) -> float:
    """Largest |logprob - transformers'| over the request's prompt (if scored) and decode."""
    full = request["prompt_ids"] + request["tokens"]
    ref = hf_logprobs(model, full)  # row t predicts token t + 1
    n = len(request["prompt_ids"])
    ours = request.get("prompt_logprobs", []) + request["token_logprobs"]
    positions = range(1, len(full)) if "prompt_logprobs" in request else range(n, len(full))
    refs = [float(ref[t - 1, full[t]]) for t in positions]
    assert len(ours) == len(refs)
    return max(abs(a - b) for a, b in zip(ours, refs))


def _same(a: dict, b: dict) -> float:
    assert a["tokens"] == b["tokens"], "greedy decode diverged"
    return max(abs(x - y) for x, y in zip(a["token_logprobs"], b["token_logprobs"], strict=True))


def check_cached_context(result: dict, reference_model: str | None, atol: float = ATOL) -> None:
    """Settings kept, a real prefix hit, hit == no hit, and (fp32) both == transformers."""
    assert result["in_effect"] == {"prefix_caching": True, "chunked_prefill": True,
                                   "max_num_batched_tokens": BUDGET, "block_size": 16}
    assert len(result["chunked"]["prompt_ids"]) == LONG > BUDGET  # prefilled over several steps
    assert result["hit_tokens"] >= SHARED, f"prefix cache hit {result['hit_tokens']} tokens, expected {SHARED}"
    assert result["no_hit_tokens"] == 0
    assert _same(result["hit"], result["no_hit"]) <= atol
    if reference_model is not None:
        for name in ("chunked", "hit", "no_hit"):
            worst = _reference_diffs(result[name], reference_model)
            assert worst <= atol, f"{name}: max |logprob - transformers| {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def converted(tiny_ds_576, tmp_path_factory):
    """Checkpoints that declare the sharded layout (partitioned, grouped), with a modeling file
    that transformers runs: their own reference."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for softmax, rmsnorm, basis in (("partitioned", "global", "hadamard"), ("grouped", "local", "identity")):
        convert_mla_to_gla(tiny_ds_576, root / softmax, shards=2, softmax=softmax, rmsnorm=rmsnorm, basis=basis,
                           show_progress=False)
        out[softmax] = str(root / softmax)
    return out


def _tp1_cases(tiny_ds_576, converted) -> dict:
    """name -> (run_cached_context kwargs, transformers reference or None, backend whose decode runs)."""
    return {
        "mla": (dict(model=tiny_ds_576, backend="mla_plugin"), tiny_ds_576, "MLA_PLUGIN"),
        "gla-exact": (dict(model=tiny_ds_576, backend="mla_plugin_gla", hf_overrides=gla("exact")), tiny_ds_576,
                      "MLA_PLUGIN_GLA"),
        "gla-partitioned": (dict(model=converted["partitioned"]), converted["partitioned"], "MLA_PLUGIN_GLA"),
        "gla-grouped": (dict(model=converted["grouped"]), converted["grouped"], "MLA_PLUGIN_GLA"),
        "gla-exact-fp8": (dict(model=tiny_ds_576, backend="mla_plugin_gla", hf_overrides=gla("exact"),
                               kv_cache_dtype="fp8"), None, "MLA_PLUGIN_GLA"),
    }


@pytest.mark.parametrize("name", ["mla", "gla-exact", "gla-partitioned", "gla-grouped", "gla-exact-fp8"])
def test_cached_context_tp1(name, tiny_ds_576, converted):
    kwargs, reference, backend = _tp1_cases(tiny_ds_576, converted)[name]
    before = DECODE_CALLS.get(backend, 0)
    result = run_cached_context(**kwargs)
    assert DECODE_CALLS.get(backend, 0) > before, f"{backend} decode did not run"
    check_cached_context(result, reference)
    if reference is None:  # fp8 cache: the quantised context read back stays close to the fp32 model
        assert _reference_diffs(result["hit"], tiny_ds_576) < FP8_NEAR


def test_mla_fp8_cache_on_cpu_runs_without_cached_context(tiny_ds_576):
    """mla_plugin prefills through vLLM's MLA code, whose CPU context gather reads no fp8 cache:
    there vLLM's choice (both off) stands, and the engine serves instead of asserting inside vLLM."""
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    result = run_cached_context(tiny_ds_576, backend="mla_plugin", kv_cache_dtype="fp8",
                                max_num_batched_tokens=256)
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) > before
    assert result["in_effect"]["prefix_caching"] is False and result["in_effect"]["chunked_prefill"] is False
    assert result["hit_tokens"] == 0
    assert _same(result["hit"], result["no_hit"]) <= ATOL
    assert _reference_diffs(result["hit"], tiny_ds_576) < FP8_NEAR


TP2 = ("mla", "gla-exact", "gla-partitioned", "gla-grouped")


@pytest.fixture(scope="module")
def tp2_cached(tiny_ds_576, converted, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cached_tp2")
    cases = _tp1_cases(tiny_ds_576, converted)
    runs = [dict(cases[name][0], tensor_parallel_size=2, distributed_executor_backend="mp",
                 trace_file=str(tmp / f"{name}.trace")) for name in TP2]
    results, log = run_engines_subprocess(tmp, runs, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, timeout=1500,
                                          module="tests.vllm.cached_context")
    return {name: (result, tmp / f"{name}.trace") for name, result in zip(TP2, results)}


@pytest.mark.slow
@pytest.mark.parametrize("name", TP2)
def test_cached_context_tp2(name, tp2_cached, tiny_ds_576, converted):
    result, trace = tp2_cached[name]
    assert len(trace_pids(trace)) == 2, "expected our decode in both TP ranks"
    check_cached_context(result, _tp1_cases(tiny_ds_576, converted)[name][1])
