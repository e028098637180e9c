"""Run tiny models through vLLM (in this process, or in a subprocess with vLLM's
default spawn start) and through transformers, and compare logprobs.

Subprocess use:  python -m tests.vllm.engines '<json list of run_engine kwargs>' OUT.json
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

from mla_plugin.vllm.engine import exact_cpu_engine, release_engine

REPO = Path(__file__).resolve().parents[2]

PROMPTS = [
    "The tower is 324 metres tall , about the same height as an 81 @-@ storey building",
    "Hello",
    "In 1990 the band released their second album , which",
    # long enough to span several 16-token blocks
    " = Robert Boulter = \n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . This was "
    "followed by a starring role in the play Herons written by Simon Stephens , which was "
    "performed in 2001 at the Royal Court Theatre .",
]

# The tests' engine, on top of the exact CPU settings (mla_plugin.vllm.engine): fp32, small, seeded.
# No block size: vLLM's CPU attention for non-MLA models takes multiples of 32 only, CPU_MLA 16 only;
# tests that depend on one name it (vLLM picks 16 or 128 for MLA by the CPU's AMX tiles otherwise).
TEST_ENGINE = dict(dtype="float32", max_model_len=512, max_num_seqs=8, seed=0)


def _collect(outputs) -> dict:
    result = {"prompt_ids": [], "prompt_logprobs": [], "tokens": [], "token_logprobs": []}
    for out in outputs:
        ids = list(out.prompt_token_ids)
        result["prompt_ids"].append(ids)
        result["prompt_logprobs"].append(
            [out.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]
        )
        completion = out.outputs[0]
        result["tokens"].append(list(completion.token_ids))
        result["token_logprobs"].append(
            [step[tok].logprob for step, tok in zip(completion.logprobs, completion.token_ids)]
        )
    return result


def run_engine(
    model: str,
    backend: str | None = None,
    prompts: list[str] | None = None,
    max_tokens: int = 32,
    **engine_overrides,
) -> dict:
    """Prompt logprobs and greedy decode (token ids and their logprobs) from vLLM."""
    from vllm import LLM, SamplingParams

    trace_file = engine_overrides.pop("trace_file", None)
    if trace_file is not None:  # inherited by the processes this engine spawns
        os.environ["MLA_PLUGIN_TRACE_FILE"] = str(trace_file)
    kwargs = exact_cpu_engine(**{**TEST_ENGINE, **engine_overrides})
    llm = LLM(model, attention_backend=backend, **kwargs)
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True
        )
        return _collect(llm.generate(prompts or PROMPTS, params, use_tqdm=False))
    finally:
        del llm
        release_engine()


def run_engines_subprocess(
    tmp_dir: Path, runs: list[dict], env: dict | None = None, timeout: float = 900,
    module: str = "tests.vllm.engines",
) -> tuple[list[dict], str]:
    """Several run_engine calls (or ``module``'s own runner: its ``__main__`` takes the same
    arguments), one after another, in one fresh Python (spawn start)."""
    out_file = Path(tmp_dir) / "engine_results.json"
    full_env = dict(os.environ)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(runs), str(out_file)],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"engine subprocess failed ({proc.returncode}):\n{log[-6000:]}")
    return json.loads(out_file.read_text()), log


@functools.lru_cache(maxsize=4)
def _hf_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(path) / "config.json").read_text())
    remote = "auto_map" in config  # checkpoints from `mla-plugin convert gqa-to-mla`
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=remote).eval()


def hf_logprobs(model_path: str, ids: list[int]):
    """transformers' log-softmax over the vocabulary at every position: [len(ids), V]."""
    import torch

    with torch.no_grad():
        logits = _hf_model(str(model_path))(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def assert_matches_transformers(result: dict, model_path: str, atol: float = 1e-4) -> None:
    """Prompt logprobs, decode logprobs and greedy choices agree with transformers."""
    for i, prompt_ids in enumerate(result["prompt_ids"]):
        tokens = result["tokens"][i]
        full = prompt_ids + tokens
        ref = hf_logprobs(model_path, full)  # row t predicts token t + 1
        positions = range(1, len(full))
        ref_chosen = [float(ref[t - 1, full[t]]) for t in positions]
        ours = result["prompt_logprobs"][i] + result["token_logprobs"][i]
        assert len(ours) == len(ref_chosen)
        worst = max(abs(a - b) for a, b in zip(ours, ref_chosen))
        assert worst <= atol, f"prompt {i}: max |logprob diff| {worst:.3g} > {atol}"
        # every greedy step picked transformers' argmax (up to a tie within atol)
        for step, tok in enumerate(tokens):
            row = ref[len(prompt_ids) - 1 + step]
            assert float(row.max() - row[tok]) <= atol, f"prompt {i} step {step}: not greedy"


def max_diff_from_transformers(result: dict, model_path: str) -> float:
    """Max |logprob - transformers' logprob| over every prompt and generated token of ``result``,
    transformers scoring the very token sequence the engine produced (lengths checked equal)."""
    worst = 0.0
    for i, prompt in enumerate(result["prompt_ids"]):
        full = prompt + result["tokens"][i]
        ours = result["prompt_logprobs"][i] + result["token_logprobs"][i]  # entry t - 1 scores token t
        assert len(ours) == len(full) - 1, (len(ours), len(full))
        ref = hf_logprobs(model_path, full)  # [len(full), V]: row t - 1 predicts token t
        worst = max(worst, max(abs(a - float(ref[t - 1, full[t]])) for t, a in enumerate(ours, start=1)))
    return worst


def assert_same_logprobs(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a["prompt_ids"] == b["prompt_ids"]
    assert a["tokens"] == b["tokens"], "greedy decode diverged"
    for key in ("prompt_logprobs", "token_logprobs"):
        worst = max(
            abs(x - y) for ra, rb in zip(a[key], b[key]) for x, y in zip(ra, rb, strict=True)
        )
        assert worst <= atol, f"{key}: max diff {worst:.3g} > {atol}"


def logprob_spread(result: dict) -> float:
    """Range of all logprobs: a comparison at 1e-4 only means something if this is large."""
    values = [x for row in result["prompt_logprobs"] + result["token_logprobs"] for x in row]
    return max(values) - min(values)


def run_from_command_line(runner) -> None:
    """``python -m MODULE '<json list of runner kwargs>' OUT.json``: each run in turn, results to OUT.json
    (what run_engines_subprocess starts; the log marks each run with "=== engine run N")."""
    runs, out_path = json.loads(sys.argv[1]), sys.argv[2]
    results = []
    for kwargs in runs:
        print(f"=== engine run {len(results)}: {json.dumps(kwargs)}", flush=True)
        results.append(runner(**kwargs))
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    run_from_command_line(run_engine)
