"""Tensor-by-tensor reading of model checkpoints (local folders or Hub repos; safetensors, sharded or not).

Nothing here loads a whole model: names, shapes and dtypes come from the safetensors headers, and each tensor (or a
range of its rows) is read only when asked for, with plain reads rather than memory maps, so a checkpoint's pages
never count towards the process's resident memory. Pickle checkpoints (``.bin`` / ``.pt``) are refused unless
explicitly allowed, because loading them can run code.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, PickleCheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Files a fine-tune's tokenizer may consist of; a pack carries them when the fine-tune changed the vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]
_DTYPES = {
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


class _Entry:
    """Where one tensor's bytes are: file, offset of its first byte, dtype name and shape."""

    __slots__ = ("dtype", "file", "offset", "shape")

    def __init__(self, file: Path, offset: int, dtype: str, shape: tuple[int, ...]) -> None:
        self.file, self.offset, self.dtype, self.shape = file, offset, dtype, shape

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _element_size(self.dtype)


class CheckpointReader:
    """Read the tensors of one checkpoint lazily.

    `source` is a local folder or a Hub repo id (downloaded with ``snapshot_download``, safetensors and JSON only).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.source = str(source)
        self.revision = revision
        self.folder = _resolve_folder(self.source, revision, token)
        self.config: dict[str, Any] = read_json(self.folder / "config.json") or {}
        self._entries: dict[str, _Entry] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = _weight_files(self.folder)
        if files:
            for file in files:
                self._entries.update(read_safetensors_header(file))
        else:
            pickled = [file for pattern in ("*.bin", "*.pt", "*.pth") for file in sorted(self.folder.glob(pattern))]
            if not pickled:
                raise CheckpointError(f"no safetensors weights found in {self.source}")
            if not allow_pickle:
                raise PickleCheckpointError(
                    f"{self.source} only has pickle weights ({', '.join(p.name for p in pickled)}), which can run "
                    "code when loaded. Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you "
                    "trust it."
                )
            self._pickled = {}
            for file in pickled:
                self._pickled.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            self._entries = {
                name: _Entry(pickled[0], 0, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                for name, t in self._pickled.items()
            }

    @property
    def commit(self) -> str | None:
        """The Hub commit the checkpoint was downloaded at (None for a local folder)."""
        return commit_of(self.folder)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (``F32``, ``BF16``, ``F16``, ...)."""
        return self._entries[name].dtype

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (and nothing else) from disk."""
        return self.get_rows(name, 0, self.shape(name)[0] if self.shape(name) else 1)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (along its first dimension), read without touching the others."""
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor[start:stop].clone() if tensor.dim() else tensor.clone()
        entry = self._entries[name]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{name} has dtype {entry.dtype}, which peft-graft cannot read")
        dtype = _DTYPES[entry.dtype]
        row_shape = entry.shape[1:]
        row_bytes = math.prod(row_shape) * _element_size(entry.dtype)
        if not entry.shape:  # a scalar
            start, stop = 0, 1
        buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(entry.file, "rb") as handle:
            handle.seek(entry.offset + start * row_bytes)
            if handle.readinto(buffer.numpy()) != buffer.numel():
                raise CheckpointError(f"{entry.file} is truncated: cannot read {name}")
        return buffer.view(dtype).reshape((stop - start, *row_shape) if entry.shape else ())

    def get_values(self, name: str, positions: list[int]) -> torch.Tensor:
        """Single elements of a tensor at flat (row-major) positions, one small read each."""
        if self._pickled is not None:
            return self._pickled[name].reshape(-1)[positions].clone()
        entry = self._entries[name]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{name} has dtype {entry.dtype}, which peft-graft cannot read")
        size = _element_size(entry.dtype)
        buffer = torch.empty(len(positions) * size, dtype=torch.uint8)
        with open(entry.file, "rb") as handle:
            for index, position in enumerate(positions):
                handle.seek(entry.offset + position * size)
                if handle.readinto(buffer[index * size : (index + 1) * size].numpy()) != size:
                    raise CheckpointError(f"{entry.file} is truncated: cannot read {name}")
        return buffer.view(_DTYPES[entry.dtype])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]


def commit_of(folder: str | os.PathLike) -> str | None:
    """The Hub commit of a folder in the huggingface_hub cache (``.../snapshots/<sha>``), else None."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and len(folder.name) == 40:
        return folder.name
    return None


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=_DTYPES[dtype]).element_size() if dtype in _DTYPES else 1


def read_safetensors_header(file: Path) -> dict[str, _Entry]:
    """The tensor index of a safetensors file: an 8-byte little-endian length, then that many bytes of JSON."""
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", prefix)
        if length > 100_000_000:
            raise CheckpointError(f"{file} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{file} is not a safetensors file (unreadable header: {error})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{file} is not a safetensors file (header is not a JSON object)")
    data_start = 8 + length
    entries = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        data_end = max(data_end, end)
        entry = _Entry(file, data_start + begin, info["dtype"], tuple(info["shape"]))
        expected = math.prod(entry.shape) * _element_size(entry.dtype)
        if entry.dtype in _DTYPES and end - begin != expected:
            raise CheckpointError(f"{file}: {name} claims {end - begin} bytes but its shape needs {expected}")
        entries[name] = entry
    if file.stat().st_size < data_start + data_end:
        raise CheckpointError(
            f"{file} is truncated: {file.stat().st_size} bytes, its header needs {data_start + data_end}"
        )
    return entries


def _resolve_folder(source: str, revision: str | None, token: str | bool | None) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the folder that holds the checkpoint")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = snapshot_download(source, revision=revision, token=token, allow_patterns=_DOWNLOAD_PATTERNS)
    except HFValidationError as error:
        raise CheckpointError(f"{source} is neither a local folder nor a valid Hub repo id") from error
    folder = Path(folder)
    if not _weight_files(folder):
        from huggingface_hub import list_repo_files

        pickled = [f for f in list_repo_files(source, revision=revision, token=token) if f.endswith((".bin", ".pt"))]
        if pickled:
            raise PickleCheckpointError(
                f"{source} only offers pickle weights ({', '.join(pickled[:3])}); convert it to safetensors first"
            )
    return folder


def _weight_files(folder: Path) -> list[Path]:
    index = read_json(folder / SAFETENSORS_INDEX)
    if index is not None:
        return sorted({folder / name for name in index["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    return [f for f in files if f.name != "adapter_model.safetensors"]


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
