"""The stages every converter shares, around its own per-layer math.

    source = read_source(src)                  config.json and the safetensors files
    check_destination(dst)                     a new or empty folder, checked before any work
    progress = progress_reporter(enabled)      the long loops under a tqdm bar
    write_streamed(dst / name, entries, ...)   one output file, tensor by tensor
    write_index(dst, weight_map)               model.safetensors.index.json, when the source has one
    copy_side_files(src, dst, skip=...)        tokenizer files and the rest, as they are

Streaming: a source tensor is read only when it is written (or when a converter asks for
it), so memory holds the largest tensor, not the checkpoint.
"""

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from mla_plugin.convert.safetensors_stream import StreamingWriter, read_tensor, tensor_entries

INDEX_NAME = "model.safetensors.index.json"


class ConversionError(ValueError):
    """Bad input for a converter: the message says what and how to fix it."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one source tensor lives, and its header's dtype and shape."""

    path: Path
    dtype: torch.dtype
    shape: list[int]


@dataclass
class SourceCheckpoint:
    """A checkpoint folder: its config.json, read once; its weights, read tensor by tensor."""

    path: Path
    config: dict

    @property
    def has_index(self) -> bool:
        return (self.path / INDEX_NAME).exists()

    @cached_property
    def files(self) -> list[Path]:
        """The safetensors files: those the index names (sorted), else every *.safetensors."""
        if self.has_index:
            names = sorted(set(json.loads((self.path / INDEX_NAME).read_text())["weight_map"].values()))
            return [self.path / n for n in names]
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"{self.path} has no *.safetensors files")
        return files

    @cached_property
    def tensors(self) -> dict[str, TensorEntry]:
        """Every tensor name in file order (headers only, no data read)."""
        return {name: TensorEntry(path, dtype, shape)
                for path in self.files for name, (dtype, shape) in tensor_entries(path).items()}

    def read(self, name: str) -> torch.Tensor | None:
        """One tensor as stored, or None if the checkpoint has no tensor of that name."""
        entry = self.tensors.get(name)
        return None if entry is None else read_tensor(entry.path, name)


def read_source(src) -> SourceCheckpoint:
    src = Path(src)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    return SourceCheckpoint(path=src, config=json.loads((src / "config.json").read_text()))


def check_destination(dst: Path) -> None:
    if dst.exists() and any(dst.iterdir()):
        raise ConversionError(f"{dst} exists and is not empty; give a new or empty folder")


def progress_bar(items, desc: str, enabled: bool):
    """``items`` under a tqdm bar when enabled (the converters' long loops)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


def progress_reporter(enabled: bool) -> Callable:
    """``progress(items, desc)``: ``progress_bar`` with ``enabled`` bound."""

    def progress(items, desc: str):
        return progress_bar(items, desc, enabled)

    return progress


def write_streamed(path: Path, entries: list[tuple[str, torch.dtype, list[int]]],
                   tensor_for: Callable[[str], torch.Tensor]) -> None:
    """Write one safetensors file: the header from ``entries`` (name, dtype, shape), then
    each tensor in that order, as ``tensor_for(name)`` hands it over."""
    writer = StreamingWriter(path, entries, metadata={"format": "pt"})
    for name, _, _ in entries:
        writer.write(name, tensor_for(name))
    writer.close()


def write_index(dst: Path, weight_map: dict[str, str]) -> None:
    (dst / INDEX_NAME).write_text(
        json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path, *, skip: tuple[str, ...]) -> None:
    """Copy every file of ``src`` that is not a safetensors file nor named in ``skip``
    (tokenizer, generation config, ...) as it is."""
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in skip:
            shutil.copy2(other, dst / other.name)
