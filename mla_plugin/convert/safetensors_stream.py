"""Read and write safetensors files one tensor at a time (memory: the largest tensor).

The format: 8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range in the data section, then the data. Writing the header
first (every shape and dtype is known from the source) lets tensors be appended one by
one without ever holding a whole file in memory.
"""

import json
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: Path) -> dict:
    """name -> {"dtype", "shape", "data_offsets"} (and "__metadata__" if present)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def tensor_entries(path: Path) -> dict[str, tuple[torch.dtype, list[int]]]:
    header = read_header(path)
    return {name: (_DTYPES[info["dtype"]], info["shape"])
            for name, info in header.items() if name != "__metadata__"}


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, read with plain file reads into memory the caller owns.

    Not safetensors' safe_open: that maps the whole file copy-on-write, which counts as
    the process's own memory under a limit (RLIMIT_DATA) and in its RSS.
    """
    with open(path, "rb") as f:
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
