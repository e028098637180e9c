"""Every bad input is one line on stderr, ``error: ...``, exit code 2, never a traceback;
the Python API raises ``MLAPluginInputError`` with the same message (issue 12, item 4).

One table: each case builds its bad input from the bundled trained fixtures in a tmp
folder and names the CLI arguments, the equivalent Python call and a phrase of the
message. The CLI runs in-process (``mla_plugin.cli.main``) for every case and as a real
subprocess for a few. No case gets as far as starting vLLM or writing an output byte.
"""

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from mla_plugin.cli import main
from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.errors import MLAPluginInputError
from mla_plugin.eval.eval_text import check_calibration_text, is_evaluation_text
from mla_plugin.eval.perplexity import perplexity
from mla_plugin.fixtures import trained_fixture
from tests.paths import wikitext_file

MLA = "deepseek-v2-tiny"
GQA = "llama-gqa-tiny"
GQA_EXACT = dict(kv_lora_rank=64, rope_dim=64)  # 2 kv heads x head_dim 32: the exact form, no calibration


@dataclass
class Case:
    cli: list[str]
    api: Callable[[], object]
    phrase: str
    dst: Path | None = None  # must not exist afterwards: nothing was written


def _copy(name: str, tmp: Path) -> Path:
    """The fixture with its own config.json and a link to the (read-only) weights."""
    src = tmp / name
    src.mkdir()
    for f in trained_fixture(name).iterdir():
        if f.suffix == ".safetensors":
            (src / f.name).symlink_to(f)
        else:
            shutil.copy2(f, src / f.name)
    return src


def _edit_config(src: Path, **changes) -> Path:
    config = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if key == "rope_theta" and "rope_parameters" in config:
            config["rope_parameters"]["rope_theta"] = value
        else:
            config[key] = value
    (src / "config.json").write_text(json.dumps(config))
    return src


def _replace_weights(src: Path, data: bytes) -> Path:
    weights = src / "model.safetensors"
    weights.unlink()
    weights.write_bytes(data)
    return src


def _mla_case(src: Path, tmp: Path, phrase: str, *extra: str, dst: Path | None = None, **api) -> Case:
    dst = dst or tmp / "out"
    options = {"shards": 2, "show_progress": False, **api}
    return Case(["convert", "mla-to-gla", str(src), str(dst), "--shards", "2", *extra],
                lambda: convert_mla_to_gla(src, dst, **options), phrase, dst if not dst.exists() else None)


def _gqa_case(src: Path, tmp: Path, phrase: str, calib_text: Path | None = None) -> Case:
    dst = tmp / "out"
    settings = dict(GQA_EXACT) if calib_text is None else dict(kv_lora_rank=48, rope_dim=16, freqfold=2,
                                                                calib_text=calib_text)
    cli = ["convert", "gqa-to-mla", str(src), str(dst)]
    for key, value in settings.items():
        cli += ["--" + key.replace("_", "-"), str(value)]
    return Case(cli, lambda: convert_gqa_to_mla(src, dst, show_progress=False, **settings), phrase, dst)


def _not_utf8_file(tmp: Path) -> Path:
    path = tmp / "latin1.txt"
    path.write_bytes("café, naïve\n".encode("latin-1") * 200)
    return path


def _ppl_case(tmp: Path, phrase: str, *, model: str | None = None, text: bytes = b"Some text.\n\n" * 50,
              max_windows: int | None = None, dtype: str = "float32") -> Case:
    model = model or str(trained_fixture(MLA))
    text_path = tmp / "text.txt"
    text_path.write_bytes(text)
    cli = ["ppl", model, "--engine", "transformers", "--text", str(text_path), "--window", "16", "--dtype", dtype]
    if max_windows is not None:
        cli += ["--max-windows", str(max_windows)]
    return Case(cli, lambda: perplexity(model, engine="transformers", text_path=text_path, window=16,
                                        max_windows=max_windows, dtype=dtype, show_progress=False), phrase)


