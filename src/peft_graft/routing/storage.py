"""Router folders on disk and on the Hub: save, push and pull them (loading is RoutedGraftModel.from_pretrained).

A router folder holds ``router_config.json``, ``router.safetensors`` (the trained classifier), a model card, and the
packs that were local when it was saved, under ``packs/<name>``; packs from the Hub stay references (repo id and
commit). Writes go to a staging folder first, so a failed save leaves the previous router intact.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError, RoutingError
from ..hub import hub_errors, upload_files
from ..pack.card import router_card, write_card
from ..pack.folder import PackFolder, verify_weights
from ..pack.layout import CARD_FILE, PACK_FILES
from ..utils.atomic import follow_umask
from ..utils.digest import file_sha256
from ..utils.safetensors_io import DTYPES, read_safetensors_header
from .config import ROUTER_CONFIG, ROUTER_WEIGHTS, RouterConfig, inside

if TYPE_CHECKING:
    from .classifier import GraftRouter
    from .routed_model import RoutedGraftModel


def save_router(routed: RoutedGraftModel, directory: str | os.PathLike) -> None:
    """Write a routed model's router folder (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".router.", dir=directory))
    try:
        packs: dict[str, dict[str, Any]] = {}
        copied = []
        for name, source in routed.sources.items():
            location = Path(source.location).expanduser().resolve() if source.is_local else None
            if location is not None and not location.is_relative_to(directory.resolve()):
                _copy_pack(location, staging / "packs" / name)
                copied.append(name)
                packs[name] = {"path": f"packs/{name}"}
            else:
                packs[name] = source.to_json(directory)
        config = routed.router_config(packs)
        if routed.router is not None:
            save_file({k: v.contiguous() for k, v in routed.router.state_dict().items()}, staging / ROUTER_WEIGHTS)
            config.weights_sha256 = file_sha256(staging / ROUTER_WEIGHTS)
        (staging / ROUTER_CONFIG).write_text(config.to_json(), encoding="utf-8")
        write_card(router_card(asdict(config), repo_id=directory.resolve().name), staging)
        follow_umask(staging)
        for name in copied:
            target = directory / "packs" / name
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / "packs" / name, target)
        for name in (ROUTER_WEIGHTS, CARD_FILE, ROUTER_CONFIG):
            if (staging / name).exists():
                os.replace(staging / name, directory / name)
            elif (directory / name).exists():
                (directory / name).unlink()  # a router saved before training has no weights
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_router(
    cls: type[RoutedGraftModel],
    base_model,
    directory: str | os.PathLike,
    tokenizer=None,
    *,
    embedder=None,
    revision: str | None = None,
    token: str | bool | None = None,
    force: bool = False,
    **options: Any,
) -> RoutedGraftModel:
    """A router folder (or Hub repo id) as a routed model on `base_model`: packs attached, classifier loaded."""
    from .classifier import BaseModelEmbedder

    folder = Path(directory).expanduser()
    if not folder.is_dir():
        folder = pull_router(str(directory), revision=revision, token=token)
    config = RouterConfig.read(folder)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base_model.name_or_path)
    spec = config.embedder
    if spec.get("type") != BaseModelEmbedder.spec_type and embedder is None:
        raise RoutingError(
            f"this router was trained with a custom embedder ({spec.get('name', 'unknown')}); pass the same "
            "embedder=... to from_pretrained"
        )
    routed = cls.from_packs(
        base_model,
        config.sources(folder),
        tokenizer,
        threshold=config.threshold,
        manual=config.manual,
        force=force,
        token=token,
        **options,
    )
    if embedder is not None:
        routed.embedder = embedder
    else:
        if spec.get("max_length"):
            routed.embedder.max_length = int(spec["max_length"])
        # routers saved before `layers` existed embed with every layer, as they were trained
        routed.embedder.layers = int(spec["layers"]) if spec.get("layers") is not None else None
    if config.router is not None:
        verify_weights(config.weights_sha256, folder / ROUTER_WEIGHTS, str(folder), saver="save_router")
        routed.router = _load_classifier(config.router, folder / ROUTER_WEIGHTS)
    return routed


def _load_classifier(shape: dict[str, Any], file: Path) -> GraftRouter:
    """The router's classifier from its weight file, whose header must hold exactly the tensors (names, shapes,
    dtypes) of a classifier of `shape`: checked on the meta device before anything is allocated, so a config
    declaring a huge router costs nothing. Non-finite weights are refused."""
    from safetensors.torch import load_file

    from .classifier import GraftRouter

    try:
        header = read_safetensors_header(file)
    except CheckpointError as error:
        raise RoutingError(f"the router weights are damaged ({error})") from None
    with torch.device("meta"):
        expected = GraftRouter(**shape).state_dict()
    found = {name: (entry.dtype, entry.shape) for name, entry in header.items()}
    dtype_names = {dtype: name for name, dtype in DTYPES.items()}
    wanted = {name: (dtype_names[t.dtype], tuple(t.shape)) for name, t in expected.items()}
    if found != wanted:
        raise RoutingError(
            f"{file.name} does not hold the classifier {ROUTER_CONFIG} describes (expected {wanted}, found "
            f"{dict(list(found.items())[:8])}): the router folder is inconsistent; save it again with save_router"
        )
    state = load_file(file)
    if not all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point()):
        raise RoutingError(f"{file.name} holds NaN or Inf weights; the router must be trained again")
    router = GraftRouter(**shape)
    router.load_state_dict(state)
    return router.eval()


def push_router_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: list[str] | None = None,
) -> str:
    """Upload a saved router folder (config, weights, card, packs under ``packs/``) as one commit; returns its id."""
    root = Path(folder).resolve()
    config = RouterConfig.read(root)
    files = [root / ROUTER_CONFIG] + ([root / ROUTER_WEIGHTS] if (root / ROUTER_WEIGHTS).is_file() else [])
    for source in config.packs.values():
        if "path" in source:
            files += PackFolder(inside(root, source["path"])).files()
    card = str(router_card(asdict(config), repo_id=repo_id, tags=tags)).encode("utf-8")
    return upload_files(
        repo_id,
        files,
        {CARD_FILE: card},
        root=root,
        revision=revision,
        tag=tag,
        private=private,
        token=token,
        commit_message=commit_message or "Upload SkillPack router with peft-graft",
        commit_description=commit_description,
        create_pr=create_pr,
    )


def pull_router(
    repo_id: str,
    local_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download a router (config, weights, card and the packs stored with it) and validate it; returns its folder.
    Packs it references on the Hub are downloaded when the router is loaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise RoutingError(f"{repo_id} is neither a router folder nor a Hub repo id") from None
    patterns = [ROUTER_CONFIG, ROUTER_WEIGHTS, CARD_FILE, *(f"packs/*/{name}" for name in PACK_FILES)]
    with hub_errors("pull the router", repo_id, revision):
        folder = Path(
            snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns, local_dir=local_dir)
        )
    config = RouterConfig.read(folder)
    for source in config.packs.values():
        if "path" in source:
            PackFolder(inside(folder, source["path"]))
    return folder


def _copy_pack(source: Path, target: Path) -> None:
    """Copy a pack's own files (nothing else from its folder)."""
    target.mkdir(parents=True)
    for file in PackFolder(source).files():
        shutil.copy2(file, target / file.name)
