"""Running SGLang from the tests: it lives in ``.venv-sglang`` (scripts/setup.sh builds it),
the tests run in ``.venv``. Engines and servers start in ``.venv-sglang`` subprocesses; the
transformers reference and the comparisons run here (``tests.vllm.engines``)."""

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
DEEPSEEK = REPO / "mla_plugin" / "fixtures" / "trained" / "deepseek-v2-tiny"  # packaged (the demo's model)
LLAMA = REPO / "tests" / "fixtures" / "trained" / "llama-gqa-tiny"  # a test-only fixture


def sglang_python() -> Path:
    """``.venv-sglang``'s interpreter; a failure (not a skip) when it is missing: CI builds it."""
    if not SGLANG_PYTHON.exists():
        pytest.fail(f"{SGLANG_PYTHON} not found: run `bash scripts/setup.sh` (it builds .venv-sglang, "
                    "the SGLang environment these tests start)")
    return SGLANG_PYTHON


# TP=2 on CPU: SGLang wants each rank's cores named (one NUMA node here).
TP2_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}


def sglang_env(trace_file: Path | None = None, extra: dict | None = None) -> dict:
    """The environment of SGLang's CPU engine, as a user would have it."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for the vLLM tests only
    env.update(SGLANG_USE_CPU_ENGINE="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", **(extra or {}))
    if trace_file is not None:
        env["MLA_PLUGIN_TRACE_FILE"] = str(trace_file)
    return env


def prompt_ids(model: Path = DEEPSEEK) -> list[list[int]]:
    """The vLLM tests' prompts, tokenised with the fixture's tokenizer (SGLang checks it agrees)."""
    from tokenizers import Tokenizer

    from tests.vllm.engines import PROMPTS

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    return [tokenizer.encode(prompt).ids for prompt in PROMPTS]


def run_sglang_engines(tmp_dir: Path, runs: list[dict], trace_file: Path | None = None,
                       timeout: float = 900, env: dict | None = None) -> tuple[list[dict], str]:
    """Several ``tests.sglang.engines`` runs, one after another, in one ``.venv-sglang`` Python."""
    out_file = Path(tmp_dir) / "sglang_results.json"
    proc = subprocess.run(
        [str(sglang_python()), "-m", "tests.sglang.engines", json.dumps(runs), str(out_file)],
        cwd=REPO, env=sglang_env(trace_file, env), capture_output=True, text=True, timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0 or not out_file.exists():
        raise RuntimeError(f"SGLang subprocess failed ({proc.returncode}):\n{log[-6000:]}")
    return json.loads(out_file.read_text()), log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trace_modes(trace_file: Path) -> dict[str, set[str]]:
    """``{pid: {"extend", "decode"}}`` from an MLA_PLUGIN_TRACE_FILE's SGLang lines."""
    import re

    modes: dict[str, set[str]] = {}
    lines = trace_file.read_text().splitlines() if trace_file.exists() else []
    for line in lines:
        match = re.match(r"mla_plugin sglang (extend|decode) pid=(\d+) ", line)
        if match:
            modes.setdefault(match.group(2), set()).add(match.group(1))
    return modes


def trace_by_pid(trace_file: Path) -> dict[str, list[str]]:
    """Trace lines of our SGLang backends, by process, in the order the processes first wrote."""
    import re

    out: dict[str, list[str]] = {}
    for line in trace_file.read_text().splitlines() if trace_file.exists() else []:
        match = re.search(r" sglang (?:extend|decode) pid=(\d+) ", line)
        if match:
            out.setdefault(match.group(1), []).append(line)
    return out
