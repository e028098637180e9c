"""Both backends inside the vLLM CPU engine through the Triton kernels (Triton's interpreter).

``MLA_PLUGIN_KERNEL=triton`` with ``TRITON_INTERPRET=1`` runs the very kernels a GPU runs,
interpreted on CPU tensors. The trained fixture's prompt logprobs and 32 greedy decode steps
must match transformers within 1e-4 (fp32) for ``mla_plugin`` and ``mla_plugin_gla`` exact
(TP=1 in this process, TP=2 in spawned workers: the partial-logits kernel and the
all-reduce), and the partitioned mode must match its plain-torch run. Proof that the Triton
path ran: the seam's per-kernel counter in this process (counted after the kernels were
launched), and at TP=2 the kernel trace (``ops/trace.KERNEL_TRACE_ENV``), which each worker
writes after its Triton kernels were launched: every worker that ran our backend launched
them, and none ran the torch code.
"""

import json
import os
from pathlib import Path

import pytest

from mla_plugin.fixtures import trained_fixture
from mla_plugin.ops.kernel_choice import KERNEL_CALLS
from mla_plugin.ops.trace import KERNEL_TRACE_ENV
from tests.vllm.engines import assert_matches_transformers, assert_same_logprobs, run_engine, run_engines_subprocess
from tests.vllm.helpers import TP2_RUNS, gla, trace_lines, trace_pids

TRITON_ENV = {"MLA_PLUGIN_KERNEL": "triton", "TRITON_INTERPRET": "1"}
TRAINED = str(trained_fixture("deepseek-v2-tiny"))
PARTITIONED = gla("partitioned", "local", "hadamard")  # as TP2_RUNS["partitioned_random"]


def min_triton_calls(model: str) -> int:
    """Every layer's decode for 31 of the 32 generated tokens (the first comes from the prefill)."""
    return json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"] * 31


@pytest.fixture(scope="module")
def triton_tp1(tiny_ds_576):
    """TP=1 engines in this process with the Triton kernels; name -> (result, kernel calls).

    tests/conftest.py has set TRITON_INTERPRET=1 before triton was first imported."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    saved = os.environ.get("MLA_PLUGIN_KERNEL")
    os.environ["MLA_PLUGIN_KERNEL"] = "triton"
    try:
        runs = {
            "mla": dict(model=TRAINED, backend="mla_plugin"),
            "exact": dict(model=TRAINED, backend="mla_plugin_gla", hf_overrides=gla("exact")),
            "partitioned": dict(model=tiny_ds_576, backend="mla_plugin_gla", hf_overrides=PARTITIONED),
        }
        results = {}
        for name, kwargs in runs.items():
            before = dict(KERNEL_CALLS)
            result = run_engine(**kwargs)
            calls = {k: KERNEL_CALLS[k] - before.get(k, 0) for k in ("triton", "torch")}
            results[name] = (result, calls, min_triton_calls(kwargs["model"]))
        return results
    finally:
        if saved is None:
            os.environ.pop("MLA_PLUGIN_KERNEL", None)
        else:
            os.environ["MLA_PLUGIN_KERNEL"] = saved


@pytest.fixture(scope="module")
def triton_tp2(tiny_ds_576, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("triton_tp2")
    runs = {
        "exact": dict(model=TRAINED, backend="mla_plugin_gla", hf_overrides=gla("exact")),
        "partitioned": dict(model=tiny_ds_576, backend="mla_plugin_gla", hf_overrides=PARTITIONED),
    }
    specs = [dict(spec, tensor_parallel_size=2, distributed_executor_backend="mp", trace_file=str(tmp / f"{name}.trace"))
             for name, spec in runs.items()]
    kernels = tmp / "kernels.trace"
    env = {**TRITON_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1", KERNEL_TRACE_ENV: str(kernels)}
    results, _ = run_engines_subprocess(tmp, specs, env=env, timeout=1500)
    return {name: (result, tmp / f"{name}.trace") for name, result in zip(runs, results)}, kernels


def kernels_by_pid(kernel_trace: Path) -> dict[str, set[str]]:
    """pid -> the seam implementations that process launched (``kernel-ran <kernel> pid=<pid>`` lines)."""
    launched: dict[str, set[str]] = {}
    for line in trace_lines(kernel_trace):
        _, kernel, pid = line.split()
        launched.setdefault(pid.removeprefix("pid="), set()).add(kernel)
    return launched


@pytest.mark.parametrize("name", ["mla", "exact"])
def test_tp1_matches_transformers_through_triton(triton_tp1, name):
    result, calls, least = triton_tp1[name]
    # every decode step of every layer (and, for the sharded latent, its prefills): all through Triton
    assert calls["triton"] >= least, f"the Triton kernels ran {calls['triton']} times, expected >= {least}"
    assert calls["torch"] == 0, "some attention calls took the plain-torch path"
    assert_matches_transformers(result, TRAINED, atol=1e-4)


def test_tp1_partitioned_matches_the_torch_kernel(triton_tp1, tp2_runs):
    result, calls, least = triton_tp1["partitioned"]
    assert calls["triton"] >= least and calls["torch"] == 0, calls
    torch_result = tp2_runs["partitioned_random"][0]  # plain torch, TP=2 (equal to TP=1: test_gla.py)
    assert TP2_RUNS["partitioned_random"]["hf_overrides"] == PARTITIONED
    assert_same_logprobs(result, torch_result, atol=1e-4)


@pytest.mark.slow
def test_tp2_through_triton(triton_tp2, tp2_runs):
    runs, kernel_trace = triton_tp2
    launched = kernels_by_pid(kernel_trace)
    assert launched and all(kernels == {"triton"} for kernels in launched.values()), launched
    for name, (result, trace) in runs.items():
        workers = trace_pids(trace)  # the processes that ran our decode
        assert len(workers) == 2, (name, trace_lines(trace))
        assert all(launched.get(pid) == {"triton"} for pid in workers), (name, workers, launched)
    assert_matches_transformers(runs["exact"][0], TRAINED, atol=1e-4)
    assert_same_logprobs(runs["partitioned"][0], tp2_runs["partitioned_random"][0], atol=1e-4)
