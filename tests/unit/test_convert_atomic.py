"""Converters are atomic (issue 12, item 3): DST appears whole or not at all.

A conversion killed while writing (SIGKILL) leaves no DST, and the rerun gives the same
bytes as an uninterrupted run; two conversions into one new DST at once: exactly one
fails, with one line, and the other's output is complete; an exception mid-write leaves
neither DST nor anything beside it; every check on the source runs before the first
tensor is written. No vLLM.

The killed and concurrent cases run `mla-plugin convert` in a subprocess whose streaming
writer stalls after its first tensor (patched in that subprocess only), so the kill and
the second conversion land while the first is provably mid-write.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from safetensors.torch import load_file, save_file

from mla_plugin.cli import main
from mla_plugin.convert import pipeline, safetensors_stream
from mla_plugin.convert.destination import lock_path, staging_path
from mla_plugin.convert.gqa_to_mla import convert_gqa_to_mla
from mla_plugin.convert.mla_to_gla import convert_mla_to_gla
from mla_plugin.convert.pipeline import ConversionError
from mla_plugin.fixtures import make_tiny_llama
from tests.converters import exact_settings, tiny_deepseek

# Runs the CLI with the streaming writer stalled after its first tensor: it writes that
# tensor, flushes, creates MARKER, then waits until RELEASE exists ("-": never; the child
# gives up after 10 minutes whatever happens to the test).
STALLED_CLI = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mla_plugin.convert.safetensors_stream import StreamingWriter

    marker, release = Path(sys.argv[1]), sys.argv[2]
    write = StreamingWriter.write

    def write_then_stall(self, name, tensor):
        write(self, name, tensor)
        if self._next == 1:
            self._file.flush()
            marker.write_text(name)
            give_up = time.monotonic() + 600
            while release == "-" or not Path(release).exists():
                if time.monotonic() > give_up:
                    os._exit(3)
                time.sleep(0.05)

    StreamingWriter.write = write_then_stall
    from mla_plugin.cli import main
    sys.exit(main(sys.argv[3:]))
""")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic_sources")
    llama = make_tiny_llama(root / "llama", seed=31, num_heads=4, num_kv_heads=2)
    return {"mla-to-gla": tiny_deepseek(root / "deepseek"), "gqa-to-mla": llama}


def _cli(kind: str, src: Path, dst: Path) -> list[str]:
    if kind == "mla-to-gla":
        return ["convert", "mla-to-gla", str(src), str(dst), "--shards", "2"]
    settings = exact_settings(str(src))
    return ["convert", "gqa-to-mla", str(src), str(dst), "--kv-lora-rank", str(settings["kv_lora_rank"]),
            "--rope-dim", str(settings["rope_dim"])]


def _convert(kind: str, src: Path, dst: Path):
    if kind == "mla-to-gla":
        return convert_mla_to_gla(src, dst, shards=2, show_progress=False)
    return convert_gqa_to_mla(src, dst, show_progress=False, **exact_settings(str(src)))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _beside(dst: Path) -> list[str]:
    """What lies in DST's parent folder, DST itself included."""
    return sorted(p.name for p in dst.parent.iterdir())


@contextmanager
def _stalled_conversion(tmp_path: Path, cli: list[str], release: str = "-") -> Iterator[subprocess.Popen]:
    """The CLI in a subprocess, yielded once it has written its first tensor and stalled;
    killed on the way out if still running."""
    marker = tmp_path / f"first-tensor-written-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", STALLED_CLI, str(marker), release, *cli],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"the conversion ended before writing: {proc.communicate()}")
            assert time.monotonic() < deadline, "the conversion never started writing"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _assert_one_line_error(returncode: int, stderr: str, *phrases: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert any(phrase in lines[0] for phrase in phrases), stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["mla-to-gla", "gqa-to-mla"])
