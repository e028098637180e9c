"""`vllm serve` under load: many concurrent completions, each equal to the same prompt sent alone.

One server per test (each start is about a minute on 2 cores): the trained tiny DeepSeek-V2,
fp32 and the exact CPU settings (mla_plugin.vllm.engine.EXACT_CPU_ENGINE), on 127.0.0.1.
N distinct prompts (fresh random windows of wikitext-2, bounded random max_tokens) are sent
at once from N client threads, then each again alone, one after another; every greedy
completion must come back (HTTP 200, finished by itself) with the same tokens both ways.
The trace file proves the plugin's decode ran in the engine process(es), and the server
and its engine and worker processes are gone after the test.
"""

import concurrent.futures
import contextlib
import json
import random
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from mla_plugin.fixtures import trained_fixture
from mla_plugin.serving import start_server, stop_server, wait_ready
from tests.paths import wikitext_file
from tests.vllm.engines import REPO
from tests.vllm.helpers import trace_lines, trace_pids

pytestmark = pytest.mark.slow

MODEL_NAME = "tiny-ds"
EXACT_SERVE_ARGS = [  # EXACT_CPU_ENGINE as `vllm serve` flags, fp32
    "--served-model-name", MODEL_NAME, "--dtype", "float32", "--enforce-eager",
    "--compilation-config", json.dumps({"custom_ops": ["none"]}), "--max-model-len", "512",
]
MAX_TOKENS = (16, 24)  # each request's max_tokens is drawn from this range
CLIENT_TIMEOUT = 240  # seconds, per request: nothing hangs


def random_prompts(seed: int, count: int) -> list[str]:
    """``count`` distinct windows of 4-60 words from the wikitext-2 test text."""
    words = wikitext_file("test.raw.txt").read_text(encoding="utf-8").split()
    rnd = random.Random(seed)
    prompts: list[str] = []
    while len(prompts) < count:
        start, length = rnd.randrange(len(words) - 60), rnd.randint(4, 60)
        prompt = " ".join(words[start:start + length])
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts


def complete(url: str, prompt: str, max_tokens: int) -> tuple[int, dict | str]:
    """(HTTP status, reply JSON or error body) of one greedy completion."""
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def running_requests(url: str) -> float:
    """vLLM's gauge of requests in the running batch (vllm:num_requests_running)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.eE+-]+)$", text, re.M)
    return sum(float(v) for v in values)


def send_concurrently(url: str, prompts: list[str], max_tokens: list[int]) -> tuple[list, float]:
    """All requests at once from one thread each; also the most requests seen running together."""
    peak, done = [0.0], threading.Event()

    def watch():
        while not done.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], running_requests(url))
            time.sleep(0.05)

    start = threading.Barrier(len(prompts))

    def one(i):
        start.wait(timeout=60)
        return complete(url, prompts[i], max_tokens[i])

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(one, i) for i in range(len(prompts))]
            replies = [f.result(timeout=CLIENT_TIMEOUT + 60) for f in futures]
    finally:
        done.set()
        watcher.join(timeout=15)
    return replies, peak[0]


def check_reply(reply: tuple[int, dict | str], max_tokens: int) -> dict:
    status, body = reply
    assert status == 200, f"HTTP {status}: {body}"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("length", "stop"), choice
    assert 1 <= len(choice["token_ids"]) <= max_tokens, choice
    if choice["finish_reason"] == "length":
        assert len(choice["token_ids"]) == max_tokens, choice
    return choice


def process_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, process group) of a process, None when there is no such process."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
    except (OSError, IndexError):
        return None
    return rest[0], int(rest[2])  # fields: state, ppid, pgrp


def alive(pid: int | str) -> bool:
    """Running or sleeping; a zombie is dead (this machine's init does not reap orphans)."""
    stat = process_stat(pid)
    return stat is not None and stat[0] not in "ZX"


def live_group_members(pgid: int, wait: float = 15) -> list[str]:
    """The processes of a group still alive after up to ``wait`` seconds (a SIGKILL takes a moment)."""
    deadline = time.monotonic() + wait
    while True:
        members = []
        for proc in Path("/proc").iterdir():
            stat = process_stat(proc.name) if proc.name.isdigit() else None
            if stat is not None and stat[1] == pgid and alive(proc.name):
                with contextlib.suppress(OSError):
                    members.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:200]!r}")
        if not members or time.monotonic() > deadline:
            return members
        time.sleep(0.5)


