"""Read and write safetensors files one tensor at a time (memory: the largest tensor).

The format: 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range in the data section, then the data. Writing the header
first (every shape and dtype is known from the source) lets tensors be appended one by
one without ever holding a whole file in memory.
"""

import json
import math
import struct
from pathlib import Path

import torch

from mla_plugin.errors import MLAPluginInputError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    # fp8 block-quantised checkpoints (DeepSeek-V3: F8_E4M3 weights, F32 scales); copied byte for byte
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
_NAMES = {v: k for k, v in _DTYPES.items()}
_ELEMENT_BYTES = {k: torch.empty((), dtype=v).element_size() for k, v in _DTYPES.items()}


def read_header(path: Path) -> dict:
    """name -> {"dtype", "shape", "data_offsets"} (and "__metadata__" if present), checked:
    readable, every dtype known, every byte range matching its shape, the ranges covering
    the file's data section exactly (a truncated or padded file is refused)."""
    path = Path(path)
    if not path.is_file():
        raise MLAPluginInputError(f"{path} is missing; restore the safetensors file (or the index that names it)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_length = f.read(8)
        if len(raw_length) < 8:
            raise MLAPluginInputError(f"{path} is not a safetensors file ({size} bytes, shorter than the 8-byte "
                                      "header length); re-download or re-save it")
        (length,) = struct.unpack("<Q", raw_length)
        if length > size - 8:
            raise MLAPluginInputError(f"{path} is truncated: its header says {length} bytes, the file has "
                                      f"{size - 8} after the length field; re-download or re-save it")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict):
        raise MLAPluginInputError(f"{path} is not a safetensors file (its header is not a JSON object); "
                                  "re-download or re-save it")
    _check_entries(path, header, data_size=size - 8 - length)
    return header


def _check_entries(path: Path, header: dict, data_size: int) -> None:
    end_of_data = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            element_bytes = _ELEMENT_BYTES[info["dtype"]]
            shape, (begin, end) = info["shape"], info["data_offsets"]
            ok = (all(type(n) is int and n >= 0 for n in [*shape, begin, end])
                  and end - begin == math.prod(shape) * element_bytes)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise MLAPluginInputError(f"{path}: the header entry of {name} is malformed (dtype one of "
                                      f"{', '.join(_DTYPES)}, a shape, byte offsets matching it); re-save the file")
        end_of_data = max(end_of_data, end)
    if end_of_data != data_size:
        state = "truncated" if end_of_data > data_size else "longer than its header says"
        raise MLAPluginInputError(f"{path} is {state}: its tensors need {end_of_data} bytes of data, the file "
                                  f"has {data_size}; re-download or re-save it")


def tensor_entries(path: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    header = read_header(path)
    return {name: (_DTYPES[info["dtype"]], info["shape"])
            for name, info in header.items() if name != "__metadata__"}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, read with plain file reads into memory the caller owns.

    Not safetensors' safe_open: that maps the whole file copy-on-write, which counts as
    the process's own memory under a limit (RLIMIT_DATA) and in its RSS.
    """
    with open(path, "rb") as f:  # the header was checked when the source was opened (read_header)
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if name not in header:
            raise KeyError(f"{name} not in {path}")
        info = header[name]
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        out = torch.empty(info["shape"], dtype=dtype)
        if end > begin:
            f.seek(8 + length + begin)
            buffer = out.reshape(-1).view(torch.uint8).numpy()
            if f.readinto(memoryview(buffer)) != end - begin:
                raise ValueError(f"{path}: {name} is truncated")
        return out


class StreamingWriter:
    """Write a safetensors file whose tensors are given up front by (name, dtype, shape)."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, list[int]]], metadata=None):
        header, offset = {}, 0
        for name, dtype, shape in entries:
            size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
        self._order = [name for name, _, _ in entries]
        self._header = header
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._next]
        if name != expected:
            raise ValueError(f"tensors must come in header order: expected {expected}, got {name}")
        info = self._header[name]
        if _NAMES[tensor.dtype] != info["dtype"] or list(tensor.shape) != info["shape"]:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, header says "
                             f"{info['dtype']} {info['shape']}")
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # no copy
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors written")
        self._file.close()
