"""RoutedGraftModel: many SkillPacks on one base, one pack chosen per query.

Every query of a batch is routed on its own (a classifier over base-model embeddings, or a manual task-type map) and
the whole batch then runs once, each row with its pack (PEFT mixed batches; ``"__base__"`` rows use no pack). Nothing
global changes per request, so concurrent requests with different packs are independent. For single-skill traffic,
merged mode adds the chosen pack to the base weights instead, and swaps packs when the route changes.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .._mixed_batch import BASE_ADAPTER
from ..errors import RoutingError
from ..extraction.checkpoint import commit_of
from ..pack.folder import PackFolder
from ..pack.provenance import allow_base_mismatch, fingerprint_variants
from .classifier import BaseModelEmbedder, GraftRouter, ManualRouter, QueryEmbedder
from .config import PackSource, RouterConfig, check_pack_name
from .storage import load_router, push_router_folder, save_router


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
        self._gate = _Gate()
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
    def device(self) -> torch.device:
        """Where the model (and the router with it) runs."""
        return next(self.model.parameters()).device

    def to(self, *args: Any, **kwargs: Any) -> RoutedGraftModel:
        """Move (or cast) the model with its packs and the router classifier, as ``nn.Module.to``; returns self."""
        self.model.to(*args, **kwargs)
        if self.router is not None:
            self.router.to(*args, **kwargs)
        return self

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
        with self._gate.exclusive():  # waits for requests in flight: attaching reads (and may merge) the weights
            if self._merged_pack is not None:  # attaching checks the base weights, which must be unmerged
                self.model.unmerge_adapter()
                self._merged_pack = None
            with allow_base_mismatch() if force else contextlib.nullcontext():
                self.model.load_adapter(str(folder), adapter_name=name)
            self.sources[name] = _pinned(source, folder)
            self.model.eval()
        if self.router is not None:
            self.router = self.router.with_label(name)

    def remove_pack(self, name: str) -> None:
        """Unload a pack; the router stops predicting it, and the other packs' outputs do not change."""
        if name not in self.sources:
            raise RoutingError(f"no pack named {name!r}; loaded packs: {', '.join(self.labels)}")
        if len(self.sources) == 1:
            raise RoutingError("cannot remove the last pack")
        with self._gate.exclusive():
            if self._merged_pack is not None:
                self.model.unmerge_adapter()
                self._merged_pack = None
            self.model.delete_adapter(name)
            del self.sources[name]
        if self.router is not None:
            self.router = self.router.without_label(name)

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
        cost for it), and swapped when the route changes; requests are then served one at a time. Switching waits
        for the requests in flight."""
        with self._gate.exclusive():
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

    @contextlib.contextmanager
    def _request(self) -> Iterator[None]:
        """Merged weights are shared state: in merged mode requests (routing included) run one at a time; unmerged,
        they run together, and whatever changes the weights (set_merged, add_pack, remove_pack) waits for them."""
        while True:
            merged = self.merged
            with self._gate.exclusive() if merged else self._gate.shared():
                if self.merged == merged:  # the mode did not change while this request waited
                    yield
                    return

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
        save_router(self, directory)

    def router_config(self, packs: dict[str, dict[str, Any]]) -> RouterConfig:
        """This router's configuration, with the given stored pack sources."""
        spec = getattr(self.embedder, "spec", None) or {"type": "custom", "name": type(self.embedder).__name__}
        manual = self.manual.assignment if self.manual is not None else None
        return RouterConfig(
            labels=self.labels,
            packs=packs,
            embedder=spec,
            threshold=self.threshold,
            router=self.router.config() if self.router is not None else None,
            manual=dict(manual) if isinstance(manual, Mapping) else None,
            base_model_name_or_path=getattr(getattr(self.model, "config", None), "name_or_path", None) or None,
            base_model_fingerprint=self.base_fingerprint,
        )

    def push_to_hub(
        self,
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
                commit_description=commit_description,
                create_pr=create_pr,
                tags=tags,
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
        return load_router(
            cls,
            base_model,
            directory,
            tokenizer,
            embedder=embedder,
            revision=revision,
            token=token,
            force=force,
            **options,
        )


def _as_source(source: str | os.PathLike | PackSource) -> PackSource:
    if isinstance(source, PackSource):
        return source
    location = str(source)
    path = Path(location).expanduser()
    return PackSource(str(path.resolve()) if path.is_dir() else location)


def _pack_folder(name: str, source: PackSource, tokenizer, token: str | bool | None) -> Path:
    """The validated local folder of a pack (downloaded if it is on the Hub); clear errors for bad names, missing
    packs, and packs whose tokenizer differs from the router's."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    check_pack_name(name)
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
    if PackFolder(folder).has_tokenizer:
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
        config = PackFolder(folder).config
        if config.get("base_model_fingerprint"):
            recorded[name] = (config["base_model_fingerprint"], config.get("base_model_name_or_path"))
    variants = [fingerprint_variants(fingerprint) for fingerprint, _ in recorded.values()]
    variants += [fingerprint_variants(known)] if known else []
    if variants and not frozenset.intersection(*variants):  # every pack must accept one same base
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


class _Gate:
    """A readers-writer lock: many holders of `shared`, or one of `exclusive`. A waiting exclusive holder goes
    before new shared ones, so a stream of requests cannot starve set_merged or add_pack."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._condition:
            self._condition.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._condition:
            self._writers_waiting += 1
            self._condition.wait_for(lambda: not self._writing and not self._readers)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._condition:
                self._writing = False
                self._condition.notify_all()
