"""What a pack holds, summarised by role (or by form, for packs without an extraction report): the numbers the
model card and ``peft-graft inspect`` show, from the folder alone."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

from .folder import PackFolder
from .layout import LOWRANK

# How a module form is named where the pack has no roles (packs trained with get_peft_model)
FORM_LABELS = {LOWRANK: "low-rank"}


def pack_summary(folder: str | os.PathLike | PackFolder) -> dict[str, Any]:
    """A JSON-ready summary of a pack folder: provenance, sizes, and one row per role with the forms, ranks and bits
    its modules actually got (from ``graft_report.json`` when the pack was extracted); ``modules`` lists every
    module."""
    pack = folder if isinstance(folder, PackFolder) else PackFolder(folder, require_weights=False)
    config = pack.config
    info: dict[str, Any] = dict(config.get("pack_info") or {})
    report = pack.report or {}
    reported = {module["name"]: module for module in report.get("modules", [])}
    modules = []
    for name, (form, size) in sorted(pack.module_bytes().items()):
        entry = reported.get(name, {})
        modules.append(
            {
                "name": name,
                "role": entry.get("role"),
                "form": entry.get("form", form),
                "rank": entry.get("rank"),
                "bits": _bits(entry),
                "bands": entry.get("bands"),
                "density": entry.get("density"),
                "bytes": size,
            }
        )
    keyed_by = "role" if reported else "form"
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for module in modules:
        key = module["role"] if reported and module["role"] else FORM_LABELS.get(module["form"], module["form"])
        groups[key].append(module)
    total = sum(module["bytes"] for module in modules) or 1
    rows = []
    for key, members in groups.items():
        size = sum(m["bytes"] for m in members)
        rows.append(
            {
                keyed_by: key,
                "modules": len(members),
                "forms": sorted({m["form"] for m in members}),
                "ranks": _span(m["rank"] for m in members),
                "bits": sorted({b for m in members for b in m["bits"]}, reverse=True),
                "bytes": size,
                "share": size / total,
            }
        )
    rows.sort(key=lambda row: -row["bytes"])
    pack_bytes = pack.pack_bytes
    fp16_delta_bytes = info.get("fp16_delta_bytes") or report.get("fp16_delta_bytes")
    return {
        "path": str(pack.path),
        "kind": "pack",
        "skill": info.get("skill"),
        "base": config.get("base_model_name_or_path"),
        "base_revision": config.get("revision"),
        "base_fingerprint": config.get("base_model_fingerprint"),
        "finetuned": info.get("finetuned"),
        "format_version": config.get("format_version"),
        "extracted": bool(info.get("finetuned")),
        "calibrated": info.get("calibrated"),
        "budget": info.get("budget"),
        "pack_bytes": pack_bytes,
        "fp16_delta_bytes": fp16_delta_bytes,
        "ratio": pack_bytes / fp16_delta_bytes if fp16_delta_bytes else None,
        "keyed_by": keyed_by,
        "groups": rows,
        "modules": modules,
    }


def _bits(entry: dict[str, Any]) -> list[int]:
    """The bit widths a reported module was stored at (its bands', or its quantized form's)."""
    bits = {int(band_bits) for _, band_bits in entry.get("bands") or []}
    if entry.get("bits"):
        bits.add(int(entry["bits"]))
    return sorted(bits, reverse=True)


def _span(values) -> list[int] | None:
    """[smallest, largest] of the values that are not None, or None."""
    present = [value for value in values if value is not None]
    return [min(present), max(present)] if present else None


def span_text(span: list[int] | None) -> str:
    """A [smallest, largest] span as text: "-", "16" or "15–92"."""
    if span is None:
        return "-"
    return str(span[0]) if span[0] == span[1] else f"{span[0]}–{span[1]}"