def _index_naming_missing_shard(tmp: Path) -> Case:
    src = _copy(MLA, tmp)
    header_len = int.from_bytes((src / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((src / "model.safetensors").read_bytes()[8 : 8 + header_len])
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    weight_map["model.layers.3.mlp.down_proj.weight"] = "model-00002-of-00002.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return _mla_case(src, tmp, "missing shard(s): model-00002-of-00002.safetensors")


def _test_split_excerpt(tmp: Path) -> Path:
    """A few paragraphs from the middle of the wikitext-2 test split."""
    path = tmp / "excerpt.txt"
    path.write_text(wikitext_file("test.raw.txt").read_text(encoding="utf-8")[50_000:60_000], encoding="utf-8")
    return path


def _weights(name: str) -> bytes:
    return (trained_fixture(name) / "model.safetensors").read_bytes()


CASES: dict[str, Callable[[Path], Case]] = {
    "safetensors-truncated": lambda t: _mla_case(
        _replace_weights(_copy(MLA, t), _weights(MLA)[: len(_weights(MLA)) // 2]), t, "is truncated"),
    "safetensors-4-bytes": lambda t: _mla_case(
        _replace_weights(_copy(MLA, t), b"\x00\x01\x02\x03"), t, "is not a safetensors file"),
    "gqa-safetensors-truncated": lambda t: _gqa_case(
        _replace_weights(_copy(GQA, t), _weights(GQA)[:-100]), t, "is truncated"),
    "kv_lora_rank-string": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), kv_lora_rank="512"), t, 'kv_lora_rank must be a positive integer, got "512"'),
    "heads-float": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), num_attention_heads=8.0), t, "num_attention_heads must be a positive integer"),
    "heads-list": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), num_attention_heads=[8]), t, "num_attention_heads must be a positive integer"),
    "qk_nope_head_dim-null": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), qk_nope_head_dim=None), t, "qk_nope_head_dim must be a positive integer, got null"),
    "num_key_value_heads-string": lambda t: _gqa_case(
        _edit_config(_copy(GQA, t), num_key_value_heads="2"), t, "num_key_value_heads must be a positive integer"),
    "rope_theta-string": lambda t: _gqa_case(
        _edit_config(_copy(GQA, t), rope_theta="10000"), t, "rope_theta must be a number"),
    "config-invalid-json": lambda t: _mla_case(
        _replace_config_text(_copy(MLA, t), '{"model_type": "deepseek_v2",'), t, "is not valid JSON"),
    "more-layers-than-weights": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), num_hidden_layers=5), t, "num_hidden_layers = 5, the weights hold layers 0..3"),
    "fewer-layers-than-weights": lambda t: _mla_case(
        _edit_config(_copy(MLA, t), num_hidden_layers=3), t, "num_hidden_layers = 3, the weights hold layers 0..3"),
    "gqa-more-layers-than-weights": lambda t: _gqa_case(
        _edit_config(_copy(GQA, t), num_hidden_layers=6), t, "says num_hidden_layers = 6"),
    "logit-scale-abc": lambda t: _mla_case(
        trained_fixture(MLA), t, "logit_scale (--logit-scale) must be a number or 'auto', got 'abc'",
        "--softmax", "partitioned", "--logit-scale", "abc", softmax="partitioned", logit_scale="abc"),
    # the options' checks name config keys for --hf-overrides users; the converter names its flags
    "shards-zero": lambda t: _mla_case(trained_fixture(MLA), t, "--shards must be a positive integer, got 0",
                                       "--shards", "0", shards=0),
    "shards-not-dividing-the-latent": lambda t: _mla_case(
        trained_fixture(MLA), t, "kv_lora_rank 512 is not divisible by --shards 3", "--shards", "3", shards=3),
    "logit-scale-negative": lambda t: _mla_case(
        trained_fixture(MLA), t, "--logit-scale must be a positive number, got -1.0", "--logit-scale", "-1",
        logit_scale=-1.0),
    "dst-is-a-file": lambda t: _mla_case(trained_fixture(MLA), t, "is a file; give a new or empty folder",
                                         dst=_touch(t / "dst-file")),
    "index-names-missing-shard": _index_naming_missing_shard,
    "gqa-calib-text-not-utf8": lambda t: _gqa_case(trained_fixture(GQA), t, "is not UTF-8", _not_utf8_file(t)),
    "calib-text-is-eval-text": lambda t: _mla_case(
        trained_fixture(MLA), t, "is the evaluation text", "--basis", "pca-act", "--calib-text",
        str(wikitext_file("test.raw.txt")), basis="pca-act", calib_text=wikitext_file("test.raw.txt")),
    "gqa-calib-text-is-eval-text": lambda t: _gqa_case(trained_fixture(GQA), t, "--allow-eval-text",
                                                       _test_split_excerpt(t)),
    "ppl-max-windows-negative": lambda t: _ppl_case(t, "max_windows (--max-windows) must be a positive integer",
                                                    max_windows=-1),
    "ppl-max-windows-zero": lambda t: _ppl_case(t, "max_windows (--max-windows) must be a positive integer",
                                                max_windows=0),
    "ppl-text-not-utf8": lambda t: _ppl_case(t, "is not UTF-8", text=b"caf\xe9 \xff\xfe text\n" * 20),
    "ppl-missing-model-directory": lambda t: _ppl_case(t, "does not exist", model=str(t / "no-such-model")),
    "ppl-dtype-float33": lambda t: _ppl_case(
        t, "dtype (--dtype) must be one of float32, bfloat16, float16, got 'float33'", dtype="float33"),
}
SUBPROCESS_CASES = ("safetensors-truncated", "logit-scale-abc", "ppl-max-windows-negative")


