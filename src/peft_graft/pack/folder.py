"""A SkillPack folder on disk, validated once: what every reader of a pack goes through.

``PackFolder(path)`` checks that the folder holds a GRAFT ``adapter_config.json`` and a complete safetensors weight
file (pickle weights are refused, whatever their name), then exposes the config, the safetensors header (bytes per
module, without reading tensor data) and the extraction report.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import BudgetError, CheckpointError, GraftConfigError, PackFormatError, UnsafePackError
from ..utils.atomic import write_folder
from ..utils.digest import file_sha256
from ..utils.jsonio import read_json
from ..utils.safetensors_io import TensorEntry, copy_files, read_safetensors_header, write_safetensors
from . import layout

if TYPE_CHECKING:
    from ..config import GraftConfig

logger = logging.getLogger(__name__)

ALLOW_UNVERIFIED_ENV = "PEFT_GRAFT_ALLOW_UNVERIFIED"
_ALLOW_UNVERIFIED: ContextVar[bool] = ContextVar("peft_graft_allow_unverified", default=False)


@contextmanager
def allow_unverified_weights() -> Iterator[None]:
    """Load packs and routers whose weight file does not match the SHA-256 their config recorded, with a warning
    instead of a PackFormatError: for weights you changed on purpose. ``PEFT_GRAFT_ALLOW_UNVERIFIED=1`` does the same
    process-wide."""
    token = _ALLOW_UNVERIFIED.set(True)
    try:
        yield
    finally:
        _ALLOW_UNVERIFIED.reset(token)


def verify_weights(recorded: object, file: Path, where: str, saver: str = "save_pretrained") -> None:
    """Check a weight file against the SHA-256 its config recorded when it was saved (catches flipped bytes that a
    valid safetensors header does not show). A file saved before hashes were recorded loads with a warning."""
    if recorded is None:
        logger.warning("%s carries no content hash of its weights (saved by an older peft-graft); loading it "
                       "unverified. Save it again with %s to record one.", where, saver)  # fmt: skip
        return
    actual = file_sha256(file)
    if actual == recorded:
        return
    message = (
        f"{where}: {file.name} does not match the SHA-256 recorded when it was saved ({actual[:16]}... instead of "
        f"{str(recorded)[:16]}...): it was changed or damaged since. If it was downloaded, download it again "
        "(force_download=True); if you changed it on purpose, save it again with " + saver + ", or load it "
        f"unverified within peft_graft.allow_unverified_weights() (or {ALLOW_UNVERIFIED_ENV}=1)."
    )
    if _ALLOW_UNVERIFIED.get() or os.environ.get(ALLOW_UNVERIFIED_ENV, "").lower() in ("1", "true", "yes"):
        logger.warning("%s Loading it anyway, as allowed.", message)
        return
    raise PackFormatError(message, path=file)


def validate_pack_config(config: Any, where: str) -> None:
    """Refuse an adapter_config.json that is not a valid GRAFT config (before anything is attached)."""
    from ..config import GraftConfig

    if not isinstance(config, dict):
        raise PackFormatError(f"{where}: {layout.ADAPTER_CONFIG} must hold a JSON object", path=where)
    peft_type = config.get("peft_type")
    if peft_type != layout.PEFT_TYPE:
        raise PackFormatError(
            f"{where}: {layout.ADAPTER_CONFIG} has peft_type {peft_type!r}, not {layout.PEFT_TYPE!r}; this is not a "
            "SkillPack (load other adapter types with PEFT directly)",
            path=where,
        )
    known = set(GraftConfig.__dataclass_fields__)
    try:
        GraftConfig(**{key: value for key, value in config.items() if key in known})
    except (GraftConfigError, TypeError, ValueError) as error:
        raise PackFormatError(f"{where}: invalid {layout.ADAPTER_CONFIG}: {error}", path=where) from None


def check_pack_weights(file: str | os.PathLike, where: str) -> dict[str, TensorEntry]:
    """The header of a pack's weight file, checked to be a complete safetensors file (catches damaged downloads)."""
    try:
        return read_safetensors_header(Path(file))
    except CheckpointError as error:
        raise PackFormatError(
            f"{where}: the pack weights are damaged ({error}). If they were downloaded, download them again "
            "(force_download=True) or check the repo.",
            path=file,
        ) from None


