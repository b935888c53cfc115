"""Export a SkillPack as a standard PEFT LoRA adapter, for servers that batch LoRAs (vLLM, LoRAX, TGI).

Each low-rank module ``Δ = U·diag(S)·Vᵀ`` becomes ``lora_A = Vᵀ`` and ``lora_B = U·diag(S)`` at the module's own rank,
with ``lora_alpha = r`` so the LoRA scaling is 1: the exported adapter computes the dequantized pack delta exactly.
The other parts of a pack (embedding / ``lm_head`` deltas in any form, dense deltas, norm and bias deltas) have no
LoRA form those servers accept: they are dropped with a warning, or, given the base model, merged into a copy of it
that the LoRA is then served on. Projections stored as group-quantized dense deltas (``forms="any"`` packs) are refused
unless they are merged that way: dropping them would drop much of the skill.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ExportError
from ..pack.codec import QUANTIZED_PREFIX, decode_lowrank
from ..pack.folder import PackFolder, is_adapter_folder
from ..pack.layout import ADAPTER_WEIGHTS, PEFT_PREFIX, TOKENIZER_CONFIG
from ..utils.atomic import is_model_folder, write_folder

logger = logging.getLogger(__name__)


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote."""

    output_dir: str
    lora_modules: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    merged_base_dir: str | None = None

    def summary(self) -> str:
        lines = [
            f"LoRA adapter: {len(self.lora_modules)} modules, ranks {min(self.ranks.values(), default=0)}"
            f"-{max(self.ranks.values(), default=0)} -> {self.output_dir}"
        ]
        if self.merged:
            lines.append(f"merged into {self.merged_base_dir}: {', '.join(self.merged)}")
        if self.dropped:
            lines.append(f"dropped (no LoRA form): {', '.join(self.dropped)}")
        return "\n".join(lines)


def export_lora(
    pack: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    merged_base_dir: str | os.PathLike | None = None,
    merged_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> LoraExport:
    """Write the pack's low-rank deltas as a PEFT LoRA adapter in `output_dir`.

    With `base` and `merged_base_dir`, the pack's other deltas are merged into a copy of the base saved in
    `merged_base_dir` (serve the LoRA on that copy), in `merged_dtype` (default: the base's own dtype, which rounds
    the merged weights to it); without them, those deltas are dropped with a warning.
    """
    folder = PackFolder(pack)
    pack = folder.path
    output_dir = Path(output_dir)
    if (base is None) != (merged_base_dir is None):
        raise ExportError("pass both base= and merged_base_dir= to merge the non-LoRA deltas, or neither to drop them")
    for target in (output_dir, Path(merged_base_dir) if merged_base_dir else None):
        if target is not None and target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; choose another folder or pass overwrite=True")
    config = folder.config
    by_module = folder.modules()

    quantized = sorted(m for m, tensors in by_module.items() if any(k.startswith(QUANTIZED_PREFIX) for k in tensors))
    if quantized and merged_base_dir is None:
        raise ExportError(
            f"{pack} stores {len(quantized)} projection(s) as group-quantized dense deltas ({', '.join(quantized[:3])}"
            f"{', ...' if len(quantized) > 3 else ''}), which have no LoRA form: dropping them would lose the skill. "
            "Extract a LoRA-exportable pack with forms='lowrank' (peft-graft extract --forms lowrank), or pass base= "
            "and merged_base_dir= (--base / --merged-base) to merge them into a copy of the base."
        )
    # embeddings have no LoRA form those servers accept, whatever their form in the pack
    embeddings = {m["name"] for m in (folder.report or {}).get("modules", []) if m.get("role") == "embed"}
    lora: dict[str, torch.Tensor] = {}
    report = LoraExport(str(output_dir))
    for module, tensors in sorted(by_module.items()):
        lowrank = {k: t for k, t in tensors.items() if k != "graft_bias"}
        if "graft_S" not in lowrank or module in embeddings:
            report.dropped.append(module)
            continue
        u, s, v = decode_lowrank(lowrank, torch.float32)
        # the LoRA adapter file uses PEFT's own key layout, which ours shares
        lora[f"{PEFT_PREFIX}{module}.lora_A.weight"] = v.T.contiguous()
        lora[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (u * s).contiguous()
        report.lora_modules.append(module)
        report.ranks[module] = int(s.shape[0])
        if "graft_bias" in tensors:
            report.dropped.append(f"{module} (bias)")
    if not lora:
        raise ExportError(f"{pack} has no low-rank deltas: there is nothing to export as LoRA")

    if merged_base_dir is not None:
        report.merged, report.dropped = report.dropped, []
        report.merged_base_dir = str(merged_base_dir)
        _write_merged_base(folder, Path(base), Path(merged_base_dir), set(report.lora_modules), merged_dtype, overwrite)
    elif report.dropped:
        logger.warning(
            "LoRA has no form for these deltas of %s, so the export drops them: %s. The exported adapter reproduces "
            "the pack only without them; pass base= and merged_base_dir= (--base / --merged-base) to merge them into "
            "a copy of the base instead.",
            pack,
            ", ".join(report.dropped),
        )

    _write_lora(output_dir, lora, config, report, overwrite)
    return report


def _write_lora(output_dir: Path, tensors, pack_config: dict, report: LoraExport, overwrite: bool) -> None:
    from peft import LoraConfig

    ranks = report.ranks
    rank = max(ranks.values())
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: r for m, r in ranks.items() if r != rank},
        lora_dropout=0.0,
        bias="none",
        task_type=pack_config.get("task_type") or "CAUSAL_LM",
        base_model_name_or_path=report.merged_base_dir or pack_config.get("base_model_name_or_path"),
        revision=None if report.merged_base_dir else pack_config.get("revision"),
        inference_mode=True,
    )

    def write(staging: Path) -> None:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        lora_config.save_pretrained(str(staging))

    write_folder(output_dir, write, overwrite=overwrite, replaceable=is_adapter_folder, kind="PEFT adapter folder")


def _write_merged_base(pack: PackFolder, base: Path, target: Path, lowrank: set[str], dtype, overwrite: bool) -> None:
    """The base with every non-low-rank delta of the pack merged in (vocabulary grown if the pack adds tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..layer import graft_layers

    model = AutoModelForCausalLM.from_pretrained(base)
    dtype = dtype or next(model.parameters()).dtype
    peft_model = PeftModel.from_pretrained(model.float(), str(pack.path))
    for name, module in graft_layers(peft_model.get_base_model()):
        if name not in lowrank and not module.graft_tied:
            module.merge()
    merged = peft_model.unload().to(dtype)
    tokenizer_source = pack.path if pack.has_tokenizer else base

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        if (Path(tokenizer_source) / TOKENIZER_CONFIG).is_file():
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)

    write_folder(target, write, overwrite=overwrite, replaceable=is_model_folder, kind="model folder")


__all__ = ["LoraExport", "export_lora"]
