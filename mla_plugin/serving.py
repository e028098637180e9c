"""Start, query and stop a local `vllm serve` (used by the demo and the tests).

No vLLM import here: the server is a subprocess of the same Python environment.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The `vllm` CLI of this environment (falls back to the module entry point)."""
    cli = Path(sys.executable).parent / "vllm"
    return [str(cli)] if cli.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def start_server(
    model: str, log_path: Path, *, serve_args: list[str] = (), env: dict | None = None
) -> Server:
    """Launch `vllm serve MODEL` on 127.0.0.1, in its own process group."""
    port = free_port()
    cmd = [*vllm_command(), "serve", model, "--host", "127.0.0.1", "--port", str(port), *serve_args]
    full_env = dict(os.environ)
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default start: spawn
    full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    full_env.update(env or {})
    log_path = Path(log_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(proc, port, log_path)


def wait_ready(server: Server, timeout: float = 400, on_tick=None) -> None:
    """Poll /health until it answers 200; raise with the log's tail if the server dies."""
    deadline = time.time() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s:\n{server.log_tail()}")
        if on_tick:
            on_tick()
        time.sleep(1)


def post_json(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def stop_server(server: Server, grace: float = 60) -> None:
    """Stop the server by its PID (SIGTERM, then SIGKILL); then clear its process group."""
    stop_process(server.proc, grace)


def stop_process(proc: subprocess.Popen, grace: float = 60) -> None:
    """SIGTERM ``proc`` (started with start_new_session), SIGKILL it after ``grace`` s; then
    clear its process group (engine-core and worker children, if any survived)."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # engine-core children, if any survived
    except ProcessLookupError:
        pass
