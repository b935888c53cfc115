"""RoutedGraftModel: many SkillPacks on one base, one pack chosen per query.

Every query of a batch is routed on its own (a classifier over base-model embeddings, or a manual task-type map) and
the whole batch then runs once, each row with its pack (PEFT mixed batches; ``"__base__"`` rows use no pack). Nothing
global changes per request, so concurrent requests with different packs are independent. For single-skill traffic,
merged mode adds the chosen pack to the base weights instead, and swaps packs when the route changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .cards import CARD_FILE, router_card, write_card
from .checkpoint import commit_of, read_json
from .errors import UnsafePackError
from .hub import ADAPTER_CONFIG, PACK_FILES, check_pack_folder, hub_errors, pull_pack, upload_files
from .layer import BASE_ADAPTER
from .provenance import allow_base_mismatch
from .router import BaseModelEmbedder, GraftRouter, ManualRouter, QueryEmbedder, RoutingError

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
_PACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


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
            return cls(str(data["repo_id"]), data.get("revision"), data.get("commit"))
        if "path" in data:
            return cls(str(_inside(router_dir, str(data["path"]))))
        raise RoutingError(f"a pack source needs 'path' or 'repo_id', got {dict(data)}")

    def folder(self, token: str | bool | None = None) -> Path:
        """The pack's local folder, downloading it first (at its pinned commit, if any) when it is on the Hub."""
        if self.is_local:
            return check_pack_folder(Path(self.location).expanduser())
        return pull_pack(self.location, revision=self.commit or self.revision, token=token)


def _inside(root: Path, relative: str) -> Path:
    """`relative` under `root`, refusing absolute paths and paths that leave `root`."""
    path = Path(relative)
    if path.is_absolute() or relative.startswith("~"):
        raise UnsafePackError(
            f"{ROUTER_CONFIG}: pack path {relative!r} is absolute; paths must stay in the router folder"
        )
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UnsafePackError(f"{ROUTER_CONFIG}: pack path {relative!r} leaves the router folder")
    return resolved


