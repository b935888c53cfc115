"""GraftModel: the PEFT tuner that injects GRAFT layers, and packs / unpacks their weights on save and load."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, find_parameter_name_by_module
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.error import NoMatchingPeftModuleError
from peft.utils.other import match_target_against_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._mixed_batch import BASE_ADAPTER, rows_named
from .config import GraftConfig
from .errors import GraftConfigError, PackFormatError
from .layer import GraftEmbedding, GraftLayer, GraftLinear, GraftNorm, graft_layers
from .pack.adapter_io import pack_state_dict, unpack_state_dict
from .pack.codec import PackingPolicy
from .pack.layout import KEY_PREFIX
from .pack.provenance import BASE_ROWS_ATTRIBUTE, fingerprint_model, verify_base


class GraftModel(BaseTuner):
    """Injects GRAFT layers into a model. Created by ``get_peft_model(model, GraftConfig(...))``."""

    prefix: str = KEY_PREFIX
    tuner_layer_cls = GraftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().inject_adapter(*args, **kwargs)
        except NoMatchingPeftModuleError as error:
            # typed as ours: a pack config naming modules this model lacks (PEFT itself never catches it)
            message = f"{error} (the GRAFT config's target_modules do not match this model)"
            raise GraftConfigError(message, field="target_modules") from None

    def _create_and_replace(
        self,
        graft_config: GraftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        tied = target_name in (graft_config.target_modules_to_tie or ())
        if isinstance(target, GraftLayer):
            target.update_layer(
                adapter_name,
                graft_config,
                rank=graft_config.rank_for(current_key),
                inference_mode=graft_config.inference_mode,
            )
            layer = target
        else:
            layer = self._create_new_module(graft_config, adapter_name, target, current_key)
            if adapter_name not in self.active_adapters:
                layer.requires_grad_(False)
            self._replace_module(parent, target_name, layer, target)
        if tied:
            source = self.model.get_input_embeddings()
            if not isinstance(source, GraftLayer) or adapter_name not in source.graft_values:
                raise GraftConfigError(f"{current_key} is tied to the input embedding, which must be targeted as well")
            layer.tie_to(source, adapter_name)

    def _create_new_module(
        self, graft_config: GraftConfig, adapter_name: str, target: nn.Module, current_key: str
    ) -> GraftLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        rank = graft_config.rank_for(current_key)
        if isinstance(base, nn.Embedding):
            return GraftEmbedding(target, adapter_name, graft_config, rank)
        if isinstance(base, (nn.Linear, Conv1D)):
            sparse_role = isinstance(base, nn.Linear) and self._is_output_embedding(base)
            return GraftLinear(target, adapter_name, graft_config, rank, sparse_role=sparse_role)
        weight = getattr(base, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 1 and not list(base.children()):
            return GraftNorm(target, adapter_name, graft_config, rank)
        raise GraftConfigError(
            f"GRAFT cannot adapt {current_key} ({type(base).__name__}): it supports torch.nn.Linear, transformers "
            "Conv1D, torch.nn.Embedding and norms with a 1-D weight. Remove it from target_modules or add it to "
            "exclude_modules."
        )

    def _is_output_embedding(self, module: nn.Module) -> bool:
        get_output_embeddings = getattr(self.model, "get_output_embeddings", None)
        if not callable(get_output_embeddings):
            return False
        try:
            output_embeddings = get_output_embeddings()
        except NotImplementedError:
            return False
        if isinstance(output_embeddings, BaseTunerLayer):
            output_embeddings = output_embeddings.get_base_layer()
        return output_embeddings is module

    def _check_tied_modules(self, model: nn.Module, peft_config: GraftConfig) -> None:
        # A fine-tune of a model with tied embeddings has one delta for the shared weight, so when the input or
        # output embedding is targeted, GRAFT always ties them (PEFT's `ensure_weight_tying`, always on).
        tied_names = self._get_module_names_tied_with_embedding()
        targets = peft_config.target_modules
        if not tied_names or not targets:
            return
        embedding = find_parameter_name_by_module(model, model.get_input_embeddings()).removesuffix(".base_layer")
        candidates = [embedding, *tied_names]
        if isinstance(targets, str):
            targeted = any(match_target_against_key(targets, name) for name in candidates)
        else:
            targeted = any(
                name in targets or any(name.endswith(f".{t}") or name == t for t in targets) for name in candidates
            )
        if targeted:
            self._add_targets_to_tie(peft_config, tied_names)

    def _add_targets_to_tie(self, peft_config: GraftConfig, tied_weight_keys: list[str]) -> None:
        embedding = find_parameter_name_by_module(self.model, self.model.get_input_embeddings()).removesuffix(
            ".base_layer"
        )
        peft_config.target_modules_to_tie = sorted(set(tied_weight_keys))
        targets = peft_config.target_modules
        if isinstance(targets, str):
            peft_config.target_modules = rf"(?:{targets})|(?:{re.escape(embedding)})"
        else:
            kept = {t for t in targets if not any(t == k or k.endswith(f".{t}") for k in tied_weight_keys)}
            peft_config.target_modules = kept | {embedding}

    def _prepare_model(self, peft_config: GraftConfig, model: nn.Module) -> None:
        # Runs before any module is replaced, so a refused pack leaves the base untouched.
        base_name = peft_config.base_model_name_or_path
        if base_name and peft_config.revision:
            base_name = f"{base_name}@{peft_config.revision}"
        verify_base(model, peft_config.base_model_fingerprint, base_name, pack="This SkillPack")
        # A pack made from a fine-tune that added tokens needs the base's vocabulary grown first.
        if peft_config.vocab_size is not None:
            _check_vocabulary_growth(model, peft_config.vocab_size)
            grow_vocabulary(model, peft_config.vocab_size)

    def _check_merge_allowed(self) -> None:
        # Replaces BaseTuner's warning about tied weights with an error: merging into a weight that another module
        # shares would change that module too, so the merged model would silently differ from the unmerged one.
        # The exception is a tied GRAFT pair, whose one shared delta is merged once into the one shared weight.
        owners: dict[int, tuple[str, GraftLayer]] = {}
        for name, layer in graft_layers(self.model):
            if not layer.graft_tied:
                owners[layer.get_base_layer().weight.data_ptr()] = (name, layer)
        followers = {f"{name}.base_layer.weight": layer for name, layer in graft_layers(self.model) if layer.graft_tied}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            owner = owners.get(parameter.data_ptr())
            if owner is None or name.startswith(f"{owner[0]}.base_layer."):
                continue
            follower = followers.get(name)
            if follower is not None and follower._source() is owner[1]:
                continue
            raise ValueError(
                f"{owner[0]} shares its base weight with {name} (tied weights), so merging its delta would change "
                "both modules. Keep the adapter unmerged, target both tied modules, or load the base with "
                "tie_word_embeddings=False."
            )

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """Route `adapter_names=[...]` (one name per batch row) to every GRAFT layer for this call."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode; call model.eval() first.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"adapter_names must be a list of str (one per row), got {type(adapter_names).__name__}")
        known = set(self.peft_config)  # not a walk over every layer: this runs on every forward
        unknown = {name for name in adapter_names if name != BASE_ADAPTER} - known
        if unknown:
            raise ValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}. "
                f"Loaded adapters: {', '.join(sorted(known))}; use {BASE_ADAPTER!r} for rows without an adapter."
            )
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            # generate() repeats every input row num_beams times
            adapter_names = [name for name in adapter_names for _ in range(num_beams)]
        with rows_named(adapter_names):
            yield

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: GraftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """Select the adapter's tensors and replace each GRAFT layer's floats with its packed encoding."""
        selected = super()._get_adapter_state_dict(
            model=model,
            config=config,
            adapter_name=adapter_name,
            state_dict=state_dict,
            unwanted_adapter_names=unwanted_adapter_names,
        )
        if config.base_model_fingerprint is None:
            # a pack trained with get_peft_model records the base it was trained on
            config.base_model_fingerprint = fingerprint_model(model)
        return pack_state_dict(model, adapter_name, selected, PackingPolicy.from_config(config))

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: GraftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Decode packed tensors into float tensors (once, in the adapter's dtype), then map keys as PEFT does."""
        try:
            decoded = unpack_state_dict(model, adapter_name, state_dict, PackingPolicy.from_config(config))
        except PackFormatError:
            withdraw_adapter(model, adapter_name)  # the pack is refused: leave the model as it was before loading it
            raise
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=decoded
        )


