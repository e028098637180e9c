"""`--attention-backend mla_plugin` at TP=2 in SGLang's offline engine: each rank runs our
backend over its 4 of the 8 heads; the result equals transformers."""

import pytest

from tests.sglang.helpers import DEEPSEEK, TP2_ENV, prompt_ids, run_sglang_engines, trace_modes
from tests.vllm.engines import assert_matches_transformers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sglang_tp2")
    trace = tmp / "trace.txt"
    results, _ = run_sglang_engines(tmp, [
        dict(model=str(DEEPSEEK), prompt_ids=prompt_ids(), attention_backend="mla_plugin", tp_size=2),
    ], trace_file=trace, env=TP2_ENV)
    return results[0], trace


def test_tp2_matches_transformers(tp2):
    result, _ = tp2
    assert all(len(tokens) == 32 for tokens in result["tokens"])
    assert_matches_transformers(result, str(DEEPSEEK), atol=1e-4)


def test_both_ranks_ran_our_backend(tp2):
    _, trace = tp2
    modes = trace_modes(trace)
    assert len(modes) == 2 and all(m == {"extend", "decode"} for m in modes.values()), modes
    assert "heads=4" in trace.read_text()  # 8 heads split over 2 ranks
