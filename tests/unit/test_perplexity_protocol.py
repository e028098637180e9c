"""The perplexity protocol, pinned by hand and by an independent loop."""

import math
import subprocess
import sys

import pytest
import torch

from mla_plugin.eval.perplexity import (
    DEFAULT_DTYPE,
    DEFAULT_ENGINE,
    DEFAULT_WINDOW,
    TextUnavailableError,
    load_text,
    perplexity,
    perplexity_from_window_nlls,
)
from mla_plugin.fixtures import make_tiny_deepseek_v2
from mla_plugin.text_windows import make_windows, tokenize_once

TEXT = "\n\n".join([
    " = Valkyria Chronicles III = ",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game .",
    " The game began development in 2010 , carrying over a large portion of the work done on "
    "Valkyria Chronicles II . It met with positive sales in Japan , and was praised by both "
    "Japanese and western critics .",
] * 3)


class CharTokenizer:
    """Each character one token (ord), BOS = 0: tokenization by hand."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_bos_only_at_the_start():
    ids = tokenize_once(CharTokenizer(), "ab\n\ncd")
    assert ids == [0, ord("a"), ord("b"), 10, 10, ord("c"), ord("d")]


def test_windows_do_not_overlap_and_drop_the_remainder():
    ids = list(range(11))
    assert make_windows(ids, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 8, 9, 10 dropped
    assert make_windows(ids, 4, max_windows=1) == [[0, 1, 2, 3]]
    assert make_windows(ids, 11) == [ids]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows(ids, 12)
    with pytest.raises(ValueError, match="at least 2"):
        make_windows(ids, 1)


def test_ppl_is_exp_of_mean_window_nll():
    assert perplexity_from_window_nlls([1.0, 3.0]) == pytest.approx(math.exp(2.0))
    assert perplexity_from_window_nlls([math.log(4.0)]) == pytest.approx(4.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(make_tiny_deepseek_v2(tmp_path_factory.mktemp("ppl_ds"), seed=3, kv_lora_rank=64,
                                     qk_rope_head_dim=16))


@pytest.mark.parametrize("window,max_windows", [(16, None), (23, 3), (64, None)])
def test_transformers_engine_equals_an_independent_loop(tiny_model, window, max_windows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = perplexity(tiny_model, engine="transformers", text=TEXT, window=window,
                        max_windows=max_windows, dtype="float32", show_progress=False)

    # the independent loop: transformers' own loss over each window
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = [tok.bos_token_id] + tok(TEXT, add_special_tokens=False)["input_ids"]
    starts = list(range(0, len(ids) - window + 1, window))[:max_windows]
    with torch.no_grad():
        losses = [model(torch.tensor([ids[s:s + window]]), labels=torch.tensor([ids[s:s + window]])).loss.item()
                  for s in starts]
    assert result.windows == len(starts)
    assert result.tokens_scored == len(starts) * (window - 1)
    assert result.text_tokens == len(ids)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_no_text_and_no_hub_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextUnavailableError, match="--text FILE"):
        load_text(None)
    proc = subprocess.run(
        [sys.executable, "-m", "mla_plugin.cli", "ppl", tiny_model, "--engine", "transformers"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "pass the text with --text FILE" in proc.stderr and 'pip install "mla_plugin[datasets]"' in proc.stderr
    assert "../shared" not in proc.stderr  # no path that exists only in this repository
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cli_json_output(tiny_model, tmp_path):
    import json

    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    proc = subprocess.run(
        [sys.executable, "-m", "mla_plugin.cli", "ppl", tiny_model, "--engine", "transformers",
         "--text", str(text_file), "--window", "16", "--max-windows", "4", "--dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["engine"], result["window"], result["windows"], result["tokens_scored"]) == (
        "transformers", 16, 4, 4 * 15)
    direct = perplexity(tiny_model, engine="transformers", text=TEXT, window=16, max_windows=4,
                        dtype="float32", show_progress=False)
    assert result["ppl"] == pytest.approx(direct.ppl, rel=1e-9)


def test_cli_rejects_vllm_options_for_transformers(tiny_model, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    proc = subprocess.run(
        [sys.executable, "-m", "mla_plugin.cli", "ppl", tiny_model, "--engine", "transformers",
         "--text", str(text_file), "--attention-backend", "mla_plugin"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "need --engine vllm" in proc.stderr


def test_windowing_imports_neither_vllm_nor_transformers():
    """The converters cut calibration windows with the protocol's own code, without the engines."""
    code = ("import sys, mla_plugin.text_windows; "
            "print(sorted(m for m in ('vllm', 'transformers', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_defaults_are_the_python_defaults():
    import inspect

    from mla_plugin.cli import build_parser

    args = build_parser().parse_args(["ppl", "MODEL"])
    params = inspect.signature(perplexity).parameters
    assert (args.engine, args.window, args.dtype) == (DEFAULT_ENGINE, DEFAULT_WINDOW, DEFAULT_DTYPE)
    assert (params["engine"].default, params["window"].default, params["dtype"].default) == (
        DEFAULT_ENGINE, DEFAULT_WINDOW, DEFAULT_DTYPE)
