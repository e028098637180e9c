"""gqa-to-mla: converted checkpoints through vLLM (no flags) and transformers (remote code)."""

import json
import subprocess
import sys

import pytest

from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import ConversionError, convert_mla_to_gla
from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import make_tiny_llama, trained_fixture
from mla_plugin.vllm.mla_backend import DECODE_CALLS
from tests.paths import wikitext_file
from tests.vllm.engines import (PROMPTS, assert_matches_transformers, hf_logprobs, logprob_spread,
                                run_engine)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("gqa_sources")
    return {
        "llama-trained": str(trained_fixture("llama-gqa-tiny")),
        "qwen2-bias": str(make_tiny_llama(root / "qwen2", family="qwen2", seed=21, num_heads=4, num_kv_heads=2)),
        "mistral-mha": str(make_tiny_llama(root / "mistral", family="mistral", seed=22, num_heads=4,
                                           num_kv_heads=4)),
        "llama3-rope": str(make_tiny_llama(root / "llama3", seed=23, num_heads=4, num_kv_heads=1, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
    }


def exact_settings(source: str) -> dict:
    config = json.loads((__import__("pathlib").Path(source) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_dims = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or config["hidden_size"] // heads)
    return dict(rope_dim=kv_dims, kv_lora_rank=kv_dims)


def _ids(text: str, model: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)(text)["input_ids"]


@pytest.mark.parametrize("name", ["llama-trained", "qwen2-bias", "mistral-mha", "llama3-rope"])
def test_exact_form_in_transformers(sources, tmp_path, name):
    """Exact settings reproduce the source's logprobs (fp32, 1e-4) with trust_remote_code."""
    src = sources[name]
    report = convert_gqa_to_mla(src, tmp_path / "out", dtype="float32", show_progress=False, **exact_settings(src))
    assert report.plan["exact"]
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["mla_plugin"]["latent_norm"] is False
    assert config["mla_plugin"]["q_bias"] is (name == "qwen2-bias")
    assert config["mla_plugin"]["kv_a_bias"] is (name == "qwen2-bias")
    for prompt in PROMPTS[::3]:
        ids = _ids(prompt, src)
        ref, got = hf_logprobs(src, ids), hf_logprobs(str(tmp_path / "out"), ids)
        assert float((ref - got).abs().max()) <= 1e-4
        assert float(ref.max() - ref.min()) > 1.0  # a comparison that can fail


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
                       calib_text=wikitext_file("valid.tokens.txt"), calib_tokens=4096, dtype="float32",
                       show_progress=False)
    before = DECODE_CALLS.get("MLA_PLUGIN", 0)
    for name, path in converted.items():
        result = run_engine(str(path), max_tokens=8)
        assert logprob_spread(result) > 1.0
        assert_matches_transformers(result, sources[name], atol=1e-4)
    result = run_engine(str(compressed), max_tokens=8)
    assert_matches_transformers(result, str(compressed), atol=1e-4)
    assert DECODE_CALLS.get("MLA_PLUGIN", 0) > before  # our decode served them


def test_stage_perplexities(tmp_path):
    """Trained GQA fixture: exact stage = original; partial RoPE and compression cost a little."""
    src = trained_fixture("llama-gqa-tiny")
    text = wikitext_file("test.raw.txt").read_text(encoding="utf-8")
    calib = wikitext_file("valid.tokens.txt")
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


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mla_plugin.cli", "convert", "gqa-to-mla", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["wrong-arch", "rank-too-large", "rope-not-multiple", "dst-not-empty",
                                  "no-calib-text", "calib-text-missing", "sliding-window"])
def test_bad_input_errors(sources, tmp_path, case):
    src, dst = sources["llama-trained"], tmp_path / "out"
    args = ["--kv-lora-rank", 48, "--rope-dim", 16, "--freqfold", 2,
            "--calib-text", wikitext_file("valid.tokens.txt")]
    expected = {
        "wrong-arch": "converts Llama, Mistral and Qwen2",
        "rank-too-large": "--kv-lora-rank 500 must be between 1 and 112",
        "rope-not-multiple": "--rope-dim 20 must be a multiple of 16",
        "dst-not-empty": "not empty",
        "no-calib-text": "needs calibration text",
        "calib-text-missing": "does not exist",
        "sliding-window": "sliding-window attention",
    }[case]
    if case == "wrong-arch":
        src = trained_fixture("deepseek-v2-tiny")
    elif case == "rank-too-large":
        args[1] = 500
    elif case == "rope-not-multiple":
        args[3] = 20
    elif case == "dst-not-empty":
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    elif case == "no-calib-text":
        args = args[:-2]
    elif case == "calib-text-missing":
        args[-1] = tmp_path / "nope.txt"
    elif case == "sliding-window":
        src = str(make_tiny_llama(tmp_path / "mistral-sw", family="mistral", sliding_window=64))
    proc = _cli(src, dst, *args)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    if case == "dst-not-empty":
        assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]


def test_report_counts_kv_values(tmp_path):
    report = convert_gqa_to_mla(trained_fixture("llama-gqa-tiny"), tmp_path / "out", rope_dim=16, kv_lora_rank=48,
                                freqfold=2, calib_text=wikitext_file("valid.tokens.txt"), calib_tokens=2048,
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
