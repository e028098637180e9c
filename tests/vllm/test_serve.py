"""`vllm serve --attention-backend mla_plugin`: the path users take."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.vllm.engines import PROMPTS, REPO, hf_logprobs

pytestmark = pytest.mark.slow

VLLM_CLI = str(Path(sys.executable).parent / "vllm")
START_TIMEOUT = 400


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: spawn
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server by its PID; then make sure nothing of its group is left."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # engine-core children, if any survived
    except ProcessLookupError:
        pass


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def test_serve_completion_matches_transformers(tiny_ds_576, tmp_path):
    port = _free_port()
    trace = tmp_path / "trace.txt"
    log_path = tmp_path / "server.log"
    cmd = [
        VLLM_CLI, "serve", tiny_ds_576, "--attention-backend", "mla_plugin",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=_env(MLA_PLUGIN_TRACE_FILE=str(trace)), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + START_TIMEOUT
        while True:
            assert proc.poll() is None, f"server exited:\n{log_path.read_text()[-5000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"server not up in {START_TIMEOUT}s:\n{log_path.read_text()[-5000:]}"
            time.sleep(2)

        reply = _post(f"http://127.0.0.1:{port}/v1/completions", {
            "model": tiny_ds_576, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
            "prompt_logprobs": 0, "logprobs": 0, "return_token_ids": True,
        })
        choice = reply["choices"][0]
        prompt_ids = choice["prompt_token_ids"] if "prompt_token_ids" in choice else reply["prompt_token_ids"]
        assert len(choice["token_ids"]) == 8
        ref = hf_logprobs(tiny_ds_576, prompt_ids + choice["token_ids"])
        served = [choice["prompt_logprobs"][i][str(prompt_ids[i])]["logprob"] for i in range(1, len(prompt_ids))]
        expected = [float(ref[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
        worst = max(abs(a - b) for a, b in zip(served, expected))
        assert worst <= 1e-4, f"prompt logprobs differ from transformers by {worst:.3g}"
        # greedy completion = transformers' argmax at each step
        full = prompt_ids + choice["token_ids"]
        for step, tok in enumerate(choice["token_ids"]):
            row = ref[len(prompt_ids) - 1 + step]
            assert float(row.max() - row[tok]) <= 1e-4
        assert choice["text"] and isinstance(choice["text"], str)
        # our decode ran in the engine process, not in the API server
        pids = {line.split("pid=")[1].split()[0] for line in trace.read_text().splitlines()}
        assert pids and str(proc.pid) not in pids
        assert "Using CPU_MLA backend" not in log_path.read_text()
        assert full  # keep the full sequence for failure messages
    finally:
        _stop(proc)
    assert proc.returncode is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_serve_refuses_model_without_mla(tiny_llama):
    """One clear message and a non-zero exit, quickly: no hang, no silent fallback."""
    proc = subprocess.run(
        [VLLM_CLI, "serve", tiny_llama, "--attention-backend", "mla_plugin",
         "--host", "127.0.0.1", "--port", str(_free_port())],
        env=_env(), capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "needs a model with multi-head latent attention" in output, output[-3000:]