@contextlib.contextmanager
def serving(tmp_path: Path, serve_args: list[str], env: dict):
    """A `vllm serve` of the trained fixture, stopped by PID when the block ends, whatever happens."""
    server = start_server(str(trained_fixture("deepseek-v2-tiny")), tmp_path / "server.log",
                          serve_args=[*EXACT_SERVE_ARGS, *serve_args],
                          env={"PYTHONPATH": str(REPO), **env})
    try:
        wait_ready(server)
        yield server
    finally:
        stop_server(server)


def run_load(tmp_path, rng, count, serve_args, env, backend_trace, ranks, cache_width):
    timings = {}
    trace = tmp_path / "trace.txt"
    rnd = random.Random(int(torch.randint(2**31, (1,), generator=rng)))  # the test's seed
    prompts = random_prompts(rnd.randrange(2**31), count)
    max_tokens = [rnd.randint(*MAX_TOKENS) for _ in prompts]
    t0 = time.monotonic()
    with serving(tmp_path, serve_args, {"MLA_PLUGIN_TRACE_FILE": str(trace), **env}) as server:
        timings["start"] = time.monotonic() - t0
        traced_at_start = trace_lines(trace)
        t1 = time.monotonic()
        together, peak = send_concurrently(server.url, prompts, max_tokens)
        timings["concurrent"] = time.monotonic() - t1
        traced_by_burst = trace_lines(trace)
        t2 = time.monotonic()
        alone = [complete(server.url, p, m) for p, m in zip(prompts, max_tokens)]
        timings["alone"] = time.monotonic() - t2
        log = server.log_path.read_text(errors="replace")
        engine_pids = trace_pids(trace)
    timings["total"] = time.monotonic() - t0
    print(f"\n{count} prompts: start {timings['start']:.0f}s, concurrent {timings['concurrent']:.1f}s, "
          f"alone {timings['alone']:.1f}s, peak running {peak:.0f}, total {timings['total']:.0f}s")

    # every request answered, finished by itself, both ways
    together = [check_reply(r, m) for r, m in zip(together, max_tokens)]
    alone = [check_reply(r, m) for r, m in zip(alone, max_tokens)]
    # the requests really ran as one batch (vLLM's running-requests gauge)
    assert peak >= count // 2, f"at most {peak:.0f} of {count} requests ran together"
    # and the model's answers depend on the prompt (equality below is not one repeated answer)
    distinct = len({tuple(c["token_ids"]) for c in together})
    stopped = sum(c["finish_reason"] == "stop" for c in together)
    print(f"{distinct} distinct completions, {stopped} stopped at EOS, {count - stopped} at max_tokens")
    assert distinct >= count // 2, f"only {distinct} distinct completions of {count} prompts"
    differ = [
        f"  {p!r}\n    together: {t['token_ids']} {t['text']!r}\n    alone:    {a['token_ids']} {a['text']!r}"
        for p, t, a in zip(prompts, together, alone)
        if (t["token_ids"], t["text"], t["finish_reason"]) != (a["token_ids"], a["text"], a["finish_reason"])
    ]
    assert not differ, f"{len(differ)} of {count} greedy completions differ from the same prompt alone:\n" + \
        "\n".join(differ)

    # the plugin's decode ran first in the concurrent burst (none at start-up), in the engine
    # process (both TP ranks), not in the API server, with the cache width of the backend
    assert not traced_at_start, f"a decode ran before the load; cannot tell who served it: {traced_at_start}"
    lines = trace_lines(trace)
    assert traced_by_burst == lines and len(lines) == ranks, (traced_by_burst, lines)
    assert all(line.startswith(backend_trace + " ") and f", {cache_width}]" in line for line in lines), lines
    assert len(engine_pids) == ranks and str(server.proc.pid) not in engine_pids, lines
    assert "Using CPU_MLA backend" not in log
    # stopped: the server, its engine core and TP workers are gone
    assert server.proc.returncode is not None
    assert not [pid for pid in engine_pids if alive(pid)], engine_pids
    left = live_group_members(server.proc.pid)
    assert not left, f"processes of the stopped server still alive: {left}"


def test_64_concurrent_completions_equal_alone_mla_plugin(tmp_path, rng):
    run_load(tmp_path, rng, 64, ["--attention-backend", "mla_plugin"], {},
             backend_trace="MLA_PLUGIN", ranks=1, cache_width=512 + 64)


def test_32_concurrent_completions_equal_alone_gla_tp2(tmp_path, rng):
    run_load(tmp_path, rng, 32,
             ["--attention-backend", "mla_plugin_gla", "--tensor-parallel-size", "2",
              "--hf-overrides", json.dumps({"mla_plugin": {"softmax": "exact"}})],
             {"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
             backend_trace="MLA_PLUGIN_GLA", ranks=2, cache_width=512 // 2 + 64)  # d_c/2 + d_R per rank
