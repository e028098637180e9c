"""`python -m sglang.launch_server --attention-backend mla_plugin`: the path SGLang users take.
The server runs on 127.0.0.1 in ``.venv-sglang`` and is stopped by its PID, also on failure."""

import subprocess
import time
import urllib.request

import pytest

from mla_plugin.serving import Server, post_json, stop_server, wait_ready
from tests.sglang.helpers import DEEPSEEK, LLAMA, free_port, prompt_ids, sglang_env, sglang_python, trace_modes
from tests.vllm.engines import assert_matches_transformers

pytestmark = pytest.mark.slow

SERVER_ARGS = ["--attention-backend", "mla_plugin", "--device", "cpu", "--dtype", "float32",
               "--disable-cuda-graph", "--max-total-tokens", "4096", "--mem-fraction-static", "0.5",
               "--random-seed", "0", "--skip-server-warmup"]


def launch(model, port: int, log_path, trace=None) -> Server:
    cmd = [str(sglang_python()), "-m", "sglang.launch_server", "--model-path", str(model),
           "--host", "127.0.0.1", "--port", str(port), *SERVER_ARGS]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=sglang_env(trace), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Server(proc, port, log_path)


def test_server_generate_matches_transformers(tmp_path):
    trace = tmp_path / "trace.txt"
    server = launch(DEEPSEEK, free_port(), tmp_path / "server.log", trace)
    try:
        wait_ready(server, timeout=600)
        ids = prompt_ids()[:2]
        replies = post_json(server.url + "/generate", {
            "input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True},
        })
        result = {"prompt_ids": ids, "prompt_logprobs": [], "tokens": [], "token_logprobs": []}
        for prompt, reply in zip(ids, replies):
            meta = reply["meta_info"]
            assert [row[1] for row in meta["input_token_logprobs"]] == prompt
            result["prompt_logprobs"].append([row[0] for row in meta["input_token_logprobs"][1:]])
            result["tokens"].append([row[1] for row in meta["output_token_logprobs"]])
            result["token_logprobs"].append([row[0] for row in meta["output_token_logprobs"]])
        assert all(len(tokens) == 32 for tokens in result["tokens"])
        assert_matches_transformers(result, str(DEEPSEEK), atol=1e-4)
        # prefill and decode ran in the server's scheduler process, through our backend
        modes = trace_modes(trace)
        assert list(modes.values()) == [{"extend", "decode"}], modes
        assert str(server.proc.pid) not in modes
    finally:
        stop_server(server)
    assert server.proc.returncode is not None
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/health", timeout=5)


def test_server_refuses_model_without_mla(tmp_path):
    """One clear message and a non-zero exit, quickly: no hang, no silent fallback."""
    server = launch(LLAMA, free_port(), tmp_path / "server.log")
    start = time.monotonic()
    try:
        server.proc.wait(timeout=300)
    finally:
        stop_server(server)
    output = server.log_path.read_text()
    assert server.proc.returncode != 0
    assert "NotAnMLAModelError: --attention-backend mla_plugin needs a model with multi-head latent attention" \
        in output, output[-3000:]
    assert "scheduler died" not in output, "the error must come before any scheduler starts"
    assert time.monotonic() - start < 120