def check_confined(files: Iterable[Path], root: Path, where: str) -> None:
    """Refuse files that are symlinks leading out of `root` (loading or uploading them would read whatever they point
    at). Links inside `root` are fine, and so are the Hub cache's own links from a snapshot to its repo's blobs."""
    root = Path(root).resolve()
    for file in files:
        if not file.is_symlink():
            continue
        target = file.resolve()
        if target.is_relative_to(root) or _is_hub_cache_blob(target, root):
            continue
        raise UnsafePackError(
            f"{where}: {file.name} is a symbolic link to {target}, outside the folder; a pack or router folder must "
            "hold its own files (copy the file in instead of linking it)",
            path=file,
        )


def _is_hub_cache_blob(target: Path, root: Path) -> bool:
    """Whether `root` lies in a huggingface_hub cache snapshot and `target` in the same repo's blobs."""
    for snapshot in (root, *root.parents):
        if snapshot.parent.name == "snapshots":
            return target.is_relative_to(snapshot.parent.parent / "blobs")
    return False


def is_pack_folder(path: Path) -> bool:
    """Whether `path` is a SkillPack folder (its adapter_config.json says GRAFT): what an overwrite may replace."""
    try:
        config = read_json(Path(path) / layout.ADAPTER_CONFIG)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == layout.PEFT_TYPE


def is_adapter_folder(path: Path) -> bool:
    """A PEFT adapter folder of any method (what an adapter export may replace)."""
    return (Path(path) / layout.ADAPTER_CONFIG).is_file()


def pickle_refusal(source: str, pickled: list[str]) -> UnsafePackError:
    """The error for a pack that offers only pickle weights."""
    return UnsafePackError(
        f"{source} offers only pickle weights ({', '.join(pickled)}), which can run code when loaded; SkillPacks "
        "load from safetensors only. Re-save the pack with safe_serialization=True.",
        path=source,
    )


