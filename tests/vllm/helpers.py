"""Small helpers the vLLM tests share (kept out of conftest.py, which holds only fixtures)."""

import re
from pathlib import Path


def gla(softmax="exact", rmsnorm="global", basis="identity", shards=2, **extra) -> dict:
    """hf_overrides for the sharded-latent variant."""
    return {"mla_plugin": dict(shards=shards, softmax=softmax, rmsnorm=rmsnorm, basis=basis, **extra)}


# The TP=2 engines of the spawn and GLA tests, run once, one after another in one spawned
# subprocess by the tp2_runs fixture (each spawn-mode start costs about a minute on 2 cores).
TP2_RUNS = {
    "mla_random": dict(model="random", backend="mla_plugin"),
    "exact_random": dict(model="random", backend="mla_plugin_gla", hf_overrides=gla("exact")),
    "partitioned_random": dict(model="random", backend="mla_plugin_gla",
                               hf_overrides=gla("partitioned", "local", "hadamard")),
    "grouped_random": dict(model="random", backend="mla_plugin_gla", hf_overrides=gla("grouped", "local")),
    "exact_trained": dict(model="trained", backend="mla_plugin_gla", hf_overrides=gla("exact")),
}


def trace_lines(trace_file: Path) -> list[str]:
    """Lines of an MLA_PLUGIN_TRACE_FILE: one per process that ran our decode."""
    return trace_file.read_text().splitlines() if trace_file.exists() else []


def trace_pids(trace_file: Path) -> set[str]:
    """The process ids that ran our decode, from an MLA_PLUGIN_TRACE_FILE."""
    return {re.search(r"pid=(\d+)", line).group(1) for line in trace_lines(trace_file)}
