"""Sources and checks the converter tests share (every tier: unit, e2e, vllm)."""

import functools
import json
import tempfile
from pathlib import Path

import torch

from mla_plugin.fixtures import make_tiny_deepseek_v2, make_tiny_llama, trained_fixture
from mla_plugin.fixtures.training_text import held_out_calibration_text
from tests.paths import wikitext_file

# Token ids scored by the transformers round-trip checks (any ids below the fixtures' vocabulary).
TEXT_IDS = [0, 54, 260, 3576, 379, 12, 901, 77, 1200, 45, 3000, 18, 640, 2222, 9, 31]
_HELD_OUT_FOLDER = tempfile.TemporaryDirectory(prefix="mla_plugin_held_out_")  # removed at exit


@functools.lru_cache(maxsize=1)
def calibration_text() -> Path:
    """The calibration text of every converter test: the held-out tail of the wikitext-2
    validation file, which the trained fixtures never saw (mla_plugin/fixtures/training_text.py).
    Written once per test process into a temporary folder removed at exit."""
    return held_out_calibration_text(wikitext_file("valid.tokens.txt"), _HELD_OUT_FOLDER.name)


def tiny_deepseek(root: Path) -> Path:
    """A tiny random DeepSeek-V2 for mla-to-gla: d_c 128 + rope 32, 4 heads, 2 layers."""
    return make_tiny_deepseek_v2(root, seed=21, kv_lora_rank=128, qk_rope_head_dim=32, num_heads=4)


def transformers_logprobs(path) -> torch.Tensor:
    """transformers' (float32) log-softmax at every position of TEXT_IDS: [len(TEXT_IDS), V], float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([TEXT_IDS])).logits[0].double(), -1)


def gqa_sources(root: Path) -> dict[str, str]:
    """gqa-to-mla sources: the trained Llama fixture, Qwen2 with biases, Mistral MHA, Llama 3 rope."""
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
    """gqa-to-mla settings of the exact form: every key dim under RoPE, full rank."""
    config = json.loads((Path(source) / "config.json").read_text())
    heads = config["num_attention_heads"]
    kv_dims = (config.get("num_key_value_heads") or heads) * (config.get("head_dim") or config["hidden_size"] // heads)
    return dict(rope_dim=kv_dims, kv_lora_rank=kv_dims)
