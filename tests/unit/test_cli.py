"""`mla-plugin` as a user meets it: --version, every command's --help (every option with its
default, one example), the one line an approximate conversion prints, the demo leaving no
temporary folder behind (also when it fails), and the serve example's flags on a GPU.
No vLLM engine starts here: the demo's server calls are replaced by fakes that record them."""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

import mla_plugin
from mla_plugin import cli, serving
from mla_plugin.cli import approximation_note, build_parser, main
from mla_plugin.fixtures import make_tiny_deepseek_v2
from tests.paths import REPO

COMMANDS = (("demo",), ("ppl",), ("convert",), ("convert", "mla-to-gla"), ("convert", "gqa-to-mla"),
            ("make-tiny-model",))


def _subparser(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"mla-plugin {mla_plugin.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+(\S*)", mla_plugin.__version__)


def test_version_has_one_source():
    """pyproject.toml reads the version from mla_plugin.__version__; the installed metadata agrees."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    setuptools_cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools_cfg["dynamic"]["version"] == {"attr": "mla_plugin.__version__"}
    assert metadata.version("mla_plugin") == mla_plugin.__version__


def test_console_script_version():
    script = Path(sys.executable).parent / "mla-plugin"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mla-plugin {mla_plugin.__version__}", proc


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_shows_every_default_and_an_example(path, capsys):
    parser = _subparser(build_parser(), path)
    with pytest.raises(SystemExit) as stop:
        main([*path, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    example = text.split("example:\n", 1)[1].strip() if "example:\n" in text else ""
    assert example.startswith("mla-plugin " + " ".join(path[:1])), text
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        formatter = parser._get_formatter()
        formatter.add_argument(action)
        shown = " ".join(formatter.format_help().split())
        if action.required:
            assert "(required)" in shown, shown
        elif action.default is False:
            assert shown.endswith("(default: off)"), shown
        elif action.default is None:
            assert "(default: " in shown, f"{action.option_strings[0]} must say what happens without it: {shown}"
        else:
            assert shown.endswith(f"(default: {action.default})"), shown
        assert shown in " ".join(text.split()), shown


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("demo", "ppl", "convert", "make-tiny-model", "--version"):
        assert command in text


def test_build_parser_and_every_cli_function_are_short():
    import ast

    tree = ast.parse(Path(cli.__file__).read_text())
    long = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80}
    assert not long, long


# -- mla-to-gla: one line when the output is an approximation ---------------------------


@pytest.fixture(scope="module")
def tiny_mla(tmp_path_factory) -> Path:
    return make_tiny_deepseek_v2(tmp_path_factory.mktemp("cli_src"), seed=3, kv_lora_rank=64, qk_rope_head_dim=16,
                                 num_heads=4, num_layers=2, hidden_size=64)


@pytest.mark.parametrize("softmax, rmsnorm, changed", [
    ("partitioned", "global", "--softmax partitioned"),
    ("grouped", "local", "--softmax grouped --rmsnorm local"),
    ("exact", "local", "--rmsnorm local"),
    ("exact", "global", None),
])
def test_convert_prints_one_line_for_an_approximation(tiny_mla, tmp_path, capsys, softmax, rmsnorm, changed):
    dst = tmp_path / "out"
    code = main(["convert", "mla-to-gla", str(tiny_mla), str(dst), "--shards", "2", "--softmax", softmax,
                 "--rmsnorm", rmsnorm, "--basis", "identity"])
    out = capsys.readouterr().out
    assert code == 0 and (dst / "config.json").exists(), out
    notes = [line for line in out.splitlines() if line.startswith("note: ")]
    if changed is None:
        assert notes == [], out
        return
    assert len(notes) == 1, out
    assert notes[0].startswith(f"note: {changed} wrote an approximation"), notes
    assert "--softmax exact --rmsnorm global would keep the source's outputs" in notes[0]
    assert notes[0] == approximation_note(softmax, rmsnorm)


# -- demo: its temporary folder goes, whatever happens ------------------------------------


class _FakeProc:
    pid = 424242


class _Recorder:
    """Stands in for mla_plugin.serving: records the calls, fails where asked."""

    def __init__(self, fail_at: str | None):
        self.fail_at, self.calls, self.work = fail_at, [], None

    def start_server(self, model, log_path, *, serve_args=(), env=None):
        self.calls.append("start")
        self.work = Path(log_path).parent
        assert self.work.name.startswith("mla_plugin_demo_") and self.work.is_dir()
        if self.fail_at == "start":
            raise FileNotFoundError("[Errno 2] No such file or directory: 'vllm'")
        Path(log_path).write_text("server log\n")
        Path(env["MLA_PLUGIN_TRACE_FILE"]).write_text("MLA_PLUGIN decode pid=1 kernel=torch\n")
        return serving.Server(_FakeProc(), 1, Path(log_path))

    def wait_ready(self, server, timeout=400, on_tick=None):
        self.calls.append("wait")
        if self.fail_at == "wait":
            raise TimeoutError(f"vllm serve not ready after {timeout:.0f}s:\n{server.log_tail()}")

    def post_json(self, url, body, timeout=300):
        self.calls.append("post")
        return {"choices": [{"text": " 1990 by the band"}]}

    def stop_server(self, server, grace=60):
        self.calls.append("stop")


@pytest.mark.parametrize("fail_at, code, calls", [
    (None, 0, ["start", "wait", "post", "stop"]),
    ("wait", 1, ["start", "wait", "stop"]),
    ("start", 1, ["start"]),
])
def test_demo_removes_its_temporary_folder(monkeypatch, tmp_path, capsys, fail_at, code, calls):
    fake = _Recorder(fail_at)
    for name in ("start_server", "wait_ready", "post_json", "stop_server"):
        monkeypatch.setattr(serving, name, getattr(fake, name))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(["demo", "--timeout", "5"]) == code
    out, err = capsys.readouterr()
    assert fake.calls == calls
    assert fake.work is not None and fake.work.parent == tmp_path
    assert not fake.work.exists(), "the demo left its temporary folder behind"
    assert list(tmp_path.iterdir()) == []
    if code == 0:
        assert "served by mla_plugin: MLA_PLUGIN decode" in out
    else:
        assert re.search(r"^error: ", err, re.M) and "Traceback" not in err, err  # after the progress bar
    if fail_at == "start":
        assert 'pip install "mla_plugin[vllm]"' in err


# -- examples/serve_sharded_latent_tp2.sh: no CPU flags on a GPU ---------------------------


def _serve_example_args(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run the example against a fake `vllm` that records its arguments and exits at once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "vllm-args.txt"
    (bin_dir / "vllm").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\nexit 3\n')
    (bin_dir / "vllm").chmod(0o755)
    model = tmp_path / "model"
    model.mkdir()
    full_env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                                     f"{os.environ.get('PATH', '')}", **env)
    proc = subprocess.run(["bash", str(REPO / "examples/serve_sharded_latent_tp2.sh"), "--model", str(model),
                           "--port", "1"], capture_output=True, text=True, env=full_env, timeout=120)
    return proc, record.read_text().split("\n") if record.exists() else []


@pytest.mark.parametrize("env, cpu_flags", [
    ({"DEVICE": "cpu"}, True),
    ({"DEVICE": "cuda"}, False),
    ({"DEVICE": "cpu", "SERVE_EXTRA_ARGS": ""}, False),  # set and empty: no extra flags at all
    ({"DEVICE": "cuda", "SERVE_EXTRA_ARGS": "--max-model-len 4096"}, False),
])
def test_serve_example_flags(tmp_path, env, cpu_flags):
    proc, args = _serve_example_args(tmp_path, **env)
    assert proc.returncode == 1 and "vllm serve exited before it was ready" in proc.stderr, proc
    assert args[:2] == ["serve", str(tmp_path / "model")], args
    assert "--attention-backend" in args and "mla_plugin_gla" in args and "--tensor-parallel-size" in args
    assert ("--dtype" in args and "float32" in args and "--enforce-eager" in args) == cpu_flags, args
    if "SERVE_EXTRA_ARGS" in env and env["SERVE_EXTRA_ARGS"]:
        assert args[-3:-1] == ["--max-model-len", "4096"], args


def test_serve_example_refuses_an_unknown_device(tmp_path):
    proc, args = _serve_example_args(tmp_path, DEVICE="tpu")
    assert proc.returncode == 2 and "DEVICE must be auto, cpu or cuda" in proc.stderr and args == []