def test_killed_conversion_leaves_no_dst_and_the_rerun_matches(sources, tmp_path, kind):
    work = tmp_path / "work"
    work.mkdir()
    reference = tmp_path / "reference"
    _convert(kind, sources[kind], reference)
    dst = work / "out"

    with _stalled_conversion(tmp_path, _cli(kind, sources[kind], dst)) as proc:
        staged = staging_path(dst) / "model.safetensors"
        assert staged.stat().st_size > 8, "the killed run had not written its first tensor yet"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists(), "a killed conversion left a DST"
    assert staging_path(dst).is_dir() and lock_path(dst).is_file()  # a kill cleans nothing: the rerun must

    assert main(_cli(kind, sources[kind], dst)) == 0, "the leftovers of the killed run blocked the rerun"
    assert _files(dst) == _files(reference), "the rerun differs from an uninterrupted conversion"
    assert _beside(dst) == ["out"], "the rerun left the killed run's staging folder or lock behind"


def test_a_second_conversion_into_a_dst_being_written_fails_with_one_line(sources, tmp_path, capsys):
    kind, src = "mla-to-gla", sources["mla-to-gla"]
    reference = tmp_path / "reference"
    _convert(kind, src, reference)
    work = tmp_path / "work"
    work.mkdir()
    dst, release = work / "out", tmp_path / "release"

    with _stalled_conversion(tmp_path, _cli(kind, src, dst), release=str(release)) as first:
        second = main(_cli(kind, src, dst))  # while the first holds the lock, mid-write
        line = _assert_one_line_error(second, capsys.readouterr().err, "another conversion is writing")
        assert str(dst) in line
        with pytest.raises(ConversionError, match="another conversion is writing"):
            _convert(kind, src, dst)  # the Python API: the same error
        assert not dst.exists(), "the refused conversions wrote into DST"
        release.touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    assert _files(dst) == _files(reference), "the surviving conversion's output is incomplete or wrong"
    assert _beside(dst) == ["out"]


def test_two_conversions_started_together_one_fails(sources, tmp_path):
    """No stall: whichever order they reach the lock, exactly one writes DST."""
    kind, src = "gqa-to-mla", sources["gqa-to-mla"]
    reference = tmp_path / "reference"
    _convert(kind, src, reference)
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "out"
    cli = [sys.executable, "-m", "mla_plugin.cli", *_cli(kind, src, dst)]
    procs = [subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = []
        for p in procs:
            _, err = p.communicate(timeout=300)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    _assert_one_line_error(*next(r for r in results if r[0] == 2), "another conversion is writing",
                           "exists and is not empty")
    assert _files(dst) == _files(reference)
    assert _beside(dst) == ["out"]


def _writer_fails_at_second_tensor(monkeypatch, error: BaseException):
    """The streaming writer raises ``error`` at the tensor after the first (disk full, Ctrl-C)."""
    write = safetensors_stream.StreamingWriter.write

    def failing_write(writer, name, tensor):
        if writer._next == 1:
            raise error
        write(writer, name, tensor)

    monkeypatch.setattr(safetensors_stream.StreamingWriter, "write", failing_write)


def _unreadable_source_tensor(monkeypatch, error: BaseException):
    """A copied (not converted) source tensor fails to read while the output is written."""
    from mla_plugin.convert import mla_to_gla

    read = mla_to_gla.read_tensor

    def failing_read(path, name):
        if name == "model.norm.weight":
            raise error
        return read(path, name)

    monkeypatch.setattr(mla_to_gla, "read_tensor", failing_read)


FAILURES = {
    "disk-full": (lambda mp: _writer_fails_at_second_tensor(mp, OSError(errno.ENOSPC, "No space left on device")),
                  OSError),
    "interrupted": (lambda mp: _writer_fails_at_second_tensor(mp, KeyboardInterrupt()), KeyboardInterrupt),
    "source-tensor-unreadable": (lambda mp: _unreadable_source_tensor(mp, ValueError("model.norm.weight is "
                                                                                     "truncated")), ValueError),
}


@pytest.mark.parametrize("dst_exists", [False, True], ids=["new-dst", "empty-dst"])
@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failure_mid_write_leaves_nothing(sources, tmp_path, monkeypatch, failure, dst_exists):
    install, error_type = FAILURES[failure]
    wrote = []
    writer_init = safetensors_stream.StreamingWriter.__init__

    def recording_init(writer, path, *args, **kwargs):
        wrote.append(Path(path))
        writer_init(writer, path, *args, **kwargs)

    monkeypatch.setattr(safetensors_stream.StreamingWriter, "__init__", recording_init)
    install(monkeypatch)
    work = tmp_path / "work"
    work.mkdir()
    dst = work / "deeper" / "out"
    if dst_exists:
        dst.mkdir(parents=True)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    with pytest.raises(error_type):
        _convert("mla-to-gla", sources["mla-to-gla"], dst)
    assert wrote and wrote[0].parent == staging_path(dst), "the failure came before any writing"
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before, "the failed conversion left files"
    assert dst.is_dir() == dst_exists and (not dst_exists or not any(dst.iterdir()))


def test_an_empty_existing_dst_is_filled(sources, tmp_path):
    """DST may be an existing empty folder (as before): it is replaced by the converted checkpoint."""
    reference, dst = tmp_path / "reference", tmp_path / "work" / "out"
    _convert("gqa-to-mla", sources["gqa-to-mla"], reference)
    dst.mkdir(parents=True)
    _convert("gqa-to-mla", sources["gqa-to-mla"], dst)
    assert _files(dst) == _files(reference) and _beside(dst) == ["out"]


def _copy_with(src: Path, dst: Path, *, drop=(), config=None) -> Path:
    """``src`` copied with the tensors named in ``drop`` removed and config.json values changed."""
    shutil.copytree(src, dst)
    if drop:
        weights = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in weights.items() if not any(k.startswith(d) for d in drop)},
                  str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config:
        values = json.loads((dst / "config.json").read_text())
        values.update(config)
        (dst / "config.json").write_text(json.dumps(values))
    return dst


