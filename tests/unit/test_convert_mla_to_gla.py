"""mla-to-gla: exact settings keep the model's function; streaming; clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.fixtures import make_tiny_llama
from tests.converters import tiny_deepseek
from tests.converters import transformers_logprobs as _logprobs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_deepseek(tmp_path_factory.mktemp("src"))


@pytest.mark.parametrize("basis", ["identity", "hadamard", "pca"])
def test_exact_conversion_keeps_the_function_in_transformers(tiny, tmp_path, basis):
    report = convert_mla_to_gla(tiny, tmp_path / "out", shards=4, softmax="exact", basis=basis,
                                show_progress=False)
    assert report.layers == 2 and report.changed_tensors == 6
    assert (report.kv_values_per_token_per_layer_before,
            report.kv_values_per_token_per_layer_per_rank_after) == (128 + 32, 128 // 4 + 32)
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["mla_plugin"]["layout"] == "sharded_latent" and config["mla_plugin"]["shards"] == 4
    diff = (_logprobs(tmp_path / "out") - _logprobs(tiny)).abs().max().item()
    assert diff < 1e-4, diff
    if basis != "identity":  # the weights really changed
        from safetensors.torch import load_file

        a = load_file(str(tiny / "model.safetensors"))["model.layers.0.self_attn.kv_b_proj.weight"]
        b = load_file(str(tmp_path / "out/model.safetensors"))["model.layers.0.self_attn.kv_b_proj.weight"]
        assert (a - b).abs().max() > 1e-3


def test_partitioned_conversion_changes_the_function(tiny, tmp_path):
    convert_mla_to_gla(tiny, tmp_path / "out", shards=2, softmax="partitioned", basis="hadamard",
                       show_progress=False)
    # the slice scale g is folded into W_UK: as plain MLA the logits are too sharp
    assert (_logprobs(tmp_path / "out") - _logprobs(tiny)).abs().max().item() > 1e-3


def test_multi_file_checkpoint_streams_to_the_same_result(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="400KB")
    (sharded / "tokenizer.json").write_bytes((tiny / "tokenizer.json").read_bytes())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2
    convert_mla_to_gla(sharded, tmp_path / "a", shards=2, softmax="exact", basis="hadamard", show_progress=False)
    convert_mla_to_gla(tiny, tmp_path / "b", shards=2, softmax="exact", basis="hadamard", show_progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.safetensors")) == files
    assert (tmp_path / "a/model.safetensors.index.json").exists()
    streamed = {}
    for name in files:
        streamed.update(load_file(str(tmp_path / "a" / name)))
    whole = load_file(str(tmp_path / "b/model.safetensors"))
    assert streamed.keys() == whole.keys()
    for key in whole:
        torch.testing.assert_close(streamed[key], whole[key], rtol=0, atol=0)


def test_bad_inputs_are_clear_errors(tiny, tmp_path):
    llama = make_tiny_llama(tmp_path / "llama")
    with pytest.raises(ConversionError, match="converts DeepSeek-V2"):
        convert_mla_to_gla(llama, tmp_path / "x", shards=2, show_progress=False)
    with pytest.raises(ConversionError, match="not divisible"):
        convert_mla_to_gla(tiny, tmp_path / "y", shards=3, show_progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert_mla_to_gla(tiny, tmp_path / "full", shards=2, show_progress=False)
    assert (tmp_path / "full/keep.txt").read_text() == "mine"
    convert_mla_to_gla(tiny, tmp_path / "once", shards=2, softmax="exact", basis="hadamard", show_progress=False)
    with pytest.raises(ConversionError, match="already a sharded-latent checkpoint"):
        convert_mla_to_gla(tmp_path / "once", tmp_path / "twice", shards=2, show_progress=False)
    assert not (tmp_path / "twice").exists()
    proc = subprocess.run([sys.executable, "-m", "mla_plugin.cli", "convert", "mla-to-gla", str(llama),
                           str(tmp_path / "z"), "--shards", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "converts DeepSeek-V2" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_defaults_are_the_python_defaults():
    import inspect

    from mla_plugin.cli import build_parser

    args = build_parser().parse_args(["convert", "mla-to-gla", "SRC", "DST", "--shards", "2"])
    params = inspect.signature(convert_mla_to_gla).parameters
    for name in ("softmax", "rmsnorm", "basis", "logit_scale", "calibrate", "calib_tokens", "calib_window"):
        assert getattr(args, name) == params[name].default, name
    assert args.basis == "hadamard"
