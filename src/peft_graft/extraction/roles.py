"""Which module of a causal LM plays which role in a SkillPack, and with which compression operator.

The module tree comes from instantiating the architecture on the meta device (no weights are allocated), so names,
module types and weight tying are exactly what transformers builds.

Roles: ``embed`` (embeddings and the output embedding: magnitude pruning), ``attn`` (attention projections: rank r),
``mlp`` (other projections: smallest rank holding ``mlp_energy`` of the energy), ``dense`` (norms: fp16 delta),
``skip`` (left out; only on request). Biases are always stored as fp16 deltas of their module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

_ATTENTION = re.compile(
    r"(^|\.)(attn|attention|self_attn|self_attention|q_proj|k_proj|v_proj|o_proj|qkv_proj|c_attn)(\.|$)"
)


@dataclass(frozen=True)
class ModuleSpec:
    """One module whose parameters a pack may carry deltas for."""

    name: str
    kind: str  # "linear", "conv1d", "embedding" or "norm"
    role: str
    weight: str  # checkpoint key of the weight
    bias: str | None  # checkpoint key of the bias, if the module has one
    layer_index: int | None  # index of the decoder layer holding it, if any
    tokens: bool = False  # its rows are token ids: the input or the output embedding (not e.g. GPT-2's positions)

    @property
    def transposed(self) -> bool:
        """Conv1D stores its weight as (in, out); deltas are handled as (out, in)."""
        return self.kind == "conv1d"


def meta_model(folder_or_config) -> PreTrainedModel:
    """The architecture of a checkpoint folder (or config) on the meta device: structure without weights."""
    config = folder_or_config if not isinstance(folder_or_config, str) else AutoConfig.from_pretrained(folder_or_config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Not every transformers 5 release ties on the meta device (5.0 leaves lm_head its own weight): tie as the config
    # says, or a tied base would be read as one whose checkpoint lacks lm_head.weight.
    model.tie_weights()
    return model


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose length is the config's number of hidden layers."""
    count = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the list of {count} decoder layers in {type(model).__name__}")


def module_specs(model: PreTrainedModel, role_override=None) -> list[ModuleSpec]:
    """Specs of every module a delta can attach to, in model order. `role_override(name)` may return a role."""
    layers_name, _ = decoder_layers(model)
    layer_pattern = re.compile(rf"^{re.escape(layers_name)}\.(\d+)\.")
    output_embeddings = model.get_output_embeddings()
    token_modules = (model.get_input_embeddings(), output_embeddings)
    specs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            kind, role = "embedding", "embed"
        elif isinstance(module, Conv1D):
            kind, role = "conv1d", _projection_role(name)
        elif isinstance(module, nn.Linear):
            kind, role = "linear", "embed" if module is output_embeddings else _projection_role(name)
        elif _is_norm(module):
            kind, role = "norm", "dense"
        else:
            continue
        if role_override is not None:
            role = role_override(name) or role
        match = layer_pattern.match(name)
        bias = getattr(module, "bias", None)
        specs.append(
            ModuleSpec(
                name=name,
                kind=kind,
                role=role,
                weight=f"{name}.weight",
                bias=f"{name}.bias" if isinstance(bias, torch.Tensor) else None,
                layer_index=int(match.group(1)) if match else None,
                tokens=any(module is token_module for token_module in token_modules),
            )
        )
    return specs


def tied_output_embedding(model: PreTrainedModel) -> str | None:
    """Name of the output embedding module when its weight is the input embedding's, else None."""
    output_embeddings = model.get_output_embeddings()
    if output_embeddings is None or output_embeddings.weight is not model.get_input_embeddings().weight:
        return None
    return next(name for name, module in model.named_modules() if module is output_embeddings)


def _projection_role(name: str) -> str:
    return "attn" if _ATTENTION.search(name) else "mlp"


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 1 and not list(module.children())
