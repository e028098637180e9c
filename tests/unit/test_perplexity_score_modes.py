"""`--score prefill|decode` without vLLM: bad values are one line and exit 2, the transformers
engine's decode mode (one token at a time through its KV cache) gives the prefill numbers,
and vLLM-only options are refused with the transformers engine."""

import pytest

from mla_plugin.cli import main
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.eval.perplexity import SCORE_MODES, PerplexityScorer, perplexity
from mla_plugin.fixtures import make_tiny_deepseek_v2
from tests.unit.test_perplexity_protocol import TEXT


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_deepseek_v2(tmp_path_factory.mktemp("ppl_modes"), seed=5, kv_lora_rank=64,
                                     qk_rope_head_dim=16))


def test_bad_score_is_one_line_and_exit_2(tiny_model, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    code = main(["ppl", tiny_model, "--engine", "transformers", "--text", str(text), "--score", "sideways"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: score (--score) must be one of prefill, decode, got 'sideways'"]
    with pytest.raises(MLAPluginInputError, match=r"score \(--score\) must be one of prefill, decode"):
        perplexity(tiny_model, engine="transformers", text=TEXT, window=16, score="Decode", show_progress=False)


def test_transformers_decode_scores_the_prefill_numbers(tiny_model):
    """Windows of an odd length and a batch that does not divide them: the same NLLs both ways."""
    with PerplexityScorer(tiny_model, engine="transformers", window=23, dtype="float32", show_progress=False,
                          batch=2) as scorer:
        results = {score: scorer.perplexity(TEXT, max_windows=3, score=score) for score in SCORE_MODES}
    prefill, decode = results["prefill"], results["decode"]
    assert (decode.score, decode.windows, decode.tokens_scored) == ("decode", 3, 3 * 22)
    assert decode.mean_nll == pytest.approx(prefill.mean_nll, rel=1e-6)
    assert "score decode" in decode.summary() and '"score": "decode"' in decode.to_json()


def test_vllm_options_need_the_vllm_engine(tiny_model):
    with pytest.raises(MLAPluginInputError, match="attention_backend: vLLM engine options"):
        PerplexityScorer(tiny_model, engine="transformers", window=16, attention_backend="mla_plugin")
