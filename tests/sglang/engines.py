"""Run the tiny fixtures through SGLang (offline ``sglang.Engine``) in ``.venv-sglang``.

The tests run in ``.venv`` (vLLM's environment); SGLang lives in ``.venv-sglang``. The tests
start this module there, in a subprocess, for several engine runs one after another:

    .venv-sglang/bin/python -m tests.sglang.engines '<json list of run kwargs>' OUT.json

Each run gives prompt ids, prompt logprobs and greedy tokens with their logprobs, in the
layout of ``tests.vllm.engines`` (so the same transformers comparison applies). Our backend
runs in SGLang's scheduler processes (one per TP rank): the proof that it ran is the
``MLA_PLUGIN_TRACE_FILE`` each of them appends to.
"""

import json
import os
import sys
from pathlib import Path

from mla_plugin.sglang.engine import exact_cpu_engine

# The tests' engine: the exact CPU settings with a small pool.
TEST_ENGINE = exact_cpu_engine(max_total_tokens=4096, max_running_requests=8, mem_fraction_static=0.5)


def collect(output: dict, prompt_ids: list[int]) -> dict:
    meta = output["meta_info"]
    prompt = meta["input_token_logprobs"]  # [(logprob, id, text)], the first logprob is None
    assert [row[1] for row in prompt] == prompt_ids, "SGLang tokenised the prompt differently"
    completion = meta["output_token_logprobs"]
    return {
        "prompt_logprobs": [row[0] for row in prompt[1:]],
        "tokens": [row[1] for row in completion],
        "token_logprobs": [row[0] for row in completion],
    }


def run_engine(model: str, prompt_ids: list[list[int]], max_tokens: int = 32, **overrides) -> dict:
    """Prompt logprobs and greedy decode from one ``sglang.Engine`` (started and shut down here)."""
    import sglang

    engine = sglang.Engine(model_path=model, **{**TEST_ENGINE, **overrides})
    try:
        params = {"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": True}
        outputs = engine.generate(
            input_ids=prompt_ids, sampling_params=params, return_logprob=True, logprob_start_len=0,
        )
    finally:
        engine.shutdown()
    result = {"prompt_ids": prompt_ids, "prompt_logprobs": [], "tokens": [], "token_logprobs": []}
    for ids, output in zip(prompt_ids, outputs):
        for key, value in collect(output, ids).items():
            result[key].append(value)
    return result


def run_error(model: str, **overrides) -> dict:
    """The exception an engine start raises (type, message), or none."""
    import sglang

    try:
        engine = sglang.Engine(model_path=model, **{**TEST_ENGINE, **overrides})
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return {"error_type": type(exc).__name__, "error": str(exc)}
    engine.shutdown()
    return {"error_type": None, "error": None}


if __name__ == "__main__":
    runs, out_path = json.loads(sys.argv[1]), sys.argv[2]
    results = []
    for kwargs in runs:
        print(f"=== sglang run {len(results)}: {json.dumps(kwargs)[:300]}", flush=True)
        kind = kwargs.pop("kind", "generate")
        results.append(run_error(**kwargs) if kind == "error" else run_engine(**kwargs))
    Path(out_path).write_text(json.dumps(results))
    os._exit(0)  # SGLang leaves non-daemon threads behind
