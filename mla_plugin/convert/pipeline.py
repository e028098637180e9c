"""The stages every converter shares, around its own per-layer math.

    source = read_source(src)                  config.json and the safetensors files (source.py)
    check_config_types(source, ints=...)       config.json values of the right types
    check_layer_count(source)                  num_hidden_layers against the weights' layers
    @atomic_destination                        DST written whole or not at all (destination.py):
                                               checked new or empty, locked, staged beside DST,
                                               checked again and renamed into place at the end
    progress = progress_reporter(enabled)      the long loops under a tqdm bar
    write_streamed(dst / name, entries, ...)   one output file, tensor by tensor
    write_index(dst, weight_map)               model.safetensors.index.json, when the source has one
    copy_side_files(src, dst, skip=...)        tokenizer files and the rest, as they are

Every check on the source (config types, layer count, every shard the index names
present, every safetensors header readable and covering its file) runs before the first
byte is written; a failed check raises ``ConversionError`` (an ``MLAPluginInputError``).
The converters write into a staging folder that becomes DST only when the conversion
succeeded, so a failed, interrupted or concurrent conversion never leaves a partial DST.

Streaming: a source tensor is read only when it is written (or when a converter asks for
it), so memory holds the largest tensor, not the checkpoint.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from mla_plugin.convert.conversion_error import ConversionError
from mla_plugin.convert.destination import atomic_destination  # noqa: F401 (re-exported)
from mla_plugin.convert.safetensors_stream import StreamingWriter
from mla_plugin.convert.source import (  # noqa: F401 (re-exported: the converters' one import)
    INDEX_NAME,
    SourceCheckpoint,
    TensorEntry,
    read_source,
)

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config_types(source: SourceCheckpoint, *, ints: tuple[str, ...] = (), optional_ints: tuple[str, ...] = (),
                       optional_numbers: tuple[str, ...] = ()) -> None:
    """``ints`` must be positive integers, ``optional_ints`` too where present and not null,
    ``optional_numbers`` numbers where present (``rope_theta`` also inside ``rope_parameters``)."""
    config, where = source.config, source.path / "config.json"
    for key in ints + optional_ints:
        value = config.get(key)
        if key not in ints and value is None:
            continue
        if not _is_int(value) or value <= 0:
            raise ConversionError(f"{where}: {key} must be a positive integer, got {json.dumps(value)}; fix the config")
    rope = config.get("rope_parameters")
    for key in optional_numbers:
        for scope, values in ((key, config), (f"rope_parameters.{key}", rope if isinstance(rope, dict) else {})):
            value = values.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConversionError(f"{where}: {scope} must be a number, got {json.dumps(value)}; fix the config")


def check_layer_count(source: SourceCheckpoint) -> None:
    """The weights hold exactly layers 0 .. num_hidden_layers - 1 (reads every header)."""
    declared = source.config["num_hidden_layers"] + (source.config.get("num_nextn_predict_layers") or 0)
    found = {int(m.group(1)) for name in source.tensors if (m := _LAYER_INDEX.match(name))}
    if found != set(range(declared)):
        held = f"layers {min(found)}..{max(found)} ({len(found)} distinct)" if found else "no model.layers.* tensors"
        raise ConversionError(f"{source.path / 'config.json'} says num_hidden_layers = {declared}, the weights hold "
                              f"{held}; fix num_hidden_layers or the weights")


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
