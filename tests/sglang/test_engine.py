"""`--attention-backend mla_plugin` in SGLang's offline engine (``sglang.Engine``, TP=1, CPU):
the trained DeepSeek-V2 fixture against transformers, proof that our backend ran prefill
and decode, and one clear error for a model without MLA. One ``.venv-sglang`` subprocess
runs both engines one after another."""

import pytest

from tests.sglang.helpers import DEEPSEEK, LLAMA, prompt_ids, run_sglang_engines, trace_modes
from tests.vllm.engines import assert_matches_transformers, logprob_spread

# fp32 end to end: SGLang's CPU path runs the model in float32 when asked (dtype="float32").
ATOL = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang_engine")
    trace = tmp / "trace.txt"
    results, log = run_sglang_engines(tmp, [
        # page_size 16: the seam's block table is built from SGLang's pages
        dict(model=str(DEEPSEEK), prompt_ids=prompt_ids(), attention_backend="mla_plugin", page_size=16),
        dict(kind="error", model=str(LLAMA), attention_backend="mla_plugin"),
    ], trace_file=trace)
    return {"mla": results[0], "llama_error": results[1], "trace": trace, "log": log}


def test_trained_fixture_matches_transformers(runs):
    result = runs["mla"]
    assert all(len(tokens) == 32 for tokens in result["tokens"])
    assert logprob_spread(result) > 1.0  # a 1e-4 agreement means something
    assert_matches_transformers(result, str(DEEPSEEK), atol=ATOL)


def test_our_backend_ran_prefill_and_decode(runs):
    modes = trace_modes(runs["trace"])
    assert list(modes.values()) == [{"extend", "decode"}], f"expected one scheduler running both, got {modes}"
    line = runs["trace"].read_text()
    assert "page_size=16" in line and "d_c=512 d_R=64" in line, line


def test_model_without_mla_is_one_clear_error(runs):
    error = runs["llama_error"]
    assert error["error_type"] == "NotAnMLAModelError", error
    assert "needs a model with multi-head latent attention" in error["error"]
    assert "LlamaForCausalLM" in error["error"] and "\n" not in error["error"]
