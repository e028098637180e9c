"""vLLM and transformers perplexity agree on the trained fixtures (fp32, 0.1%)."""

import pytest

from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import trained_fixture
from mla_plugin.vllm.engine import exact_cpu_engine
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.paths import wikitext_file

WINDOW, WINDOWS = 256, 24
VLLM_EXACT = exact_cpu_engine()


@pytest.fixture(scope="module")
def test_text():
    return wikitext_file("test.raw.txt").read_text(encoding="utf-8")


def _ppl(model, engine, text, **options):
    return perplexity(str(model), engine=engine, text=text, window=WINDOW, max_windows=WINDOWS,
                      dtype="float32", show_progress=False, **options)


@pytest.mark.parametrize("backend", ["mla_plugin", "CPU_MLA"])
def test_deepseek_fixture_engines_agree(test_text, backend):
    model = trained_fixture("deepseek-v2-tiny")
    reference = _ppl(model, "transformers", test_text)
    result = _ppl(model, "vllm", test_text, attention_backend=backend, **VLLM_EXACT)
    assert result.windows == reference.windows == WINDOWS
    assert result.tokens_scored == WINDOWS * (WINDOW - 1)
    assert abs(result.ppl / reference.ppl - 1) < 1e-3, (result.ppl, reference.ppl)
    assert reference.ppl < 1000, "the trained fixture should be far better than chance (4096)"


def test_llama_fixture_engines_agree(test_text):
    model = trained_fixture("llama-gqa-tiny")
    before = dict(DECODE_CALLS)
    reference = _ppl(model, "transformers", test_text)
    result = _ppl(model, "vllm", test_text, **VLLM_EXACT)
    assert DECODE_CALLS == before  # not an MLA model: the plugin stays out of the way
    assert abs(result.ppl / reference.ppl - 1) < 1e-3, (result.ppl, reference.ppl)
    assert reference.ppl < 1000
