"""Safetensors headers: where each tensor's bytes are, read without touching the tensor data.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON (name -> dtype, shape, data
offsets), then the data. Every size in the header is checked against the file before anything relies on it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100_000_000


class TensorEntry:
    """Where one tensor's bytes are: file, offset of its first byte, dtype name and shape."""

    __slots__ = ("dtype", "file", "offset", "shape")

    def __init__(self, file: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> None:
        self.file, self.offset, self.dtype, self.shape = file, offset, dtype, shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * element_size(self.dtype)


def element_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size() if dtype in DTYPES else 1


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """The tensor index of a safetensors file, checked against the file's size."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short)", source=file)
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{file} is not a safetensors file (header length {length})", source=file)
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"{file} is not a safetensors file (unreadable header: {error})", source=file
            ) from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file} is not a safetensors file (header is not a JSON object)", source=file)
    data_start = 8 + length
    entries = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        data_end = max(data_end, end)
        entry = TensorEntry(file, data_start + begin, info["dtype"], tuple(info["shape"]))
        expected = math.prod(entry.shape) * element_size(entry.dtype)
        if entry.dtype in DTYPES and end - begin != expected:
            raise CheckpointError(
                f"{file}: {name} claims {end - begin} bytes but its shape needs {expected}", source=file, tensor=name
            )
        entries[name] = entry
    if file.stat().st_size < data_start + data_end:
        raise CheckpointError(
            f"{file} is truncated: {file.stat().st_size} bytes, its header needs {data_start + data_end}", source=file
        )
    return entries
