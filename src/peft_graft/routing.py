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

from .layer import BASE_ADAPTER
from .router import BaseModelEmbedder, GraftRouter, ManualRouter, QueryEmbedder, RoutingError

ROUTER_CONFIG = "router_config.json"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_FORMAT_VERSION = 1
_PACK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class PackSource:
    """Where a pack comes from: a local folder, or a Hub repo id at a revision."""

    location: str
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.location).expanduser().is_dir()

    def to_json(self, router_dir: Path) -> dict[str, Any]:
        if not self.is_local:
            return {"repo_id": self.location, "revision": self.revision}
        path = Path(self.location).expanduser().resolve()
        try:  # a pack inside the router folder is stored relative to it, so the folder can move
            return {"path": str(path.relative_to(router_dir.resolve()))}
        except ValueError:
            return {"path": str(path)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], router_dir: Path) -> PackSource:
        if "repo_id" in data:
            return cls(str(data["repo_id"]), data.get("revision"))
        if "path" in data:
            path = Path(data["path"])
            return cls(str(path if path.is_absolute() else router_dir / path))
        raise RoutingError(f"a pack source needs 'path' or 'repo_id', got {dict(data)}")


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
        **options: Any,
    ) -> RoutedGraftModel:
        """Load `packs` ({name: folder, Hub repo id or PackSource}) onto `base_model` as named adapters."""
        from peft import PeftModel

        if not packs:
            raise RoutingError("from_packs needs at least one pack")
        sources = {name: _as_source(source) for name, source in packs.items()}
        for name, source in sources.items():
            _check_pack(name, source, tokenizer)
        model = None
        for name, source in sources.items():
            if model is None:
                model = PeftModel.from_pretrained(
                    base_model, source.location, adapter_name=name, revision=source.revision
                )
            else:
                model.load_adapter(source.location, adapter_name=name, revision=source.revision)
        _check_same_base(model)
        return cls(model, tokenizer, sources, **options)

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    def add_pack(self, name: str, source: str | os.PathLike | PackSource) -> None:
        """Load another pack; the base and the other packs are untouched. Refit the router to route to it."""
        if name in self.sources:
            raise RoutingError(f"a pack named {name!r} is already loaded")
        source = _as_source(source)
        _check_pack(name, source, self.tokenizer)
        with self._merge_lock:
            self.model.load_adapter(source.location, adapter_name=name, revision=source.revision)
            self.sources[name] = source
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
        """Write ``router_config.json`` (pack sources, embedder, threshold, labels) and ``router.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spec = getattr(self.embedder, "spec", None) or {"type": "custom", "name": type(self.embedder).__name__}
        manual = self.manual.assignment if self.manual is not None else None
        config = {
            "format_version": ROUTER_FORMAT_VERSION,
            "labels": self.labels,
            "packs": {name: source.to_json(directory) for name, source in self.sources.items()},
            "embedder": spec,
            "threshold": self.threshold,
            "router": self.router.config() if self.router is not None else None,
            "manual": dict(manual) if isinstance(manual, Mapping) else None,
            "base_model_name_or_path": getattr(getattr(self.model, "config", None), "name_or_path", None) or None,
        }
        staging = Path(tempfile.mkdtemp(prefix=".router.", dir=directory))
        try:
            if self.router is not None:
                save_file({k: v.contiguous() for k, v in self.router.state_dict().items()}, staging / ROUTER_WEIGHTS)
            (staging / ROUTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            for name in (ROUTER_WEIGHTS, ROUTER_CONFIG):
                if (staging / name).exists():
                    os.replace(staging / name, directory / name)
                elif (directory / name).exists():
                    (directory / name).unlink()  # a router saved before training has no weights
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(
        cls,
        base_model,
        directory: str | os.PathLike,
        tokenizer=None,
        *,
        embedder: QueryEmbedder | None = None,
        **options: Any,
    ) -> RoutedGraftModel:
        """Rebuild a router saved with :meth:`save_pretrained`: load its packs onto `base_model` and its weights."""
        directory = Path(directory)
        if not (directory / ROUTER_CONFIG).is_file():
            raise RoutingError(f"{directory} has no {ROUTER_CONFIG}")
        config = json.loads((directory / ROUTER_CONFIG).read_text(encoding="utf-8"))
        if config.get("format_version", 0) > ROUTER_FORMAT_VERSION:
            raise RoutingError(f"{directory} was saved by a newer peft-graft; upgrade to load it")
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base_model.name_or_path)
        spec = config.get("embedder") or {}
        if spec.get("type") != BaseModelEmbedder.spec_type and embedder is None:
            raise RoutingError(
                f"this router was trained with a custom embedder ({spec.get('name', 'unknown')}); pass the same "
                "embedder=... to from_pretrained"
            )
        if sorted(config["packs"]) != sorted(config["labels"]):
            raise RoutingError(
                f"{ROUTER_CONFIG}: the labels {config['labels']} do not match the packs {list(config['packs'])}"
            )
        sources = {name: PackSource.from_json(config["packs"][name], directory) for name in config["labels"]}
        routed = cls.from_packs(
            base_model, sources, tokenizer, threshold=config.get("threshold"), manual=config.get("manual"), **options
        )
        if embedder is not None:
            routed.embedder = embedder
        elif spec.get("max_length"):
            routed.embedder.max_length = int(spec["max_length"])
        if config.get("router") is not None:
            router = GraftRouter(**config["router"])
            router.load_state_dict(load_file(directory / ROUTER_WEIGHTS))
            routed.router = router.eval()
        return routed


def _as_source(source: str | os.PathLike | PackSource) -> PackSource:
    if isinstance(source, PackSource):
        return source
    location = str(source)
    path = Path(location).expanduser()
    return PackSource(str(path.resolve()) if path.is_dir() else location)


def _check_pack(name: str, source: PackSource, tokenizer) -> None:
    """Clear errors for bad names, missing local packs, and packs whose tokenizer differs from the router's."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name == BASE_ADAPTER or not _PACK_NAME.match(name):
        raise RoutingError(f"invalid pack name {name!r}: use letters, digits, '_' or '-', starting with a letter")
    if not source.is_local:
        try:
            validate_repo_id(source.location)
        except HFValidationError:
            raise RoutingError(
                f"pack {name!r} not found: {source.location} is neither a folder nor a Hub repo id"
            ) from None
        return
    if (Path(source.location) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        pack_tokenizer = AutoTokenizer.from_pretrained(source.location)
        if len(pack_tokenizer) != len(tokenizer):
            raise RoutingError(
                f"pack {name!r} carries a tokenizer of {len(pack_tokenizer)} tokens but the router's has "
                f"{len(tokenizer)}; use the pack's tokenizer (it extends the base vocabulary) for all packs"
            )


def _check_same_base(model) -> None:
    """Packs must all record the base model they are loaded onto (when both are known)."""
    loaded = getattr(model.get_base_model().config, "name_or_path", "") or ""
    for name, config in model.peft_config.items():
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
