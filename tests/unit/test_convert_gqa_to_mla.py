"""gqa-to-mla: the exact form keeps the source's function in transformers (remote code); bad
inputs are clear errors from the CLI."""

import json
import subprocess
import sys

import pytest

from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.fixtures import make_tiny_llama, trained_fixture
from tests.converters import exact_settings, gqa_sources
from tests.paths import wikitext_file
from tests.vllm.engines import PROMPTS, hf_logprobs  # transformers only: no vLLM import


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return gqa_sources(tmp_path_factory.mktemp("gqa_sources"))


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


def test_cli_defaults_are_the_python_defaults():
    import inspect

    from mla_plugin.cli import build_parser

    args = build_parser().parse_args(["convert", "gqa-to-mla", "SRC", "DST", "--kv-lora-rank", "8",
                                      "--rope-dim", "8"])
    params = inspect.signature(convert_gqa_to_mla).parameters
    for name in ("freqfold", "calib_tokens", "calib_window", "dtype"):
        assert getattr(args, name) == params[name].default, name
    assert (not args.no_balance) == params["balance"].default
