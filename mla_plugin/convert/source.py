"""A source checkpoint folder, read lazily: config.json once, the safetensors headers when
first asked, each tensor's data only when a converter reads it.

    source = read_source(src)      checks the folder and config.json (a JSON object)
    source.files                   the shards the index names (each present), else every *.safetensors
    source.tensors                 name -> (file, dtype, shape), every header read and checked
    source.read(name)              one tensor as stored

Shared by the converters (through pipeline.py) and by destination.py, which reads a staged
output back with it before renaming it into place.
"""

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from mla_plugin.convert.conversion_error import ConversionError
from mla_plugin.convert.safetensors_stream import read_tensor, tensor_entries

INDEX_NAME = "model.safetensors.index.json"


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        detail = (f"line {err.lineno} column {err.colno}: {err.msg}" if isinstance(err, json.JSONDecodeError)
                  else "not UTF-8")
        raise ConversionError(f"{path} is not valid JSON ({detail}); fix the {what}") from None


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
            index = _read_json(self.path / INDEX_NAME, "index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
                raise ConversionError(f"{self.path / INDEX_NAME} has no weight_map of tensor name -> file name")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise ConversionError(f"{self.path / INDEX_NAME} names {len(missing)} missing shard(s): "
                                      f"{', '.join(missing)}; download them into {self.path}")
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
    if not src.is_dir():
        raise ConversionError(f"source {src} is not a folder; give a checkpoint folder with config.json and "
                              "*.safetensors files")
    if not (src / "config.json").is_file():
        raise ConversionError(f"{src} has no config.json")
    config = _read_json(src / "config.json", "config")
    if not isinstance(config, dict):
        raise ConversionError(f"{src / 'config.json'} is not a JSON object; fix the config")
    return SourceCheckpoint(path=src, config=config)