def _truncated(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    data = (dst / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[:-64])
    return dst


BAD_SOURCES = {
    "mla-fewer-layers-than-weights": ("mla-to-gla", lambda s, d: _copy_with(s, d, config={"num_hidden_layers": 1}),
                                      "num_hidden_layers = 1"),
    "mla-layer-without-kv_b_proj": ("mla-to-gla", lambda s, d: _copy_with(
        s, d, drop=("model.layers.1.self_attn.kv_b_proj",)), "missing ['kv_b_proj']"),
    "mla-layer-without-attention-latent": ("mla-to-gla", lambda s, d: _copy_with(s, d, drop=(
        "model.layers.1.self_attn.kv_",)), "layers [1] have no MLA attention weights"),
    "mla-truncated-weights": ("mla-to-gla", _truncated, "is truncated"),
    "gqa-more-layers-than-weights": ("gqa-to-mla", lambda s, d: _copy_with(s, d, config={"num_hidden_layers": 3}),
                                     "num_hidden_layers = 3"),
    "gqa-layer-without-k_proj": ("gqa-to-mla", lambda s, d: _copy_with(
        s, d, drop=("model.layers.1.self_attn.k_proj",)), "missing tensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_every_source_check_runs_before_the_first_byte(sources, tmp_path, monkeypatch, case):
    kind, make, phrase = BAD_SOURCES[case]
    src = make(sources[kind], tmp_path / "src")

    def no_writing(*args, **kwargs):
        raise AssertionError("a tensor was written before the source was refused")

    monkeypatch.setattr(pipeline, "StreamingWriter", no_writing)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match=phrase.replace("[", r"\[").replace("]", r"\]")):
        _convert(kind, src, dst)
    assert _beside(dst) == ["src"], "the refused conversion left something beside DST"


def test_the_staging_folder_is_checked_before_the_rename(sources, tmp_path, monkeypatch):
    """A converter that writes a damaged file (here: one tensor short of its header) never
    becomes DST."""
    write = pipeline.write_streamed

    def short_write(path, entries, tensor_for):
        write(path, entries, tensor_for)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 4)

    monkeypatch.setattr(pipeline, "write_streamed", short_write)
    from mla_plugin.convert import mla_to_gla

    monkeypatch.setattr(mla_to_gla, "write_streamed", short_write)
    dst = tmp_path / "out"
    with pytest.raises(ConversionError, match="failed its final check.*is truncated"):
        _convert("mla-to-gla", sources["mla-to-gla"], dst)
    assert _beside(dst) == []
