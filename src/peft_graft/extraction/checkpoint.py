"""Tensor-by-tensor reading of model checkpoints (local folders or Hub repos; safetensors, sharded or not).

Nothing here loads a whole model: names, shapes and dtypes come from the safetensors headers, and each tensor (or a
range of its rows) is read only when asked for, with plain reads rather than memory maps, so a checkpoint's pages
never count towards the process's resident memory. Pickle checkpoints (``.bin`` / ``.pt``) are refused unless
explicitly allowed, because loading them can run code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import CheckpointError, PickleCheckpointError
from ..pack.layout import ADAPTER_WEIGHTS, TOKENIZER_FILES
from ..utils.jsonio import read_json
from ..utils.safetensors_io import DTYPES, TensorEntry, element_size, read_safetensors_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.jinja"]


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
        self._entries: dict[str, TensorEntry] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = _weight_files(self.folder)
        if files:
            for file in files:
                self._entries.update(read_safetensors_header(file))
        else:
            pickled = [file for pattern in ("*.bin", "*.pt", "*.pth") for file in sorted(self.folder.glob(pattern))]
            if not pickled:
                raise CheckpointError(f"no safetensors weights found in {self.source}", source=self.source)
            if not allow_pickle:
                raise PickleCheckpointError(
                    f"{self.source} only has pickle weights ({', '.join(p.name for p in pickled)}), which can run "
                    "code when loaded. Convert it to safetensors, or pass allow_pickle=True (--allow-pickle) if you "
                    "trust it.",
                    source=self.source,
                )
            self._pickled = {}
            for file in pickled:
                self._pickled.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
            self._entries = {
                name: TensorEntry(pickled[0], 0, str(t.dtype).removeprefix("torch."), tuple(t.shape))
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
        if entry.dtype not in DTYPES:
            raise CheckpointError(
                f"{name} has dtype {entry.dtype}, which peft-graft cannot read", source=self.source, tensor=name
            )
        dtype = DTYPES[entry.dtype]
        row_shape = entry.shape[1:]
        row_bytes = math.prod(row_shape) * element_size(entry.dtype)
        if not entry.shape:  # a scalar
            start, stop = 0, 1
        buffer = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(entry.file, "rb") as handle:
            handle.seek(entry.offset + start * row_bytes)
            if handle.readinto(buffer.numpy()) != buffer.numel():
                raise CheckpointError(f"{entry.file} is truncated: cannot read {name}", source=self.source, tensor=name)
        return buffer.view(dtype).reshape((stop - start, *row_shape) if entry.shape else ())

    def get_values(self, name: str, positions: list[int]) -> torch.Tensor:
        """Single elements of a tensor at flat (row-major) positions, one small read each."""
        if self._pickled is not None:
            return self._pickled[name].reshape(-1)[positions].clone()
        entry = self._entries[name]
        if entry.dtype not in DTYPES:
            raise CheckpointError(
                f"{name} has dtype {entry.dtype}, which peft-graft cannot read", source=self.source, tensor=name
            )
        size = element_size(entry.dtype)
        buffer = torch.empty(len(positions) * size, dtype=torch.uint8)
        with open(entry.file, "rb") as handle:
            for index, position in enumerate(positions):
                handle.seek(entry.offset + position * size)
                if handle.readinto(buffer[index * size : (index + 1) * size].numpy()) != size:
                    raise CheckpointError(
                        f"{entry.file} is truncated: cannot read {name}", source=self.source, tensor=name
                    )
        return buffer.view(DTYPES[entry.dtype])

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
    try:
        index = read_json(folder / SAFETENSORS_INDEX)
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{folder / SAFETENSORS_INDEX} is not valid JSON ({error})", source=folder) from None
    if index is not None:
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
            raise CheckpointError(
                f"{SAFETENSORS_INDEX}: weight_map must map tensor names to shard files", source=folder
            )
        shards = sorted(set(weight_map.values()))
        for name in shards:
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts or "\\" in name or name.startswith("~") or not path.parts:
                raise CheckpointError(
                    f"{SAFETENSORS_INDEX} names the shard {name!r}, outside the checkpoint folder; shards must be "
                    "files inside it",
                    source=folder,
                )
        return [folder / name for name in shards]
    files = sorted(folder.glob("*.safetensors"))
    return [f for f in files if f.name != ADAPTER_WEIGHTS]