def withdraw_adapter(model: nn.Module, adapter_name: str) -> None:
    """Take an adapter's injected GRAFT layers out again: a wrapper that holds only this adapter gives its base
    layer back to its parent; one that holds others forgets this one."""
    for name, layer in list(graft_layers(model)):
        adapters = layer._all_available_adapter_names()
        if adapter_name not in adapters:
            continue
        if adapters == [adapter_name]:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, layer.get_base_layer())
        else:
            layer.delete_adapter(adapter_name)


def grow_vocabulary(model: nn.Module, vocab_size: int) -> None:
    """Grow the input (and output) embeddings of `model` to `vocab_size` rows; the new rows are zero.

    Works on plain and GRAFT-wrapped embeddings and keeps tied weights tied. Zero rows make a pack's stored rows for
    added tokens exact, whatever the base would otherwise have initialised them to.
    """
    input_layer = model.get_input_embeddings()
    embedding = input_layer.get_base_layer() if isinstance(input_layer, BaseTunerLayer) else input_layer
    rows = embedding.weight.shape[0]
    if vocab_size <= rows:
        return
    old_weight = embedding.weight
    embedding.weight = _grown(old_weight, vocab_size)
    embedding.num_embeddings = vocab_size
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = output_layer.get_base_layer() if isinstance(output_layer, BaseTunerLayer) else output_layer
    if head is not None and head.weight.shape[0] == rows:
        head.weight = embedding.weight if head.weight is old_weight else _grown(head.weight, vocab_size)
        if getattr(head, "bias", None) is not None:
            head.bias = _grown(head.bias, vocab_size)
        head.out_features = vocab_size
    for layer in (input_layer, output_layer):
        if isinstance(layer, GraftLayer):
            layer.grow_rows(vocab_size)
    config = getattr(model, "config", None)
    if config is not None:
        config.get_text_config().vocab_size = vocab_size


def _check_vocabulary_growth(model: nn.Module, vocab_size: int) -> None:
    """Refuse a pack config that would grow the vocabulary past twice the base's own: the rows are allocated before
    the pack's weights are read, and no fine-tune adds as many tokens as its base had (a hostile vocab_size would)."""
    weight = model.get_input_embeddings().weight
    base_rows = getattr(weight, BASE_ROWS_ATTRIBUTE, weight.shape[0])
    if vocab_size > 2 * base_rows:
        raise PackFormatError(
            f"the pack's config grows the vocabulary from {base_rows} to {vocab_size} rows; a SkillPack "
            f"may add at most as many tokens as its base has ({2 * base_rows} rows in all). The config is damaged or "
            "was not written by peft-graft."
        )


def _grown(parameter: nn.Parameter, rows: int) -> nn.Parameter:
    data = parameter.data
    padding = data.new_zeros(rows - data.shape[0], *data.shape[1:])
    grown = nn.Parameter(torch.cat([data, padding]), requires_grad=parameter.requires_grad)
    # the base fingerprint covers the rows the base had before any pack grew it
    setattr(grown, BASE_ROWS_ATTRIBUTE, getattr(parameter, BASE_ROWS_ATTRIBUTE, data.shape[0]))
    return grown
