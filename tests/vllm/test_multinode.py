"""Multi-node: TP=2 across two vLLM processes acting as two nodes on 127.0.0.1, with vLLM's own
multi-node launch (mp executor, `--nnodes 2 --node-rank {0,1} --master-addr --headless`; no
Ray). Node 1 is a headless `vllm serve` that loads the plugin through its entry point like
any other node would. On the trained fixture, fp32: MLA_PLUGIN equals transformers (1e-4,
prompt logprobs and 32 greedy steps) and MLA_PLUGIN_GLA exact equals MLA_PLUGIN, and each
node's own process ran our backend on its own rank (trace files)."""

import re

import pytest

from mla_plugin.fixtures import trained_fixture
from tests.vllm.engines import assert_matches_transformers, assert_same_logprobs, logprob_spread
from tests.vllm.helpers import gla
from tests.vllm.multinode import run_two_nodes

pytestmark = pytest.mark.slow

MODEL = str(trained_fixture("deepseek-v2-tiny"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """backend -> NodeRun, the two TP=2 two-node runs one after another (~1 min each on 2 cores)."""
    tmp = tmp_path_factory.mktemp("multinode")
    return {"mla_plugin": run_two_nodes(MODEL, "mla_plugin", tmp / "mla"),
            "mla_plugin_gla": run_two_nodes(MODEL, "mla_plugin_gla", tmp / "gla", hf_overrides=gla("exact"))}


def test_mla_across_two_nodes_equals_transformers(runs):
    result = runs["mla_plugin"].result
    assert logprob_spread(result) > 1.0
    assert all(len(tokens) == 32 for tokens in result["tokens"])
    assert_matches_transformers(result, MODEL, atol=1e-4)


def test_gla_exact_across_two_nodes_equals_mla(runs):
    assert_same_logprobs(runs["mla_plugin_gla"].result, runs["mla_plugin"].result, atol=1e-4)


@pytest.mark.parametrize("backend", ["mla_plugin", "mla_plugin_gla"])
def test_each_node_ran_its_own_rank(runs, backend):
    """Two processes, two torch.distributed ranks meeting at the master address over gloo
    (not the single-host shared-memory path), and our decode in a worker of each node."""
    run = runs[backend]
    logs, traces = run.node_logs, run.node_traces
    assert "headless multiproc executor" in logs[1]
    for rank, log in enumerate(logs):
        assert re.search(rf"world_size=2 rank={rank} local_rank=0 distributed_init_method=tcp://127\.0\.0\.1:\d+ "
                         r"backend=gloo", log), log[-3000:]
        assert "ranks do not share the same SHM group name" in log  # really two hosts' worth of ranks
    pids = [{re.search(r"pid=(\d+)", line).group(1) for line in lines} for lines in traces]
    assert all(len(p) == 1 for p in pids) and pids[0] != pids[1], traces
    assert not {str(pid) for pid in run.node_pids} & (pids[0] | pids[1])  # workers, not the node mains
    for lines in traces:
        assert lines and all(line.split()[0] == backend.upper() for line in lines), traces
    if backend == "mla_plugin_gla":  # each node holds its own half of the latent: d_c / 2 + d_R
        assert "shards=0+1/2" in traces[0][0] and "shards=1+1/2" in traces[1][0], traces
        assert all(re.search(r"cache=\[\d+, \d+, 320\]", lines[0]) for lines in traces), traces


def test_headless_node_loads_the_plugin_by_entry_point(runs):
    """In the MLA_PLUGIN run nothing asks for MLA_PLUGIN_GLA, so its registration in node 1's
    worker comes from the plugin's register() (vllm.general_plugins) having run there."""
    run = runs["mla_plugin"]
    worker_pid = re.search(r"pid=(\d+)", run.node_traces[1][0]).group(1)
    assert re.search(rf"pid={worker_pid}\) INFO .*Registered new attention backend: MLA_PLUGIN_GLA",
                     run.node_logs[1]), run.node_logs[1][-3000:]
