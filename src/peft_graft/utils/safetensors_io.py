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
        return math.prod(self.shape) * _BITS.get(self.dtype, 8) // 8


def element_size(dtype: str) -> int:
    return max(1, _BITS.get(dtype, 8) // 8)


# Bits per element of every dtype safetensors knows; any other name is refused, as safetensors does.
_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8}
_BITS |= {"F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32}
_BITS |= {"F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_MAX_DIMENSIONS = 8


def read_safetensors_header(file: Path) -> dict[str, TensorEntry]:
    """The tensor index of a safetensors file, validated as strictly as safetensors' own reader does, without
    allocating anything its sizes ask for: every entry is ``{"dtype": str, "shape": [int, ...], "data_offsets":
    [begin, end]}``, its byte count matches its shape, and the entries tile the data exactly up to the end of the
    file. Anything else is a :class:`CheckpointError` naming the file and the tensor."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short)", source=file)
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{file} is not a safetensors file (header length {length})", source=file)
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise CheckpointError(
                f"{file} is not a safetensors file (unreadable header: {error})", source=file
            ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} is not a safetensors file (header is not a JSON object)", source=file)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{file}: __metadata__ must map names to strings", source=file)
    data_start = 8 + length
    entries = {}
    spans = []
    for name, info in header.items():
        entry, begin, end = _entry(file, name, info, data_start)
        entries[name] = entry
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise CheckpointError(
                f"{file}: {name} starts at byte {begin} of the data, expected {position} (tensors must tile the data "
                "without gaps or overlaps)",
                source=file,
                tensor=name,
            )
        position = end
    if size != data_start + position:
        raise CheckpointError(
            f"{file} is {'truncated' if size < data_start + position else 'longer than its header says'}: {size} "
            f"bytes, its header needs {data_start + position}",
            source=file,
        )
    return entries


def _entry(file: Path, name: str, info: object, data_start: int) -> tuple[TensorEntry, int, int]:
    """One header entry, type-checked before any size in it is used."""

    def refuse(problem: str) -> CheckpointError:
        return CheckpointError(f"{file}: header entry {name!r} {problem}", source=file, tensor=name)

    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise refuse("must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _BITS:
        raise refuse(f"has an unknown dtype {str(dtype)[:40]!r}")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMENSIONS and all(_is_count(d) for d in shape)):
        raise refuse(f"has an invalid shape (a list of at most {_MAX_DIMENSIONS} non-negative integers expected)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise refuse("has invalid data_offsets (two non-negative integers expected)")
    begin, end = offsets
    if end < begin:
        raise refuse(f"ends (byte {end}) before it begins (byte {begin})")
    bits = math.prod(shape) * _BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise refuse(f"claims {end - begin} bytes but its shape needs {bits / 8:g}")
    return TensorEntry(file, data_start + begin, dtype, tuple(shape)), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


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