class RoutedGraftModel:
    """A base model carrying several SkillPacks, with top-1 routing per query.

    Build it with :meth:`from_packs` (or :meth:`from_pretrained`), train the classifier with :meth:`fit_router`,
    then call it like a model or use :meth:`generate`. Train the router on prompts formatted the way they will be sent
    (e.g. with the chat template), because the default router embeds exactly the tokens it is given.
    """

    def __init__(
        self,
        model,
        tokenizer,
        sources: Mapping[str, PackSource],
        *,
        router: GraftRouter | None = None,
        embedder: QueryEmbedder | None = None,
        threshold: float | None = None,
        manual: Mapping[str, str] | Callable[[str], str] | None = None,
        merged: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.sources = dict(sources)
        self.router = router
        self.embedder = embedder if embedder is not None else BaseModelEmbedder(model, tokenizer)
        self.threshold = threshold
        self.manual = ManualRouter(manual) if manual is not None else None
        self.merged = merged
        self._merge_lock = threading.Lock()
        self._merged_pack: str | None = None
        self.model.eval()

    # ----- building ----------------------------------------------------------------------------------------

    @classmethod
    def from_packs(
        cls,
        base_model,
        packs: Mapping[str, str | os.PathLike | PackSource],
        tokenizer,
        *,
        force: bool = False,
        token: str | bool | None = None,
        **options: Any,
    ) -> RoutedGraftModel:
        """Load `packs` ({name: folder, Hub repo id or PackSource}) onto `base_model` as named adapters.

        Every pack is checked (and Hub packs downloaded) before the first one is attached: the packs must share one
        base fingerprint, and attaching verifies it against `base_model`. `force=True` attaches to another base with
        a warning instead.
        """
        from peft import PeftModel

        if not packs:
            raise RoutingError("from_packs needs at least one pack")
        sources = {name: _as_source(source) for name, source in packs.items()}
        folders = {name: _pack_folder(name, source, tokenizer, token) for name, source in sources.items()}
        sources = {name: _pinned(source, folders[name]) for name, source in sources.items()}
        _check_one_base(folders)
        model = None
        with allow_base_mismatch() if force else contextlib.nullcontext():
            for name, folder in folders.items():
                if model is None:
                    model = PeftModel.from_pretrained(base_model, str(folder), adapter_name=name)
                else:
                    model.load_adapter(str(folder), adapter_name=name)
        _check_same_base(model)
        return cls(model, tokenizer, sources, **options)

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    @property
    def base_fingerprint(self) -> str | None:
        """The base-model fingerprint the loaded packs record (None for packs that record none)."""
        return next(
            (c.base_model_fingerprint for c in self.model.peft_config.values() if c.base_model_fingerprint), None
        )

    def add_pack(
        self,
        name: str,
        source: str | os.PathLike | PackSource,
        *,
        force: bool = False,
        token: str | bool | None = None,
    ) -> None:
        """Load another pack; the base and the other packs are untouched. Refit the router to route to it."""
        if name in self.sources:
            raise RoutingError(f"a pack named {name!r} is already loaded")
        source = _as_source(source)
        folder = _pack_folder(name, source, self.tokenizer, token)
        _check_one_base({**{n: None for n in self.sources}, name: folder}, known=self.base_fingerprint)
        with self._merge_lock:
            if self._merged_pack is not None:  # attaching checks the base weights, which must be unmerged
                self.model.unmerge_adapter()
                self._merged_pack = None
            with allow_base_mismatch() if force else contextlib.nullcontext():
                self.model.load_adapter(str(folder), adapter_name=name)
            self.sources[name] = _pinned(source, folder)
            self.model.eval()
        if self.router is not None:
            self.router = _with_label(self.router, name)

    def remove_pack(self, name: str) -> None:
        """Unload a pack; the router stops predicting it, and the other packs' outputs do not change."""
        if name not in self.sources:
            raise RoutingError(f"no pack named {name!r}; loaded packs: {', '.join(self.labels)}")
        if len(self.sources) == 1:
            raise RoutingError("cannot remove the last pack")
        with self._merge_lock:
            if self._merged_pack is not None:
                self.model.unmerge_adapter()
                self._merged_pack = None
            self.model.delete_adapter(name)
            del self.sources[name]
        if self.router is not None:
            self.router = _without_label(self.router, name)

    # ----- routing -----------------------------------------------------------------------------------------

    def fit_router(
        self, examples: Mapping[str, Sequence[str]], *, hidden_size: int = 256, **fit_options: Any
    ) -> list[float]:
        """Train the classifier router on {pack name: example prompts}; returns the training losses."""
        unknown = set(examples) - set(self.labels)
        if unknown:
            raise RoutingError(
                f"examples name unknown packs: {', '.join(sorted(unknown))}; loaded: {', '.join(self.labels)}"
            )
        missing = [label for label in self.labels if not examples.get(label)]
        if missing:
            raise RoutingError(f"packs without examples: {', '.join(missing)}; give a few prompts for every pack")
        texts = [text for label in self.labels for text in examples[label]]
        targets = torch.tensor([index for index, label in enumerate(self.labels) for _ in examples[label]])
        embeddings = self.embedder(texts)
        self.router = GraftRouter(embeddings.shape[1], self.labels, hidden_size=hidden_size)
        return self.router.fit(embeddings, targets, **fit_options)

    def route(
        self,
        prompts: Sequence[str] | None = None,
        *,
        task_types: Sequence[str] | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> list[tuple[str, float]]:
        """The pack (or ``"__base__"``) and its probability for each query, given as texts or token ids."""
        if task_types is not None:
            if self.manual is None:
                raise RoutingError("task_types need a manual router: pass manual={task type: pack} when building")
            routes = [(self.manual(task), 1.0) for task in task_types]
            self._check_names([name for name, _ in routes])
            return routes
        if self.router is None:
            raise RoutingError("the router is not trained: call fit_router(...) first, or route with task_types")
        if prompts is not None:
            if not prompts:
                raise RoutingError("there are no prompts to route")
            embeddings = self.embedder(list(prompts))
        elif input_ids is not None:
            if isinstance(self.embedder, BaseModelEmbedder):
                embeddings = self.embedder.embed_tokens(input_ids, attention_mask)
            else:
                embeddings = self.embedder(self.tokenizer.batch_decode(input_ids, skip_special_tokens=True))
        else:
            raise RoutingError("route needs prompts, token ids or task types")
        routes = self.router.predict(embeddings)
        if self.threshold is not None:
            routes = [(name if p >= self.threshold else BASE_ADAPTER, p) for name, p in routes]
        return routes

    # ----- running -----------------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Forward with per-row routing; the output carries ``routes``. Pass ``routes=`` or ``task_types=``
        to skip the classifier."""
        with self._request():
            routes = self._routes(input_ids, attention_mask, kwargs)
            output = self._run(self.model, routes, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        output["routes"] = routes
        return output

    forward = __call__

    def generate(self, inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None, **kwargs: Any):
        """``generate`` with per-row routing (greedy, sampling or beams). Accepts a tokenizer's output as first
        argument. With ``return_dict_in_generate=True`` the output carries ``routes``."""
        if isinstance(inputs, Mapping):
            kwargs = {**inputs, **kwargs}
        elif inputs is not None:
            kwargs["input_ids"] = inputs
        with self._request():
            routes = self._routes(kwargs["input_ids"], kwargs.get("attention_mask"), kwargs)
            output = self._run(self.model.generate, routes, **kwargs)
        if kwargs.get("return_dict_in_generate"):
            output["routes"] = routes
        return output

    def set_merged(self, merged: bool) -> None:
        """Merged mode: when a whole batch goes to one pack, that pack is added to the base weights (no per-token
        cost for it), and swapped when the route changes; requests are then served one at a time."""
        with self._merge_lock:
            if not merged and self._merged_pack is not None:
                self.model.unmerge_adapter()
                self._merged_pack = None
            self.merged = merged

    def _routes(self, input_ids, attention_mask, kwargs: dict) -> list[tuple[str, float]]:
        routes, task_types = kwargs.pop("routes", None), kwargs.pop("task_types", None)
        if routes is None:
            return self.route(task_types=task_types, input_ids=input_ids, attention_mask=attention_mask)
        routes = [(route, 1.0) if isinstance(route, str) else tuple(route) for route in routes]
        self._check_names([name for name, _ in routes])
        return routes

    def _request(self):
        """Merged weights are shared state: in merged mode, requests (routing included) run one at a time."""
        return self._merge_lock if self.merged else contextlib.nullcontext()

    def _run(self, function, routes, **kwargs):
        names = [name for name, _ in routes]
        if self.merged and len(set(names)) == 1 and names[0] != self._merged_pack:
            if self._merged_pack is not None:
                self.model.unmerge_adapter()
                self._merged_pack = None
            if names[0] != BASE_ADAPTER:
                self.model.merge_adapter(adapter_names=names[0:1])
                self._merged_pack = names[0]
        # rows that name the merged pack cost nothing extra; others get their pack minus the merged one
        return function(adapter_names=names, **kwargs)

    def _check_names(self, names: Sequence[str]) -> None:
        unknown = {name for name in names if name != BASE_ADAPTER and name not in self.sources}
        if unknown:
            raise RoutingError(f"unknown pack(s): {', '.join(sorted(unknown))}; loaded packs: {', '.join(self.labels)}")

    # ----- persistence -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``router_config.json`` (pack sources, embedder, threshold, labels), ``router.safetensors`` and a
        model card. Local packs outside `directory` are copied into ``directory/packs/<name>`` so that the router
        folder is self-contained (it can move, or be pushed); Hub packs are referenced by repo id and commit."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".router.", dir=directory))
        try:
            packs: dict[str, dict[str, Any]] = {}
            copied = []
            for name, source in self.sources.items():
                location = Path(source.location).expanduser().resolve() if source.is_local else None
                if location is not None and not location.is_relative_to(directory.resolve()):
                    _copy_pack(location, staging / "packs" / name)
                    copied.append(name)
                    packs[name] = {"path": f"packs/{name}"}
                else:
                    packs[name] = source.to_json(directory)
            config = self._config(packs)
            if self.router is not None:
                save_file({k: v.contiguous() for k, v in self.router.state_dict().items()}, staging / ROUTER_WEIGHTS)
            (staging / ROUTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            write_card(router_card(config, repo_id=directory.resolve().name), staging)
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

    def _config(self, packs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        spec = getattr(self.embedder, "spec", None) or {"type": "custom", "name": type(self.embedder).__name__}
        manual = self.manual.assignment if self.manual is not None else None
        return {
            "format_version": ROUTER_FORMAT_VERSION,
            "labels": self.labels,
            "packs": packs,
            "embedder": spec,
            "threshold": self.threshold,
            "router": self.router.config() if self.router is not None else None,
            "manual": dict(manual) if isinstance(manual, Mapping) else None,
            "base_model_name_or_path": getattr(getattr(self.model, "config", None), "name_or_path", None) or None,
            "base_model_fingerprint": self.base_fingerprint,
        }

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        tag: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        create_pr: bool = False,
    ) -> str:
        """Upload the router (config, weights, card, and its local packs under ``packs/``) as one commit.

        Packs that came from the Hub stay references (repo id + commit). Returns the commit id.
        """
        with tempfile.TemporaryDirectory(prefix="graft-router-") as folder:
            self.save_pretrained(folder)
            return push_router_folder(
                folder,
                repo_id,
                revision=revision,
                tag=tag,
                private=private,
                token=token,
                commit_message=commit_message,
                create_pr=create_pr,
            )

    @classmethod
    def from_pretrained(
        cls,
        base_model,
        directory: str | os.PathLike,
        tokenizer=None,
        *,
        embedder: QueryEmbedder | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        force: bool = False,
        **options: Any,
    ) -> RoutedGraftModel:
        """Rebuild a router saved with :meth:`save_pretrained` or pushed with :meth:`push_to_hub` (a folder or a
        Hub repo id): load its packs onto `base_model` (pulling them from the Hub as needed) and its weights."""
        folder = Path(directory).expanduser()
        if not folder.is_dir():
            folder = pull_router(str(directory), revision=revision, token=token)
        config = _read_router_config(folder)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model.name_or_path)
        spec = config.get("embedder") or {}
        if spec.get("type") != BaseModelEmbedder.spec_type and embedder is None:
            raise RoutingError(
                f"this router was trained with a custom embedder ({spec.get('name', 'unknown')}); pass the same "
                "embedder=... to from_pretrained"
            )
        sources = {name: PackSource.from_json(config["packs"][name], folder) for name in config["labels"]}
        routed = cls.from_packs(
            base_model,
            sources,
            tokenizer,
            threshold=config.get("threshold"),
            manual=config.get("manual"),
            force=force,
            token=token,
            **options,
        )
        if embedder is not None:
            routed.embedder = embedder
        elif spec.get("max_length"):
            routed.embedder.max_length = int(spec["max_length"])
        if config.get("router") is not None:
            router = GraftRouter(**config["router"])
            router.load_state_dict(load_file(folder / ROUTER_WEIGHTS))
            routed.router = router.eval()
        return routed


def push_router_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
) -> str:
    """Upload a saved router folder (config, weights, card, packs under ``packs/``) as one commit; returns its id."""
    root = Path(folder).resolve()
    config = _read_router_config(root)
    files = [root / ROUTER_CONFIG] + ([root / ROUTER_WEIGHTS] if (root / ROUTER_WEIGHTS).is_file() else [])
    for source in config["packs"].values():
        if "path" in source:
            pack = check_pack_folder(_inside(root, source["path"]))
            files += [pack / name for name in PACK_FILES if (pack / name).is_file()]
    card = str(router_card(config, repo_id=repo_id)).encode("utf-8")
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
    config = _read_router_config(folder)
    for source in config["packs"].values():
        if "path" in source:
            check_pack_folder(_inside(folder, source["path"]))
    return folder


def _read_router_config(folder: Path) -> dict[str, Any]:
    """router_config.json, validated: names, sources (paths must stay inside the folder), threshold, router shape."""
    file = folder / ROUTER_CONFIG
    if not file.is_file():
        raise RoutingError(f"{folder} has no {ROUTER_CONFIG}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RoutingError(f"{file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise RoutingError(f"{file} must hold a JSON object")
    version = config.get("format_version", 0)
    if not isinstance(version, int) or version > ROUTER_FORMAT_VERSION:
        raise RoutingError(f"{folder} was saved by a newer peft-graft (format {version!r}); upgrade to load it")
    labels, packs = config.get("labels"), config.get("packs")
    if not isinstance(labels, list) or not labels or not all(isinstance(label, str) for label in labels):
        raise RoutingError(f"{ROUTER_CONFIG}: 'labels' must be a non-empty list of pack names")
    for label in labels:
        _check_name(label)
    if len(set(labels)) != len(labels):
        raise RoutingError(f"{ROUTER_CONFIG}: labels repeat: {labels}")
    if not isinstance(packs, dict) or sorted(packs) != sorted(labels):
        raise RoutingError(f"{ROUTER_CONFIG}: the labels {labels} do not match the packs {list(packs or [])}")
    for source in packs.values():
        PackSource.from_json(source, folder)  # refuses paths leaving the folder
    threshold = config.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise RoutingError(f"{ROUTER_CONFIG}: threshold must be a number or null, got {threshold!r}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RoutingError(f"{ROUTER_CONFIG}: threshold must be in [0, 1], got {threshold}")
    router = config.get("router")
    if router is not None:
        if not isinstance(router, dict) or router.get("labels") != labels:
            raise RoutingError(f"{ROUTER_CONFIG}: the router's labels must be {labels}")
        for key in ("embedding_dim", "hidden_size"):
            value = router.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise RoutingError(f"{ROUTER_CONFIG}: router.{key} must be a positive integer, got {value!r}")
        if not (folder / ROUTER_WEIGHTS).is_file():
            raise RoutingError(f"{folder} has a trained router in {ROUTER_CONFIG} but no {ROUTER_WEIGHTS}")
    manual = config.get("manual")
    if manual is not None and not (
        isinstance(manual, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in manual.items())
    ):
        raise RoutingError(f"{ROUTER_CONFIG}: 'manual' must map task types to pack names")
    return config


def _copy_pack(source: Path, target: Path) -> None:
    """Copy a pack's own files (nothing else from its folder)."""
    target.mkdir(parents=True)
    for name in PACK_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def _as_source(source: str | os.PathLike | PackSource) -> PackSource:
    if isinstance(source, PackSource):
        return source
    location = str(source)
    path = Path(location).expanduser()
    return PackSource(str(path.resolve()) if path.is_dir() else location)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or name == BASE_ADAPTER or not _PACK_NAME.match(name):
        raise RoutingError(f"invalid pack name {name!r}: use letters, digits, '_' or '-', starting with a letter")


def _pack_folder(name: str, source: PackSource, tokenizer, token: str | bool | None) -> Path:
    """The validated local folder of a pack (downloaded if it is on the Hub); clear errors for bad names, missing
    packs, and packs whose tokenizer differs from the router's."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    _check_name(name)
    if not source.is_local:
        if Path(source.location).expanduser().exists() or source.location.startswith(("/", ".", "~")):
            raise RoutingError(f"pack {name!r} not found: {source.location} is not a pack folder")
        try:
            validate_repo_id(source.location)
        except HFValidationError:
            raise RoutingError(
                f"pack {name!r} not found: {source.location} is neither a folder nor a Hub repo id"
            ) from None
    folder = source.folder(token)
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        pack_tokenizer = AutoTokenizer.from_pretrained(folder)
        if len(pack_tokenizer) != len(tokenizer):
            raise RoutingError(
                f"pack {name!r} carries a tokenizer of {len(pack_tokenizer)} tokens but the router's has "
                f"{len(tokenizer)}; use the pack's tokenizer (it extends the base vocabulary) for all packs"
            )
    return folder


def _pinned(source: PackSource, folder: Path) -> PackSource:
    """A Hub source with the commit it was downloaded at, so a saved router reloads exactly these packs."""
    if source.is_local:
        return source
    return PackSource(source.location, source.revision, commit_of(folder) or source.commit)


def _check_one_base(folders: Mapping[str, Path | None], known: str | None = None) -> None:
    """All packs must record the same base fingerprint (those that record one)."""
    recorded = {}
    for name, folder in folders.items():
        if folder is None:
            continue
        config = read_json(folder / ADAPTER_CONFIG) or {}
        if config.get("base_model_fingerprint"):
            recorded[name] = (config["base_model_fingerprint"], config.get("base_model_name_or_path"))
    fingerprints = {fingerprint for fingerprint, _ in recorded.values()} | ({known} if known else set())
    if len(fingerprints) > 1:
        described = "; ".join(f"{name}: {base} ({fp})" for name, (fp, base) in recorded.items())
        if known:
            described += f"; loaded packs: {known}"
        raise RoutingError(f"the packs were made for different base models ({described}); one router needs one base")


def _check_same_base(model) -> None:
    """Packs without a fingerprint must at least record the base model path they are loaded onto (when known)."""
    loaded = getattr(model.get_base_model().config, "name_or_path", "") or ""
    for name, config in model.peft_config.items():
        if config.base_model_fingerprint:
            continue  # verified against the weights on attach
        recorded = config.base_model_name_or_path or ""
        if loaded and recorded and not _same_location(recorded, loaded):
            raise RoutingError(
                f"pack {name!r} was made for base {recorded!r} but is loaded onto {loaded!r}; load the packs onto "
                "the base they were extracted from"
            )


def _same_location(first: str, second: str) -> bool:
    if first == second:
        return True
    a, b = Path(first).expanduser(), Path(second).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _with_label(router: GraftRouter, label: str) -> GraftRouter:
    """The router with one more output, masked until the router is refitted with examples for it."""
    grown = GraftRouter(router.embedding_dim, [*router.labels, label], router.hidden_size, router.dropout)
    state = router.state_dict()
    last = grown.network[-1]
    with torch.no_grad():
        grown.load_state_dict(
            {
                **state,
                "network.3.weight": torch.cat([state["network.3.weight"], last.weight.new_zeros(1, last.in_features)]),
                "network.3.bias": torch.cat([state["network.3.bias"], last.bias.new_zeros(1)]),
                "active": torch.cat([state["active"], torch.zeros(1, dtype=torch.bool)]),
            }
        )
    return grown.eval()


def _without_label(router: GraftRouter, label: str) -> GraftRouter:
    keep = [i for i, name in enumerate(router.labels) if name != label]
    shrunk = GraftRouter(router.embedding_dim, [router.labels[i] for i in keep], router.hidden_size, router.dropout)
    state = router.state_dict()
    index = torch.tensor(keep)
    state.update(
        {
            "network.3.weight": state["network.3.weight"][index],
            "network.3.bias": state["network.3.bias"][index],
            "active": state["active"][index],
        }
    )
    shrunk.load_state_dict(state)
    return shrunk.eval()
