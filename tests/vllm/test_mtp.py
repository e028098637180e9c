"""DeepSeek MTP (vLLM's ``deepseek_mtp`` speculation, one draft token a step) through our backends
(issue 23 item 2), on a tiny DeepSeek-V3 with one MTP layer (tests/mtp_checkpoint.py).

vLLM never hands the draft model the target's attention backend: it picks the draft's own
(CPU_MLA on CPU) unless ``speculative_config["attention_backend"]`` names one. Named, the
MTP layer's attention (``model.layers.{N}``, N = num_hidden_layers) runs our decode as well,
for mla_plugin and for mla_plugin_gla (vLLM builds the MTP block with DeepSeek-V2's decoder
layer, so our sharded-latent layer replaces its attention too).

Evidence: greedy tokens and logprobs equal transformers' (its V3 has no MTP layer), the
verify steps' rows (1 + 1 per request) went through our decode, the draft layer is among the
layers our decode served, and no prefill call had cached context. The MTP layer drafts the
target's previous prediction again (tests/mtp_checkpoint.py), so drafts are accepted where the
greedy text repeats a token and rejected elsewhere: both paths run.
"""

import json
from pathlib import Path

import pytest

from tests.conftest import seed_for
from tests.mtp_checkpoint import make_tiny_v3_with_mtp
from tests.vllm.engines import assert_matches_transformers
from tests.vllm.helpers import gla
from tests.vllm.spec_runs import run_each_in_own_process

RUNS = {"mla": ("mla_plugin", None, "MLA_PLUGIN"), "exact": ("mla_plugin_gla", gla("exact"), "MLA_PLUGIN_GLA")}


def mtp(backend: str) -> dict:
    return {"method": "deepseek_mtp", "num_speculative_tokens": 1, "attention_backend": backend}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_v3_with_mtp(tmp_path_factory.mktemp("v3_mtp") / "model", seed=seed_for("test_mtp")))


@pytest.fixture(scope="module")
def runs(checkpoint, tmp_path_factory):
    specs = [dict(model=checkpoint, backend=backend, hf_overrides=overrides, speculative_config=mtp(backend),
                  max_tokens=24) for backend, overrides, _ in RUNS.values()]
    return dict(zip(RUNS, run_each_in_own_process(tmp_path_factory.mktemp("mtp_runs"), specs)))


@pytest.mark.parametrize("run", RUNS)
def test_mtp_output_equals_transformers(runs, checkpoint, run):
    assert_matches_transformers(runs[run], checkpoint, atol=1e-4)


@pytest.mark.parametrize("run", RUNS)
def test_mtp_draft_layer_and_verify_rows_ran_our_decode(runs, checkpoint, run):
    result, name = runs[run], RUNS[run][2]
    num_layers = json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"]
    decode, prefill = result["rows"]["decode"][name], result["rows"]["prefill"][name]
    drafted, accepted = (result["metrics"][f"vllm:spec_decode_num_{what}_tokens"] for what in ("draft", "accepted"))
    assert 0 < accepted < drafted, result["metrics"]  # some drafts accepted, some rejected
    # the target's layers verified every draft in our decode (the draft layer adds its own rows)
    assert decode["rows"] - decode["requests"] >= num_layers * drafted, (decode, drafted)
    assert decode["by_query_len"].get("2", 0) > 0, decode
    assert f"model.layers.{num_layers}.self_attn.attn" in decode["layers"], decode["layers"]
    assert prefill["with_context"] == 0, prefill
