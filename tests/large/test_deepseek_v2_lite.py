"""DeepSeek-V2-Lite wikitext-2 perplexity through the plugin (the real thing), scored both ways.

Runs where a local checkpoint is given:  MLA_PLUGIN_DSV2_LITE=/path/to/DeepSeek-V2-Lite
Published: 6.3102 (window 2048, bfloat16, prefill-scored); we accept 1%.

One engine per TP size: the whole test split prefill-scored against the published
number, then the first DECODE_WINDOWS windows both ways (decode scoring is one engine
step per token): decode-scored = prefill-scored within bfloat16 rounding, and our
decode ran for every scored token of every layer in every rank (the decode probe,
installed in the engine processes through the scoring hook).
"""

import json
import os
from pathlib import Path

import pytest

from mla_plugin import MLA_BACKEND_NAME
from mla_plugin.eval.perplexity import PerplexityScorer
from mla_plugin.vllm.reference_tokens import SCORING_HOOK_ENV
from tests.paths import REPO, wikitext_file
from tests.vllm.decode_probe import DECODE_ROWS_DIR_ENV, SCORING_HOOK, rows_by_process
from tests.vllm.ppl_runs import score_modes

CHECKPOINT = os.environ.get("MLA_PLUGIN_DSV2_LITE")
PUBLISHED_PPL = 6.3102
WINDOW = 2048
DECODE_WINDOWS = 8
DECODE_EQUALS_PREFILL = 5e-3  # relative, bfloat16 (the fixtures' fp32 tests hold 1e-5)

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(not CHECKPOINT, reason="set MLA_PLUGIN_DSV2_LITE to a local DeepSeek-V2-Lite checkpoint"),
]


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("tp", [1, 2])
def test_deepseek_v2_lite_ppl(tp, tmp_path, monkeypatch):
    if tp > 1 and _gpus() < tp:
        pytest.skip(f"TP={tp} needs {tp} GPUs, found {_gpus()}")
    rows_dir = tmp_path / "rows"
    rows_dir.mkdir()
    # read by the engine processes vLLM starts
    monkeypatch.setenv(SCORING_HOOK_ENV, SCORING_HOOK)
    monkeypatch.setenv(DECODE_ROWS_DIR_ENV, str(rows_dir))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    text = wikitext_file("test.raw.txt").read_text(encoding="utf-8")
    with PerplexityScorer(CHECKPOINT, engine="vllm", window=WINDOW, dtype="bfloat16", show_progress=False,
                          attention_backend="mla_plugin", tensor_parallel_size=tp,
                          trust_remote_code=True) as scorer:
        full = scorer.perplexity(text, score="prefill")
        print(full.summary())
        assert abs(full.ppl / PUBLISHED_PPL - 1) < 0.01, full.summary()
        run = score_modes(scorer, text, DECODE_WINDOWS, lambda: rows_by_process(rows_dir))
    prefill, decode = (run[score]["result"]["ppl"] for score in ("prefill", "decode"))
    print(f"first {DECODE_WINDOWS} windows: prefill-scored {prefill:.4f}, decode-scored {decode:.4f}")
    assert abs(decode / prefill - 1) < DECODE_EQUALS_PREFILL, (prefill, decode)
    layers = json.loads((Path(CHECKPOINT) / "config.json").read_text())["num_hidden_layers"]
    tokens = DECODE_WINDOWS * (WINDOW - 1)
    decode_rows = run["decode"]["rows"]
    assert len(decode_rows) == tp, decode_rows  # one engine process per rank ran our decode
    assert all(rows == {MLA_BACKEND_NAME: tokens * layers} for rows in decode_rows.values()), decode_rows
    assert run["prefill"]["rows"] == {}