class PackFolder:
    """A validated SkillPack folder. `require_weights=False` accepts a folder whose weights are not written yet."""

    def __init__(self, path: str | os.PathLike, *, require_weights: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path} is not a folder")
        config_file = self.path / layout.ADAPTER_CONFIG
        check_confined(self.files(), self.path, str(self.path))
        if not config_file.is_file():
            raise PackFormatError(
                f"{self.path} has no {layout.ADAPTER_CONFIG}: it is not a SkillPack folder", path=self.path
            )
        try:
            self.config: dict[str, Any] = read_json(config_file)
        except (UnicodeDecodeError, ValueError) as error:
            raise PackFormatError(
                f"{self.path}: {layout.ADAPTER_CONFIG} is not valid JSON ({error})", path=self.path
            ) from None
        validate_pack_config(self.config, str(self.path))
        self.header: dict[str, TensorEntry] = {}
        if self.weights_file.is_file():
            self.header = check_pack_weights(self.weights_file, str(self.path))
            verify_weights(self.config.get("weights_sha256"), self.weights_file, str(self.path))
        elif require_weights:
            pickled = [name for name in layout.PICKLE_WEIGHTS if (self.path / name).exists()]
            if pickled:
                raise pickle_refusal(str(self.path), pickled)
            raise PackFormatError(f"{self.path} has no {layout.ADAPTER_WEIGHTS}", path=self.path)

    @property
    def weights_file(self) -> Path:
        return self.path / layout.ADAPTER_WEIGHTS

    @property
    def config_file(self) -> Path:
        return self.path / layout.ADAPTER_CONFIG

    @cached_property
    def graft_config(self) -> GraftConfig:
        from ..config import GraftConfig

        return GraftConfig.from_pretrained(str(self.path))

    @cached_property
    def report(self) -> dict[str, Any] | None:
        """``graft_report.json`` (extracted packs), or None."""
        return read_json(self.path / layout.REPORT_FILE)

    @property
    def pack_bytes(self) -> int:
        return self.weights_file.stat().st_size if self.weights_file.is_file() else 0

    @property
    def has_tokenizer(self) -> bool:
        """Whether the pack carries a tokenizer (its fine-tune changed the vocabulary)."""
        return (self.path / layout.TOKENIZER_CONFIG).is_file()

    def files(self) -> list[Path]:
        """The pack's own files present in the folder (what is uploaded)."""
        return [self.path / name for name in layout.PACK_FILES if (self.path / name).is_file()]

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace ``adapter_config.json`` (validated first, written atomically) and re-render the model card."""
        from ..utils.atomic import write_file
        from .card import write_pack_card

        validate_pack_config(config, str(self.path))
        write_file(self.config_file, json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.config = config
        self.__dict__.pop("graft_config", None)
        write_pack_card(self)

    def module_bytes(self) -> dict[str, tuple[str, int]]:
        """{module name: (form, bytes)}, from the safetensors header alone."""
        sizes: dict[str, int] = defaultdict(int)
        attributes: dict[str, set[str]] = defaultdict(set)
        for key, entry in self.header.items():
            split = layout.split_key(key)
            if split is None:
                continue
            module, relative = split
            attributes[module].add(relative.split(".")[0])
            sizes[module] += entry.nbytes
        forms = {}
        for module, names in attributes.items():
            form = layout.LOWRANK if "graft_S" in names else layout.SPARSE if "graft_indices" in names else layout.DENSE
            forms[module] = (form, sizes[module])
        return forms

    def tensors(self, device: str = "cpu") -> dict[str, torch.Tensor]:
        """All tensors of the weight file, as stored."""
        from safetensors.torch import load_file

        return load_file(self.weights_file, device=device)

    def modules(self, device: str = "cpu") -> dict[str, dict[str, torch.Tensor]]:
        """The stored tensors grouped by module: ``{module name: {relative key: tensor}}``."""
        return layout.modules_of(self.tensors(device))


def write_pack(
    output_dir: Path,
    tensors: Mapping[str, TensorEntry],
    config: GraftConfig,
    *,
    report: Callable[[int], dict[str, Any]] | None = None,
    files: Iterable[Path] = (),
    overwrite: bool = False,
    max_bytes: int | None = None,
) -> None:
    """Write a pack folder atomically (no partial pack ever looks valid): the weight file assembled from staged
    tensors (`tensors`: pack key -> where its bytes are, streamed, never held whole), the config, `files` (e.g. a
    tokenizer), ``report(pack_bytes)`` as the report, and the card.

    A weight file larger than `max_bytes` is refused (BudgetError) and nothing is written.
    """
    from .card import write_pack_card

    def write(staging: Path) -> None:
        write_safetensors(staging / layout.ADAPTER_WEIGHTS, tensors, {"format": "pt"})
        pack_bytes = (staging / layout.ADAPTER_WEIGHTS).stat().st_size
        if max_bytes is not None and pack_bytes > max_bytes:
            raise BudgetError(
                f"the planned pack is {pack_bytes} bytes, over the budget of {max_bytes} bytes "
                "(a planner bug: please report it)"
            )
        config.save_pretrained(str(staging))
        copy_files(list(files), staging)
        if report is not None:
            text = json.dumps(report(pack_bytes), indent=2) + "\n"
            (staging / layout.REPORT_FILE).write_text(text, encoding="utf-8")
        write_pack_card(staging, repo_id=output_dir.name)

    write_folder(output_dir, write, overwrite=overwrite, replaceable=is_pack_folder, kind="SkillPack folder")
