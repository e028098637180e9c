"""Score one engine both ways (prefill, then decode) and say how many decode rows each process ran.

In this process: ``score_modes(scorer, text, windows, rows_now)``. Several engines in one
fresh Python with vLLM's spawn start (the TP=2 runs), one after another:

    python -m tests.vllm.ppl_runs '<json list of runs>' OUT.json

each run a dict: name, model, backend, hf_overrides, tensor_parallel_size, window,
windows, text_file, work_dir (gets <name>.trace, the MLA_PLUGIN_TRACE_FILE, and
<name>.rows/, the decode probe's per-process row counts).
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from mla_plugin.eval.perplexity import SCORE_MODES, PerplexityScorer

REPO = Path(__file__).resolve().parents[2]


def _minus(after: dict, before: dict) -> dict:
    """{process: {backend: rows}} differences, zero entries dropped."""
    out = {}
    for proc, rows in after.items():
        delta = {b: n - before.get(proc, {}).get(b, 0) for b, n in rows.items()}
        if any(delta.values()):
            out[proc] = {b: n for b, n in delta.items() if n}
    return out


def score_modes(scorer: PerplexityScorer, text: str, windows: int, rows_now, modes=SCORE_MODES) -> dict:
    """score -> {"result": PerplexityResult as a dict, "rows": {process: {backend: decode rows}}}."""
    out = {}
    for score in modes:
        before = rows_now()
        result = scorer.perplexity(text, max_windows=windows, score=score)
        out[score] = {"result": asdict(result), "rows": _minus(rows_now(), before)}
    return out


def _run(spec: dict) -> dict:
    from mla_plugin.vllm.engine import exact_cpu_engine
    from mla_plugin.vllm.reference_tokens import SCORING_HOOK_ENV
    from tests.vllm.decode_probe import DECODE_ROWS_DIR_ENV, SCORING_HOOK, rows_by_process

    work = Path(spec["work_dir"])
    rows_dir = work / f"{spec['name']}.rows"
    rows_dir.mkdir(parents=True)
    # inherited by the engine processes this run spawns
    os.environ["MLA_PLUGIN_TRACE_FILE"] = str(work / f"{spec['name']}.trace")
    os.environ[DECODE_ROWS_DIR_ENV] = str(rows_dir)
    os.environ[SCORING_HOOK_ENV] = SCORING_HOOK
    engine = exact_cpu_engine(tensor_parallel_size=spec["tensor_parallel_size"], distributed_executor_backend="mp")
    text = Path(spec["text_file"]).read_text(encoding="utf-8")
    with PerplexityScorer(spec["model"], engine="vllm", window=spec["window"], dtype="float32", show_progress=False,
                          attention_backend=spec["backend"], hf_overrides=spec.get("hf_overrides"), **engine) as scorer:
        return score_modes(scorer, text, spec["windows"], lambda: rows_by_process(rows_dir))


def run_in_subprocess(runs: list[dict], out_file: Path, env: dict | None = None, timeout: float = 1200) -> list[dict]:
    full_env = dict(os.environ)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: engine core in its own process
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "tests.vllm.ppl_runs", json.dumps(runs), str(out_file)],
                          cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"ppl subprocess failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return json.loads(Path(out_file).read_text())


if __name__ == "__main__":
    runs, out_path = json.loads(sys.argv[1]), sys.argv[2]
    results = []
    for spec in runs:
        print(f"=== ppl run {spec['name']}", flush=True)
        results.append(_run(spec))
    Path(out_path).write_text(json.dumps(results))
