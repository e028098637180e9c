"""gqa-to-mla end to end on wikitext-2 (transformers, no vLLM): the trained GQA fixture's
perplexity after each stage, and the report of a calibrated conversion. Calibrated on the
held-out tail of the validation text, which the fixture was not trained on."""

import json

import pytest

from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import trained_fixture
from tests.converters import calibration_text
from tests.paths import wikitext_file


def test_stage_perplexities(tmp_path):
    """Trained GQA fixture: exact stage = original; partial RoPE and compression cost a little."""
    src = trained_fixture("llama-gqa-tiny")
    text = wikitext_file("test.raw.txt").read_text(encoding="utf-8")
    calib = calibration_text()
    stages = {"exact": dict(rope_dim=64, kv_lora_rank=64, calib_text=None),
              "partial": dict(rope_dim=16, kv_lora_rank=112, freqfold=2, calib_text=calib),
              "full": dict(rope_dim=16, kv_lora_rank=48, freqfold=2, calib_text=calib)}
    ppl = {"original": perplexity(str(src), engine="transformers", text=text, window=256, max_windows=12,
                                  dtype="float32", show_progress=False).ppl}
    for name, settings in stages.items():
        convert_gqa_to_mla(src, tmp_path / name, dtype="float32", calib_tokens=8192, show_progress=False,
                           **settings)
        ppl[name] = perplexity(str(tmp_path / name), engine="transformers", text=text, window=256,
                               max_windows=12, dtype="float32", show_progress=False).ppl
    assert abs(ppl["exact"] / ppl["original"] - 1) < 1e-4, ppl
    # Dropping RoPE from most key dims costs (no training); compressing the rest to half the
    # KV cache costs little beyond that; neither wrecks the model.
    assert ppl["partial"] > ppl["original"] * 1.01, ppl
    assert abs(ppl["full"] / ppl["partial"] - 1) < 0.03, ppl
    assert ppl["full"] < ppl["original"] * 1.5, ppl


def test_report_counts_kv_values(tmp_path):
    report = convert_gqa_to_mla(trained_fixture("llama-gqa-tiny"), tmp_path / "out", rope_dim=16, kv_lora_rank=48,
                                freqfold=2, calib_text=calibration_text(), calib_tokens=2048,
                                show_progress=False)
    assert (report.kv_values_before, report.kv_values_after) == (128, 64)
    text = report.summary()
    assert "128" in text and "64" in text and "2.00x fewer" in text
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (48, 16)
    assert "rope_inv_freq" not in config["mla_plugin"]  # FreqFold 2 with one component = DeepSeek's default
    assert (tmp_path / "out/modeling_mla_plugin.py").exists()
    # its sharded-latent conversion is refused with a reason, not done wrong
    with pytest.raises(ConversionError, match="converted from a GQA/MHA model"):
        convert_mla_to_gla(tmp_path / "out", tmp_path / "gla", shards=2, show_progress=False)
    assert not (tmp_path / "gla").exists()
