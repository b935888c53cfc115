"""Tensor-by-tensor reading of model checkpoints (local folders or Hub repos; safetensors, sharded or not).

Nothing here loads a whole model: names, shapes and dtypes come from the safetensors headers, and each tensor is
read only when asked for. Pickle checkpoints (``.bin`` / ``.pt``) are refused unless explicitly allowed, because
loading them can run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

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
        self.config: dict[str, Any] = _read_json(self.folder / "config.json") or {}
        self._location: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] | None = None
        files = _weight_files(self.folder)
        if files:
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                        self._location[name] = file
        else:
            pickled = (
                sorted(self.folder.glob("*.bin")) + sorted(self.folder.glob("*.pt")) + sorted(self.folder.glob("*.pth"))
            )
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
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                self._pickled.update(state)
            self._location = dict.fromkeys(self._pickled, Path(pickled[0]))
        self._handles: dict[Path, Any] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def shape(self, name: str) -> tuple[int, ...]:
        return self._metadata(name)[0]

    def dtype(self, name: str) -> str:
        """The stored dtype, as safetensors names it (``F32``, ``BF16``, ``F16``, ...)."""
        return self._metadata(name)[1]

    def numel(self, name: str) -> int:
        shape = self.shape(name)
        count = 1
        for size in shape:
            count *= size
        return count

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (and nothing else) from disk."""
        if self._pickled is not None:
            return self._pickled[name]
        return self._handle(self._location[name]).get_tensor(name)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / name for name in TOKENIZER_FILES if (self.folder / name).is_file()]

    def close(self) -> None:
        self._handles.clear()

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def _metadata(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            if self._pickled is not None:
                tensor = self._pickled[name]
                self._meta[name] = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            else:
                tensor_slice = self._handle(self._location[name]).get_slice(name)
                self._meta[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        return self._meta[name]


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
    index = _read_json(folder / SAFETENSORS_INDEX)
    if index is not None:
        return sorted({folder / name for name in index["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    return [f for f in files if f.name != "adapter_model.safetensors"]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
