"""Safetensors headers: where each tensor's bytes are, read without touching the tensor data.

A safetensors file is an 8-byte little-endian header length, that many bytes of JSON (name -> dtype, shape, data
offsets), then the data. Every size in the header is checked against the file before anything relies on it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
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
# safetensors writes tensor data by dtype, in descending order of its Dtype enum, then by name. Only the dtypes a
# pack or a checkpoint uses are listed; a test keeps this in step with safetensors' own writer.
_WRITE_ORDER = {"BOOL": 0, "U8": 4, "I8": 5, "I16": 9, "U16": 10, "F16": 11, "BF16": 12, "I32": 13, "U32": 14}
_WRITE_ORDER |= {"F32": 15, "F64": 17, "I64": 18, "U64": 19}
_COPY_CHUNK = 64 << 20


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


def write_safetensors(
    path: Path, entries: Mapping[str, TensorEntry], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file whose tensors are read from other files (`entries`, by name), chunk by chunk.

    The bytes are those ``safetensors.torch.save_file`` writes for the same tensors and metadata; no tensor is ever
    held in memory whole, so a pack assembled from staged parts costs one copy buffer.
    """
    order = sorted(entries, key=lambda name: (-_WRITE_ORDER[entries[name].dtype], name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        entry = entries[name]
        header[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name in order:
            entry = entries[name]
            with open(entry.file, "rb") as source:
                source.seek(entry.offset)
                remaining = entry.nbytes
                while remaining:
                    chunk = source.read(min(remaining, _COPY_CHUNK))
                    if not chunk:
                        raise CheckpointError(f"{entry.file} is truncated: cannot read {name}", source=entry.file)
                    out.write(chunk)
                    remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())


def copy_files(files: Sequence[Path], folder: Path) -> None:
    """Copy files into a folder, keeping their names."""
    for file in files:
        shutil.copy2(file, folder / file.name)
