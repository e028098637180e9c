"""gqa-to-mla: converted checkpoints through vLLM with the plugin, with no flags."""

import pytest

from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.converters import calibration_text, exact_settings, gqa_sources
from tests.vllm.engines import assert_matches_transformers, logprob_spread, run_engine


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return gqa_sources(tmp_path_factory.mktemp("gqa_sources"))


def test_exact_and_compressed_through_vllm(sources, tmp_path):
    """No flags: the plugin picks MLA_PLUGIN, drops the latent norm, adds the biases and the
    explicit rope frequencies. Exact = the source; compressed = transformers on the same file."""
    converted = {}
    for name in ("llama-trained", "qwen2-bias"):
        converted[name] = tmp_path / name
        convert_gqa_to_mla(sources[name], converted[name], dtype="float32", show_progress=False,
                           **exact_settings(sources[name]))
    compressed = tmp_path / "compressed"
    convert_gqa_to_mla(sources["llama-trained"], compressed, rope_dim=16, kv_lora_rank=48, freqfold=2,
                       calib_text=calibration_text(), calib_tokens=4096, dtype="float32",
                       show_progress=False)
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    for name, path in converted.items():
        result = run_engine(str(path), max_tokens=8)
        assert logprob_spread(result) > 1.0
        assert_matches_transformers(result, sources[name], atol=1e-4)
    result = run_engine(str(compressed), max_tokens=8)
    assert_matches_transformers(result, str(compressed), atol=1e-4)
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) > before  # our decode served them
