"""Engines with speculative decoding, for tests/vllm/test_spec_decode.py and test_mtp.py.

Each run returns what engines.run_engine returns (prompt and decode logprobs, greedy tokens)
plus vLLM's spec-decode counters (``llm.get_metrics()``, stats logging on) and, for an
in-process engine, the query rows our backends counted during ``generate``
(mla_backend.DECODE_ROWS / PREFILL_ROWS; TP workers report through the trace file).

Subprocess use:  python -m tests.vllm.spec_runs '<json list of run_spec_engine kwargs>' OUT.json
"""

import os
from pathlib import Path

from mla_plugin.vllm.engine import exact_cpu_engine, release_engine
from tests.vllm.engines import TEST_ENGINE, _collect, run_engines_subprocess, run_from_command_line

# ngram speculation: up to 3 drafts per step, looked up from 1- to 4-grams of the prompt
# and the output so far (the trained fixture's greedy text repeats, so drafts are accepted).
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 1}

SPEC_PROMPTS = [
    "the cat sat on the mat . the cat sat on the mat . the cat sat on the",
    "Hello",
    "In 1990 the band released their second album , which",
]

SPEC_METRICS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                "vllm:spec_decode_num_accepted_tokens")


def spec_metrics(llm) -> dict:
    """vLLM's spec-decode counters (zero where speculation is off)."""
    found = {name: 0 for name in SPEC_METRICS}
    for metric in llm.get_metrics():
        if metric.name in found:
            found[metric.name] = int(metric.value)
    return found


def _rows_snapshot() -> dict:
    from mla_plugin.vllm.mla_backend import DECODE_ROWS, PREFILL_ROWS

    def plain(rows) -> dict:
        return dict(calls=rows.calls, requests=rows.requests, rows=rows.rows, with_context=rows.with_context,
                    by_query_len=dict(rows.by_query_len), layers=sorted(rows.layers))

    return {kind: {name: plain(rows) for name, rows in table.items()}
            for kind, table in (("decode", DECODE_ROWS), ("prefill", PREFILL_ROWS))}


def _rows_delta(before: dict, after: dict) -> dict:
    """Per kind and backend: calls, requests, rows, with_context and calls by query length during generate."""
    delta = {}
    for kind, table in after.items():
        delta[kind] = {}
        for name, rows in table.items():
            old = before[kind].get(name, {"calls": 0, "requests": 0, "rows": 0, "with_context": 0, "by_query_len": {}})
            by_len = {str(k): v - old["by_query_len"].get(k, 0) for k, v in rows["by_query_len"].items()}
            delta[kind][name] = {key: rows[key] - old[key] for key in ("calls", "requests", "rows", "with_context")}
            delta[kind][name]["by_query_len"] = {k: v for k, v in by_len.items() if v}
            delta[kind][name]["layers"] = rows["layers"]  # every layer seen in this process
    return delta


def rows_trace_file(trace_file) -> Path:
    """Where the engine's processes note their first multi-row decode and prefill with context."""
    return Path(str(trace_file) + ".rows")


def run_spec_engine(model: str, backend: str | None = None, speculative_config: dict | None = None,
                    prompts: list[str] | None = None, max_tokens: int = 40, **engine_overrides) -> dict:
    """Greedy decode with logprobs, the spec-decode counters, and our query rows during generate."""
    from vllm import LLM, SamplingParams

    trace_file = engine_overrides.pop("trace_file", None)
    if trace_file is not None:  # inherited by the processes this engine spawns; query rows beside it
        os.environ["MLA_PLUGIN_TRACE_FILE"] = str(trace_file)
        os.environ["MLA_PLUGIN_ROWS_TRACE_FILE"] = str(rows_trace_file(trace_file))
    kwargs = exact_cpu_engine(**{**TEST_ENGINE, **engine_overrides})
    llm = LLM(model, attention_backend=backend, speculative_config=speculative_config, disable_log_stats=False,
              **kwargs)
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
        before = _rows_snapshot()
        result = _collect(llm.generate(prompts or SPEC_PROMPTS, params, use_tqdm=False))
        result["rows"] = _rows_delta(before, _rows_snapshot())
        result["metrics"] = spec_metrics(llm)
        return result
    finally:
        del llm
        release_engine()


def run_each_in_own_process(tmp_dir: Path, runs: list[dict], timeout: float = 900) -> list[dict]:
    """Each run_spec_engine call in process in a fresh Python of its own (VLLM_ENABLE_V1_MULTIPROCESSING=0,
    so our counters come back). One engine per process: with ngram speculation, vLLM 0.32's
    model runner imports numba (ngram_proposer), and the next engine's CPU worker in that
    process, rebinding its Triton kernels over every loaded module, fails on llvmlite's ``lib``
    object (AttributeError: '_lib_fn_wrapper' object has no attribute 'get')."""
    results = []
    for i, run in enumerate(runs):
        folder = Path(tmp_dir) / f"run{i}"
        folder.mkdir(parents=True, exist_ok=True)
        found, _ = run_engines_subprocess(folder, [run], env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                                          timeout=timeout, module="tests.vllm.spec_runs")
        results += found
    return results


if __name__ == "__main__":
    run_from_command_line(run_spec_engine)
