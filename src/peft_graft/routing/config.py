"""A router folder's configuration: ``RouterConfig`` (``router_config.json``), and where each pack comes from.

Nothing from a file is trusted: names, sources, the threshold and the classifier's shape are validated when the
config is built, and a pack path must stay inside the router folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._mixed_batch import BASE_ADAPTER
from ..errors import RoutingError, UnsafePackError
from ..utils.digest import SHA256_PATTERN

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
_PACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
# A Hub revision from a router config: a branch, tag or commit name (git's ref rules, in short), never a path
_REVISION = re.compile(r"(?!.*\.\.)(?!.*//)[A-Za-z0-9][A-Za-z0-9._/-]{0,199}(?<![./])")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Bounds on a router's classifier: far above any real router, far below what a hostile file could make us allocate.
_MAX_ROUTER_WIDTH = 1 << 16
_ROUTER_FIELDS = {"embedding_dim", "hidden_size", "dropout", "labels"}


def check_pack_name(name: object) -> None:
    if not isinstance(name, str) or name == BASE_ADAPTER or not _PACK_NAME.match(name):
        raise RoutingError(f"invalid pack name {name!r}: use letters, digits, '_' or '-', starting with a letter")


def inside(root: Path, relative: str) -> Path:
    """`relative` under `root`, refusing absolute paths and paths that leave `root`."""
    path = Path(relative)
    if path.is_absolute() or relative.startswith("~"):
        raise UnsafePackError(
            f"{ROUTER_CONFIG}: pack path {relative!r} is absolute; paths must stay in the router folder", path=relative
        )
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePackError(f"{ROUTER_CONFIG}: pack path {relative!r} leaves the router folder", path=relative)
    return resolved


@dataclass(frozen=True)
class PackSource:
    """Where a pack comes from: a local folder, or a Hub repo id at a revision (pinned to `commit` once pulled)."""

    location: str
    revision: str | None = None
    commit: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.location).expanduser().is_dir()

    def to_json(self, router_dir: Path) -> dict[str, Any]:
        """Hub packs by repo id, revision and commit; local packs by their path inside the router folder."""
        if not self.is_local:
            return {"repo_id": self.location, "revision": self.revision, "commit": self.commit}
        path = Path(self.location).expanduser().resolve()
        return {"path": path.relative_to(router_dir.resolve()).as_posix()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], router_dir: Path) -> PackSource:
        if not isinstance(data, Mapping):
            raise RoutingError(f"{ROUTER_CONFIG}: a pack source must be an object, got {data!r}")
        if "repo_id" in data:
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(str(data["repo_id"]))
            except HFValidationError as error:
                raise RoutingError(f"{ROUTER_CONFIG}: invalid pack repo id {data['repo_id']!r} ({error})") from None
            revision, commit = data.get("revision"), data.get("commit")
            if revision is not None and not (isinstance(revision, str) and _REVISION.fullmatch(revision)):
                raise RoutingError(
                    f"{ROUTER_CONFIG}: pack revision {str(revision)[:80]!r} is not a branch, tag or commit name"
                )
            if commit is not None and not (isinstance(commit, str) and _COMMIT.fullmatch(commit)):
                raise RoutingError(f"{ROUTER_CONFIG}: pack commit {str(commit)[:80]!r} is not a 40-hex-digit commit id")
            return cls(str(data["repo_id"]), revision, commit)
        if "path" in data:
            return cls(str(inside(router_dir, str(data["path"]))))
        raise RoutingError(f"a pack source needs 'path' or 'repo_id', got {dict(data)}")

    def folder(self, token: str | bool | None = None) -> Path:
        """The pack's local folder, downloading it first (at its pinned commit, if any) when it is on the Hub."""
        from ..hub import pull_pack
        from ..pack.folder import PackFolder

        if self.is_local:
            return PackFolder(Path(self.location).expanduser()).path
        return pull_pack(self.location, revision=self.commit or self.revision, token=token)


