"""`vllm serve --attention-backend mla_plugin`: the path users take."""

import subprocess
import urllib.request

import pytest

from mla_plugin.serving import free_port, post_json, start_server, stop_server, vllm_command, wait_ready
from tests.vllm.engines import PROMPTS, REPO, hf_logprobs

pytestmark = pytest.mark.slow

SERVE_ARGS = ["--attention-backend", "mla_plugin", "--dtype", "float32", "--enforce-eager",
              "--max-model-len", "512"]


def test_serve_completion_matches_transformers(tiny_ds_576, tmp_path):
    trace = tmp_path / "trace.txt"
    server = start_server(
        tiny_ds_576, tmp_path / "server.log", serve_args=SERVE_ARGS,
        env={"MLA_PLUGIN_TRACE_FILE": str(trace), "PYTHONPATH": str(REPO)},
    )
    try:
        wait_ready(server)
        reply = post_json(server.url + "/v1/completions", {
            "model": tiny_ds_576, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0,
            "prompt_logprobs": 0, "logprobs": 0, "return_token_ids": True,
        })
        choice = reply["choices"][0]
        prompt_ids, tokens = choice["prompt_token_ids"], choice["token_ids"]
        assert len(tokens) == 8 and choice["text"]
        ref = hf_logprobs(tiny_ds_576, prompt_ids + tokens)  # row t predicts token t + 1
        served = [choice["prompt_logprobs"][i][str(prompt_ids[i])]["logprob"] for i in range(1, len(prompt_ids))]
        expected = [float(ref[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
        worst = max(abs(a - b) for a, b in zip(served, expected))
        assert worst <= 1e-4, f"prompt logprobs differ from transformers by {worst:.3g}"
        for step, tok in enumerate(tokens):  # greedy = transformers' argmax
            row = ref[len(prompt_ids) - 1 + step]
            assert float(row.max() - row[tok]) <= 1e-4
        # our decode ran in the spawned engine process, not in the API server
        pids = {line.split("pid=")[1].split()[0] for line in trace.read_text().splitlines()}
        assert pids and str(server.proc.pid) not in pids
        assert "Using CPU_MLA backend" not in server.log_path.read_text()
    finally:
        stop_server(server)
    assert server.proc.returncode is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/health", timeout=5)


def test_serve_refuses_model_without_mla(tiny_llama):
    """One clear message and a non-zero exit, quickly: no hang, no silent fallback."""
    proc = subprocess.run(
        [*vllm_command(), "serve", tiny_llama, "--attention-backend", "mla_plugin",
         "--host", "127.0.0.1", "--port", str(free_port())],
        capture_output=True, text=True, timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "needs a model with multi-head latent attention" in output, output[-3000:]