def _replace_config_text(src: Path, text: str) -> Path:
    (src / "config.json").write_text(text)
    return src


def _touch(path: Path) -> Path:
    path.write_text("not a folder\n")
    return path


def _assert_one_line_error(returncode: int, stderr: str, case: Case) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert case.phrase in lines[0], stderr
    assert not re.search(r"mla_plugin\.\w", lines[0]), "name the flag, not the config key: " + lines[0]
    if case.dst is not None:
        assert not case.dst.exists(), "bytes were written before the input was refused"


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_one_line_exit_2(tmp_path, capsys, name):
    case = CASES[name](tmp_path)
    returncode = main(case.cli)
    _assert_one_line_error(returncode, capsys.readouterr().err, case)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_cli_subprocess_one_line_exit_2(tmp_path, name):
    case = CASES[name](tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mla_plugin.cli", *case.cli], capture_output=True, text=True,
                          timeout=300)
    _assert_one_line_error(proc.returncode, proc.stderr, case)


@pytest.mark.parametrize("name", sorted(CASES))
def test_api_raises_package_error(tmp_path, name):
    case = CASES[name](tmp_path)
    with pytest.raises(MLAPluginInputError) as raised:
        case.api()
    assert case.phrase in str(raised.value) and "\n" not in str(raised.value)
    if case.dst is not None:
        assert not case.dst.exists()


def test_evaluation_text_recognised_by_content():
    """The test split and an excerpt of it are the evaluation text; the validation text is not."""
    test = wikitext_file("test.raw.txt").read_text(encoding="utf-8")
    valid = wikitext_file("valid.tokens.txt").read_text(encoding="utf-8")
    assert is_evaluation_text(test) and is_evaluation_text(test[50_000:60_000])
    assert is_evaluation_text(valid[:100_000] + test[50_000:60_000])  # mixed in
    assert not is_evaluation_text(valid) and not is_evaluation_text("a short line\n")
    check_calibration_text(test, "test.raw.txt", allow_eval_text=True)  # the user said so: no error
