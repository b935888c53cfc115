"""Static fusion: several SkillPacks of one base combined into one merged model, the alternative to routing.

Routing (:class:`~peft_graft.routing.RoutedGraftModel`) keeps every pack separate and picks one per query. A static
merge instead adds the packs' reconstructed deltas into the base once: ``sum`` (task arithmetic), ``mean``, or
``ties`` (TIES-merging: keep each delta's largest entries, elect a sign per entry by the summed mass, average the
entries that agree). It serves at the base's speed with no router, but the skills interfere; ``peft-graft eval``
puts both side by side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from peft.utils.merge_utils import disjoint_merge, task_arithmetic

from ..errors import FusionError
from ..pack.layout import TOKENIZER_CONFIG
from ..utils.atomic import is_model_folder, write_folder

METHODS = ("sum", "mean", "ties")


def pack_deltas(base_model, pack: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The dense fp32 delta of every base parameter the pack changes, by parameter name.

    `base_model` is attached to and detached again; its weights are never modified.
    """
    from peft import PeftModel

    from ..layer import graft_layers
    from ..pack.folder import PackFolder

    pack = PackFolder(pack).path
    vocab = base_model.get_input_embeddings().weight.shape[0]
    model = PeftModel.from_pretrained(base_model, str(pack), adapter_name="pack")
    try:
        if model.get_input_embeddings().weight.shape[0] != vocab:
            raise FusionError(
                f"{pack} adds tokens to the vocabulary; a static merge needs packs on the base's own vocabulary "
                "(serve it with RoutedGraftModel instead)"
            )
        deltas = {}
        for module_name, module in graft_layers(model.get_base_model()):
            if not module.owns("pack"):
                continue
            for parameter, index, values in module.merge_parts("pack"):
                target = getattr(module.get_base_layer(), parameter)
                delta = torch.zeros(target.shape, dtype=torch.float32)
                if index is None:
                    delta += values.float().reshape(target.shape)
                else:
                    delta.view(-1).index_add_(0, index.long(), values.float())
                deltas[f"{module_name}.{parameter}"] = delta
    finally:
        model.unload()
    return deltas


def combine_deltas(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.2,
) -> dict[str, torch.Tensor]:
    """One delta from several, parameter by parameter; `weights` scale each input first (default 1.0).

    ``ties`` keeps the `density` fraction of largest-magnitude entries of each input tensor, elects each entry's sign
    by the sign of the summed kept values, and averages the kept values that agree with it.
    """
    if method not in METHODS:
        raise FusionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not deltas:
        raise FusionError("combine_deltas needs at least one delta")
    weights = list(weights) if weights is not None else [1.0] * len(deltas)
    if len(weights) != len(deltas):
        raise FusionError(f"got {len(weights)} weights for {len(deltas)} deltas")
    if method == "ties" and not 0.0 < density <= 1.0:
        raise FusionError(f"density must be in (0, 1], got {density}")
    combined = {}
    for name in sorted({name for delta in deltas for name in delta}):
        present = [(w, d[name].float()) for w, d in zip(weights, deltas, strict=True) if name in d]
        if method in ("sum", "mean"):
            total = task_arithmetic([d for _, d in present], torch.tensor([w for w, _ in present]))
            combined[name] = total if method == "sum" else total / len(deltas)
        else:
            combined[name] = _ties(torch.stack([w * d for w, d in present]), density)
    return combined


def _ties(stack: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on weighted deltas stacked on dim 0.

    The disjoint mean is PEFT's (``merge_utils.disjoint_merge``). Pruning and sign election are ours, because PEFT's
    differ: its ``magnitude_based_pruning`` keeps ``int(density·n)`` entries through a top-k (a copy of k indices;
    we keep ``round(density·n)`` by a k-th value threshold), and its ``calculate_majority_sign_mask`` elects + where
    the kept entries sum to exactly zero, where we elect no sign, so that entry merges to zero.
    """
    flat = stack.reshape(stack.shape[0], -1)
    keep = max(1, round(density * flat.shape[1]))
    if keep < flat.shape[1]:
        threshold = flat.abs().kthvalue(flat.shape[1] - keep + 1, dim=1, keepdim=True).values
        flat = torch.where(flat.abs() >= threshold, flat, torch.zeros_like(flat))
    sign = torch.sign(flat.sum(0))
    agree = (torch.sign(flat) == sign) & (flat != 0)
    return disjoint_merge(flat, agree).reshape(stack.shape[1:])


def merge_packs(
    base: str | os.PathLike,
    packs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    method: str = "ties",
    weights: Sequence[float] | None = None,
    density: float = 0.2,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the base with the packs' combined delta added, as a plain transformers model folder.

    The merged model is written in `dtype` (default: the base checkpoint's) with the base's tokenizer.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists; choose another folder or pass overwrite=True (--overwrite)"
        )
    if method not in METHODS:
        raise FusionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not packs:
        raise FusionError("merge_packs needs at least one pack")
    model = AutoModelForCausalLM.from_pretrained(base)
    dtype = dtype or next(model.parameters()).dtype
    model = model.float()
    deltas = [pack_deltas(model, pack) for pack in packs]
    combined = combine_deltas(deltas, method, weights=weights, density=density)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in combined.items():
            parameters[name] += delta
    model = model.to(dtype)

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        if (Path(base) / TOKENIZER_CONFIG).is_file():
            AutoTokenizer.from_pretrained(base).save_pretrained(staging)

    write_folder(output_dir, write, overwrite=overwrite, replaceable=is_model_folder, kind="model folder")
    return output_dir


__all__ = ["METHODS", "combine_deltas", "merge_packs", "pack_deltas"]
