"""Two vLLM processes acting as two nodes on 127.0.0.1, with vLLM's own multi-node launch
(mp executor: ``--nnodes 2``, ``--node-rank``, ``--master-addr``, ``--master-port``).

Node 0 is an offline ``LLM`` (tests.vllm.engines in a subprocess) that owns the scheduler
and TP rank 0; node 1 is ``vllm serve --headless`` that only runs TP rank 1. Each node
gets its own CPU core (VLLM_CPU_OMP_THREADS_BIND), trace file and log; the two meet over
gloo at the master address. Both are started in their own process groups and always torn
down, on success, failure or timeout.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mla_plugin.serving import free_port, stop_process, vllm_command
from mla_plugin.vllm.engine import exact_cpu_engine
from tests.vllm.engines import REPO, TEST_ENGINE

MASTER_ADDR = "127.0.0.1"


def serve_flags(settings: dict) -> list[str]:
    """`vllm serve` flags for LLM(...) keyword arguments (True -> bare flag, dicts -> JSON)."""
    flags = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is not None and value is not False:
            flags += [flag, json.dumps(value) if isinstance(value, dict | list) else str(value)]
    return flags


def multinode_settings(node_rank: int, port: int, backend: str, hf_overrides: dict | None) -> dict:
    """One node's engine settings: the tests' exact CPU engine, TP=2 over two nodes."""
    return exact_cpu_engine(**TEST_ENGINE, distributed_executor_backend="mp", tensor_parallel_size=2,
                            nnodes=2, node_rank=node_rank, master_addr=MASTER_ADDR, master_port=port,
                            attention_backend=backend, hf_overrides=hf_overrides)


def _node_env(core: str, trace: Path) -> dict:
    env = dict(os.environ)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: engine core in its own process
    env.update({
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        "VLLM_CPU_OMP_THREADS_BIND": core,  # this node's one rank on its own core
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; without it each worker asks for most of RAM
        "VLLM_HOST_IP": MASTER_ADDR,  # message queues between the nodes on loopback
        "MLA_PLUGIN_TRACE_FILE": str(trace),  # one line per process that ran our decode
    })
    return env


def _start(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM the node's main process, SIGKILL it after ``grace``; then clear its group."""
    stop_process(proc, grace)


@dataclass
class NodeRun:
    """One TP=2 engine run across the two nodes."""

    result: dict  # tests.vllm.engines.run_engine's result, from node 0
    node_logs: tuple[str, str]
    node_traces: tuple[list[str], list[str]]
    node_pids: tuple[int, int]  # the two nodes' main processes
    seconds: float


def run_two_nodes(model: str, backend: str, tmp: Path, *, hf_overrides: dict | None = None,
                  max_tokens: int = 32, timeout: float = 240) -> NodeRun:
    """Start node 1 (headless) and node 0 (offline LLM), collect node 0's logprobs, stop both."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    traces = (tmp / "node0.trace", tmp / "node1.trace")
    logs = (tmp / "node0.log", tmp / "node1.log")
    node1_settings = multinode_settings(1, port, backend, hf_overrides)
    node1_cmd = [*vllm_command(), "serve", model, *serve_flags(node1_settings), "--headless"]
    node0_run = dict(multinode_settings(0, port, backend, hf_overrides), model=model, max_tokens=max_tokens)
    node0_run["backend"] = node0_run.pop("attention_backend")
    out_file = tmp / "node0_result.json"
    node0_cmd = [sys.executable, "-m", "tests.vllm.engines", json.dumps([node0_run]), str(out_file)]

    start = time.time()
    node1 = _start(node1_cmd, _node_env("1", traces[1]), logs[1])
    node0 = None
    try:
        node0 = _start(node0_cmd, _node_env("0", traces[0]), logs[0])
        while node0.poll() is None:  # node 0 finishes the run; node 1 serves until stopped
            if node1.poll() is not None:
                raise RuntimeError(f"node 1 exited with {node1.returncode}:\n{_tail(logs[1])}")
            if time.time() - start > timeout:
                raise TimeoutError(f"two-node run not done after {timeout:.0f}s:\n{_tail(logs[0])}\n"
                                   f"--- node 1:\n{_tail(logs[1])}")
            time.sleep(1)
        if node0.returncode != 0:
            raise RuntimeError(f"node 0 exited with {node0.returncode}:\n{_tail(logs[0])}\n"
                               f"--- node 1:\n{_tail(logs[1])}")
        seconds = time.time() - start
    finally:
        for proc in (node0, node1):
            if proc is not None:
                _stop(proc)
    return NodeRun(
        result=json.loads(out_file.read_text())[0],
        node_logs=tuple(p.read_text(errors="replace") for p in logs),
        node_traces=tuple(p.read_text().splitlines() if p.exists() else [] for p in traces),
        node_pids=(node0.pid, node1.pid), seconds=seconds)


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"
