"""Tiny checkpoints built once per test session, offline."""

import os

import pytest

from mla_plugin.fixtures import make_tiny_deepseek_v2, make_tiny_llama

# In-process engines: no engine-core subprocess (fast, exact). Tests that need
# vLLM's default spawn start run in a subprocess (tests.vllm.engines).
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


@pytest.fixture(scope="session")
def tiny_ds_576(tmp_path_factory):
    """kv_lora_rank 512 + rope 64: also servable by vLLM's CPU_MLA."""
    return str(make_tiny_deepseek_v2(tmp_path_factory.mktemp("ds576"), seed=11))


@pytest.fixture(scope="session")
def tiny_ds_288(tmp_path_factory):
    """kv_lora_rank 256 + rope 32: a latent width CPU_MLA cannot serve."""
    return str(
        make_tiny_deepseek_v2(
            tmp_path_factory.mktemp("ds288"), seed=12, kv_lora_rank=256, qk_rope_head_dim=32,
            num_heads=6, hidden_size=192, qk_nope_head_dim=24, v_head_dim=40,
        )
    )


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return str(make_tiny_llama(tmp_path_factory.mktemp("llama"), seed=13))


@pytest.fixture(scope="session")
def ours_576(tiny_ds_576):
    """Our backend on the 512+64 model, TP=1, in process (shared by several tests)."""
    from mla_plugin.vllm.mla_backend import DECODE_CALLS
    from tests.vllm.engines import run_engine

    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    result = run_engine(tiny_ds_576, backend="mla_plugin")
    result["decode_calls"] = DECODE_CALLS.get("MLA_PLUGIN", 0) - before
    return result


@pytest.fixture(scope="session")
def tp2_runs(tiny_ds_576, tmp_path_factory):
    """name -> (result, log section, trace file) for each tests.vllm.helpers.TP2_RUNS entry."""
    from mla_plugin.fixtures import trained_fixture
    from tests.vllm.engines import run_engines_subprocess
    from tests.vllm.helpers import TP2_RUNS

    tmp = tmp_path_factory.mktemp("tp2")
    models = {"random": tiny_ds_576, "trained": str(trained_fixture("deepseek-v2-tiny"))}
    runs = []
    for name, spec in TP2_RUNS.items():
        run = dict(spec, model=models[spec["model"]], tensor_parallel_size=2,
                   distributed_executor_backend="mp", trace_file=str(tmp / f"{name}.trace"))
        runs.append(run)
    results, log = run_engines_subprocess(tmp, runs, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                                          timeout=1500)
    sections = log.split("=== engine run ")[1:]
    assert len(sections) == len(runs), log[-3000:]
    return {name: (result, section, tmp / f"{name}.trace")
            for name, result, section in zip(TP2_RUNS, results, sections)}