@dataclass
class RouterConfig:
    """The contents of ``router_config.json``, validated on construction.

    `packs` maps each label to its source as stored (``{"path": ...}`` inside the folder, or ``{"repo_id": ...,
    "revision": ..., "commit": ...}``); `router` is the classifier's shape (``GraftRouter.config()``) or None.
    """

    labels: list[str] = field(default_factory=list)
    packs: dict[str, dict[str, Any]] = field(default_factory=dict)
    embedder: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    router: dict[str, Any] | None = None
    manual: dict[str, str] | None = None
    base_model_name_or_path: str | None = None
    base_model_fingerprint: str | None = None
    weights_sha256: str | None = None  # of router.safetensors, recorded by save_router, checked before loading it
    format_version: int = ROUTER_FORMAT_VERSION

    def __post_init__(self) -> None:
        if isinstance(self.format_version, bool) or not isinstance(self.format_version, int):
            raise RoutingError(f"{ROUTER_CONFIG}: format_version must be an integer, got {self.format_version!r}")
        if self.format_version > ROUTER_FORMAT_VERSION:
            raise RoutingError(
                f"this router was saved by a newer peft-graft (format {self.format_version}); upgrade to load it"
            )
        labels, packs = self.labels, self.packs
        if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
            raise RoutingError(f"{ROUTER_CONFIG}: 'labels' must be a non-empty list of pack names")
        for label in labels:
            check_pack_name(label)
        if len(set(labels)) != len(labels):
            raise RoutingError(f"{ROUTER_CONFIG}: labels repeat: {labels}")
        if not isinstance(packs, dict) or sorted(packs) != sorted(labels):
            raise RoutingError(f"{ROUTER_CONFIG}: the labels {labels} do not match the packs {list(packs or [])}")
        if not isinstance(self.embedder, dict):
            raise RoutingError(f"{ROUTER_CONFIG}: 'embedder' must be an object")
        threshold = self.threshold
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
            raise RoutingError(f"{ROUTER_CONFIG}: threshold must be a number or null, got {threshold!r}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise RoutingError(f"{ROUTER_CONFIG}: threshold must be in [0, 1], got {threshold}")
        if self.router is not None:
            if not isinstance(self.router, dict) or self.router.get("labels") != labels:
                raise RoutingError(f"{ROUTER_CONFIG}: the router's labels must be {labels}")
            if not set(self.router) <= _ROUTER_FIELDS:
                unknown = sorted(set(self.router) - _ROUTER_FIELDS)
                raise RoutingError(f"{ROUTER_CONFIG}: unknown router fields {unknown}")
            dropout = self.router.get("dropout", 0.0)
            if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
                raise RoutingError(f"{ROUTER_CONFIG}: router.dropout must be a number in [0, 1), got {dropout!r}")
            for key in ("embedding_dim", "hidden_size"):
                value = self.router.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_ROUTER_WIDTH:
                    raise RoutingError(
                        f"{ROUTER_CONFIG}: router.{key} must be an integer in [1, {_MAX_ROUTER_WIDTH}], got {value!r}"
                    )
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and SHA256_PATTERN.fullmatch(self.weights_sha256)
        ):
            raise RoutingError(f"{ROUTER_CONFIG}: weights_sha256 must be 64 lowercase hex digits")
        manual = self.manual
        if manual is not None and not (
            isinstance(manual, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in manual.items())
        ):
            raise RoutingError(f"{ROUTER_CONFIG}: 'manual' must map task types to pack names")

    def sources(self, folder: Path) -> dict[str, PackSource]:
        """Each label's pack source; local paths are resolved inside `folder` (and refused if they leave it)."""
        return {label: PackSource.from_json(self.packs[label], folder) for label in self.labels}

    @classmethod
    def read(cls, folder: str | os.PathLike) -> RouterConfig:
        """``router_config.json`` of a router folder, validated (pack paths included)."""
        from ..pack.folder import check_confined

        folder = Path(folder)
        file = folder / ROUTER_CONFIG
        if not file.is_file():
            raise RoutingError(f"{folder} has no {ROUTER_CONFIG}")
        check_confined([file, folder / ROUTER_WEIGHTS], folder, str(folder))
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RoutingError(f"{file} is not valid JSON ({error})") from None
        if not isinstance(data, dict):
            raise RoutingError(f"{file} must hold a JSON object")
        known = set(cls.__dataclass_fields__)
        config = cls(**{"format_version": 0, **{key: value for key, value in data.items() if key in known}})
        config.sources(folder)  # refuses paths leaving the folder
        if config.router is not None and not (folder / ROUTER_WEIGHTS).is_file():
            raise RoutingError(f"{folder} has a trained router in {ROUTER_CONFIG} but no {ROUTER_WEIGHTS}")
        return config

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"
