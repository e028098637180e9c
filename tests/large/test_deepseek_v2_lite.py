"""DeepSeek-V2-Lite wikitext-2 perplexity through the plugin (the real thing).

Runs where a local checkpoint is given:  MLA_PLUGIN_DSV2_LITE=/path/to/DeepSeek-V2-Lite
Published: 6.3102 (window 2048, bfloat16); we accept 1%.
"""

import os

import pytest

from mla_plugin.eval.perplexity import perplexity
from tests.paths import wikitext_file

CHECKPOINT = os.environ.get("MLA_PLUGIN_DSV2_LITE")
PUBLISHED_PPL = 6.3102

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(not CHECKPOINT, reason="set MLA_PLUGIN_DSV2_LITE to a local DeepSeek-V2-Lite checkpoint"),
]


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("tp", [1, 2])
def test_deepseek_v2_lite_ppl(tp):
    if tp > 1 and _gpus() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, found {_gpus()}")
    result = perplexity(
        CHECKPOINT, engine="vllm", text=wikitext_file("test.raw.txt").read_text(encoding="utf-8"),
        window=2048, dtype="bfloat16", attention_backend="mla_plugin", tensor_parallel_size=tp,
        trust_remote_code=True,
    )
    print(result.summary())
    assert abs(result.ppl / PUBLISHED_PPL - 1) < 0.01, result.summary()
