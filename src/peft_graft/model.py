"""GraftModel: the PEFT tuner that injects GRAFT layers, and packs / unpacks their weights on save and load."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import GraftConfig
from .errors import PackFormatError
from .layer import BASE_ADAPTER, GraftEmbedding, GraftLayer, GraftLinear, GraftSparseLinear
from .pack_format import PackingPolicy

# Every per-adapter tensor a GRAFT layer holds in its state dict.
_STATE_TENSORS = (*GraftLayer.adapter_layer_names, "graft_indices")


class GraftModel(BaseTuner):
    """Injects GRAFT layers into a model. Created by ``get_peft_model(model, GraftConfig(...))``."""

    prefix: str = "graft_"
    tuner_layer_cls = GraftLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

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
        if isinstance(target, GraftLinear):
            target.update_layer(
                adapter_name,
                graft_config,
                rank=graft_config.rank_for(current_key),
                inference_mode=graft_config.inference_mode,
            )
            return
        if isinstance(target, GraftLayer):
            target.update_layer(adapter_name, graft_config, inference_mode=graft_config.inference_mode)
            return
        new_module = self._create_new_module(graft_config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _create_new_module(
        self, graft_config: GraftConfig, adapter_name: str, target: nn.Module, current_key: str
    ) -> GraftLayer:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Embedding):
            return GraftEmbedding(target, adapter_name, graft_config)
        if isinstance(base, nn.Linear) and self._is_output_embedding(base):
            return GraftSparseLinear(target, adapter_name, graft_config)
        if isinstance(base, (nn.Linear, Conv1D)):
            return GraftLinear(target, adapter_name, graft_config, rank=graft_config.rank_for(current_key))
        raise ValueError(
            f"GRAFT cannot adapt {current_key} ({type(base).__name__}): it supports torch.nn.Linear, "
            "transformers Conv1D and torch.nn.Embedding. Remove it from target_modules or add it to exclude_modules."
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

    def _check_merge_allowed(self) -> None:
        # Replaces BaseTuner's warning about tied weights with an error: merging into a weight that another module
        # shares would change that module too, so the merged model would silently differ from the unmerged one.
        owners = {layer.get_base_layer().weight.data_ptr(): name for name, layer in _graft_layers(self.model)}
        for name, parameter in self.model.named_parameters(remove_duplicate=False):
            owner = owners.get(parameter.data_ptr())
            if owner is not None and not name.startswith(f"{owner}.base_layer."):
                raise ValueError(
                    f"{owner} shares its base weight with {name} (tied weights), so merging its delta would change "
                    "both modules. Keep the adapter unmerged, or load the base with tie_word_embeddings=False."
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
        known = set()
        for _, layer in _graft_layers(self.model):
            known |= layer.graft_S.keys() | layer.graft_values.keys()
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
        handles = [
            layer.register_forward_pre_hook(
                partial(_inject_adapter_names, adapter_names=adapter_names), with_kwargs=True
            )
            for _, layer in _graft_layers(self.model)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        policy = PackingPolicy.from_config(config)
        for module_name, layer in _graft_layers(model):
            floats = {}
            for attr in _STATE_TENSORS:
                key = f"{module_name}.{attr}.{adapter_name}"
                if key in selected:
                    floats[attr] = selected.pop(key)
            if not floats:
                continue
            try:
                packed = layer.pack_adapter(adapter_name, floats, policy)
            except ValueError as error:
                raise PackFormatError(f"cannot pack adapter {adapter_name!r} of {module_name}: {error}") from error
            for relative_key, tensor in packed.items():
                attr, _, part = relative_key.partition(".")
                # the adapter name goes second to last so PEFT's key translation strips it
                selected[f"{module_name}.{attr}.{adapter_name}" + (f".{part}" if part else "")] = tensor
        return selected

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls,
        model: nn.Module,
        config: GraftConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Decode packed tensors into float tensors (once, in the adapter's dtype), then map keys as PEFT does."""
        policy = PackingPolicy.from_config(config)
        packed_by_module: dict[str, dict[str, torch.Tensor]] = {}
        decoded: dict[str, torch.Tensor] = {}
        for key, tensor in state_dict.items():
            position = key.find(f".{cls.prefix}")
            if position < 0:
                decoded[key] = tensor
            else:
                packed_by_module.setdefault(key[:position], {})[key[position + 1 :]] = tensor
        for module_name, layer in _graft_layers(model):
            if not layer._owns(adapter_name):
                continue
            for prefix in (module_name, f"base_model.model.{module_name}"):
                if prefix in packed_by_module:
                    break
            else:
                continue
            try:
                floats = layer.unpack_adapter(adapter_name, packed_by_module.pop(prefix), policy)
            except PackFormatError as error:
                raise PackFormatError(f"adapter {adapter_name!r}, module {module_name}: {error}") from error
            decoded.update({f"{prefix}.{attr}": tensor for attr, tensor in floats.items()})
        for module_name, tensors in packed_by_module.items():
            # not a GRAFT layer of this model: let load_state_dict report them as unexpected keys
            decoded.update({f"{module_name}.{key}": tensor for key, tensor in tensors.items()})
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=decoded
        )


def _graft_layers(model: nn.Module) -> Iterator[tuple[str, GraftLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, GraftLayer):
            yield name.removeprefix("_fsdp_wrapped_module."), module


def _inject_adapter_names(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
