"""A GRAFT layer's adapter <-> its packed tensors, and a model's adapter state dict <-> the pack file's.

GraftModel's state-dict hooks call :func:`pack_state_dict` when saving and :func:`unpack_state_dict` when loading.
A loaded adapter remembers the tensors it was decoded from (``layer.graft_packed``); while its float tensors still
equal their decoding, saving writes those same tensors again, so an unchanged pack re-saves byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PackFormatError
from ..layer import GraftLayer, graft_layers
from . import layout
from .codec import DecodedModule, PackingPolicy, decode_module, encode_module
from .provenance import BASE_ROWS_ATTRIBUTE

# Every per-adapter tensor a GRAFT layer holds in its state dict.
STATE_TENSORS = (*GraftLayer.adapter_layer_names, "graft_indices")


@dataclass(frozen=True)
class LoadedPack:
    """The packed tensors an adapter was loaded from, and the policy they were written with."""

    policy: PackingPolicy
    tensors: dict[str, torch.Tensor]


def pack_adapter(
    layer: GraftLayer, adapter: str, floats: dict[str, torch.Tensor], policy: PackingPolicy
) -> dict[str, torch.Tensor]:
    """Packed tensors (keys relative to the module) for an adapter's float tensors `floats`."""
    reused = _reuse_loaded_pack(layer, adapter, floats, policy)
    if reused is not None:
        return reused
    packed = encode_module(
        floats,
        layer.delta_shape,
        policy,
        prune=layer.prune_on_save,
        dense_rows_from=layer.graft_dense_rows_from.get(adapter),
    )
    return {name: tensor.cpu() for name, tensor in packed.items()}


def unpack_adapter(
    layer: GraftLayer, adapter: str, tensors: dict[str, torch.Tensor], policy: PackingPolicy
) -> dict[str, torch.Tensor]:
    """Decode packed tensors once, in the adapter's dtype, and install them as the adapter's form and shapes."""
    decoded = _decode(layer, tensors, layer.adapter_dtype(adapter))
    floats = decoded.tensors
    if "graft_S" in floats:
        u, v = floats["graft_U"], floats["graft_V"]
        if (u.shape[0], v.shape[0]) != (layer.delta_shape[0], layer.delta_shape[1]):
            raise PackFormatError(
                f"the pack stores a delta of shape {(u.shape[0], v.shape[0])} but the layer's weight is "
                f"{tuple(layer.delta_shape)}; the pack must belong to this base model"
            )
    if "graft_bias" in floats and layer.get_base_layer().bias is None:
        raise PackFormatError("the pack stores a bias delta but the base layer has no bias")
    layer.set_delta(
        adapter,
        lowrank=(floats["graft_U"], floats["graft_S"], floats["graft_V"]) if "graft_S" in floats else None,
        values=floats.get("graft_values"),
        indices=floats.get("graft_indices"),
        bias=floats.get("graft_bias"),
        dense_rows_from=decoded.dense_rows_from,
    )
    layer.graft_packed[adapter] = LoadedPack(policy, {name: t.cpu() for name, t in tensors.items()})
    return floats


def _decode(layer: GraftLayer, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> DecodedModule:
    # an embedding grown by another pack's added tokens takes packs made on its vocabulary before that
    rows_before_growth = getattr(layer.get_base_layer().weight, BASE_ROWS_ATTRIBUTE, None)
    return decode_module(tensors, layer.delta_shape, dtype, rows_before_growth=rows_before_growth)


def _reuse_loaded_pack(
    layer: GraftLayer, adapter: str, floats: dict[str, torch.Tensor], policy: PackingPolicy
) -> dict[str, torch.Tensor] | None:
    """The tensors the adapter was loaded from, if its floats still equal their decoding under `policy`."""
    loaded = layer.graft_packed.get(adapter)
    if loaded is None or loaded.policy != policy:
        return None
    dtype = next(tensor.dtype for tensor in floats.values() if tensor.is_floating_point())
    decoded = _decode(layer, loaded.tensors, dtype).tensors
    if decoded.keys() != floats.keys():
        return None
    for name, tensor in floats.items():
        if not torch.equal(decoded[name], tensor.detach().to(decoded[name].device)):
            return None
    return dict(loaded.tensors)


def pack_state_dict(
    model: nn.Module, adapter_name: str, selected: dict[str, Any], policy: PackingPolicy
) -> dict[str, Any]:
    """Replace each GRAFT layer's float tensors in PEFT's selected adapter state dict with their packed encoding."""
    for module_name, layer in graft_layers(model):
        floats = {}
        for attr in STATE_TENSORS:
            key = f"{module_name}.{attr}.{adapter_name}"
            if key in selected:
                floats[attr] = selected.pop(key)
        if not floats:
            continue
        try:
            packed = pack_adapter(layer, adapter_name, floats, policy)
        except ValueError as error:
            raise PackFormatError(f"cannot pack adapter {adapter_name!r} of {module_name}: {error}") from error
        for relative_key, tensor in packed.items():
            attr, _, part = relative_key.partition(".")
            # the adapter name goes second to last so PEFT's key translation strips it
            selected[f"{module_name}.{attr}.{adapter_name}" + (f".{part}" if part else "")] = tensor
    return selected


def unpack_state_dict(
    model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], policy: PackingPolicy
) -> dict[str, torch.Tensor]:
    """Decode a pack file's tensors into the float tensors of the model's GRAFT layers (installed on the way).

    A pack may only set GRAFT tensors, and exactly those of the modules its config adapts: any other key (a base
    weight such as ``...k_proj.weight`` would overwrite the base model, for every pack and for ``disable_adapter``),
    tensors of modules the config does not adapt, and adapted modules the file leaves out (they would keep their
    initial values) are refused before anything is loaded.
    """
    packed_by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        position = key.find(f".{layout.KEY_PREFIX}")
        if position < 0:
            raise PackFormatError(
                f"the pack file holds {key!r}, which is not a GRAFT tensor: a pack may only set GRAFT tensors "
                f"({layout.KEY_PREFIX}*), never the base model's weights. Remove the key, or re-save the pack with "
                "save_pretrained from a model that loaded it."
            )
        packed_by_module.setdefault(key[:position], {})[key[position + 1 :]] = tensor
    decoded: dict[str, torch.Tensor] = {}
    missing = []
    for module_name, layer in graft_layers(model):
        if not layer.owns(adapter_name):
            continue
        for prefix in (module_name, layout.PEFT_PREFIX + module_name):
            if prefix in packed_by_module:
                break
        else:
            if adapter_name not in layer.graft_tied:  # a tied follower's delta is its source's
                missing.append(module_name)
            continue
        try:
            floats = unpack_adapter(layer, adapter_name, packed_by_module.pop(prefix), policy)
        except PackFormatError as error:
            raise PackFormatError(f"adapter {adapter_name!r}, module {module_name}: {error}") from error
        decoded.update({f"{prefix}.{attr}": tensor for attr, tensor in floats.items()})
    if packed_by_module:
        raise PackFormatError(
            f"the pack file holds tensors for {_listed(packed_by_module)}, which adapter {adapter_name!r} does not "
            "adapt in this model (its target_modules / exclude_modules, or another architecture): the pack is "
            "inconsistent with its adapter_config.json"
        )
    if missing:
        raise PackFormatError(
            f"adapter {adapter_name!r} adapts {_listed(missing)}, but the pack file holds no tensors for "
            f"{'it' if len(missing) == 1 else 'them'}: the file is incomplete (re-download or re-save the pack)"
        )
    return decoded


def _listed(names, shown: int = 3) -> str:
    names = sorted(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
