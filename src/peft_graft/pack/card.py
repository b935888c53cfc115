"""Model cards for SkillPacks and routers, rendered from the templates in ``model_cards/``.

A pack's card is built from the pack folder alone: ``adapter_config.json`` (base, fingerprint, policy,
``pack_info``), the header of ``adapter_model.safetensors`` (bytes per module) and, when present,
``graft_report.json`` (roles, fp16 delta size). So the same card comes out of ``extract``, ``save_pretrained`` and
``push``, and a card can be re-rendered for any pack on disk.
"""

from __future__ import annotations

import os
from collections import defaultdict
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..utils.atomic import write_file
from .folder import PackFolder
from .layout import CARD_FILE, LOWRANK

PACK_TAGS = ["peft", "graft", "skillpack"]
ROUTER_TAGS = ["peft", "graft", "skillpack", "router"]
# How the card's size table names a module form where the pack has no roles (packs trained with get_peft_model)
_FORM_LABELS = {LOWRANK: "low-rank"}


def templates_dir() -> Path:
    """``model_cards/``: inside the installed wheel, or at the root of a source checkout."""
    shipped = resources.files("peft_graft") / "model_cards"
    if shipped.is_dir():
        return Path(str(shipped))
    return Path(__file__).resolve().parents[3] / "model_cards"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def pack_card(folder: str | os.PathLike | PackFolder, repo_id: str | None = None) -> ModelCard:
    """The model card of a pack folder (``repo_id`` goes into the load snippet)."""
    pack = folder if isinstance(folder, PackFolder) else PackFolder(folder, require_weights=False)
    config = pack.config
    report = pack.report or {}
    info: dict[str, Any] = dict(config.get("pack_info") or {})
    roles = {module["name"]: module["role"] for module in report.get("modules", [])}
    pack_bytes = pack.pack_bytes
    fp16_delta_bytes = info.get("fp16_delta_bytes") or report.get("fp16_delta_bytes")

    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for module, (form, size) in pack.module_bytes().items():
        key = roles.get(module, _FORM_LABELS.get(form, form))
        groups[key][0] += 1
        groups[key][1] += size
    total = sum(size for _, size in groups.values()) or 1
    size_table = [
        {"key": key, "modules": count, "bytes": human_bytes(size), "share": f"{size / total:.1%}"}
        for key, (count, size) in sorted(groups.items(), key=lambda item: -item[1][1])
    ]

    recorded_base = config.get("base_model_name_or_path")
    base_model = recorded_base or "unknown"
    skill = info.get("skill")
    repo_id = repo_id or pack.path.name
    eval_rows = [
        {"task": result["task"], "metric": result["metric"], "value": _value(result["value"])}
        for result in info.get("eval_results") or []
    ]
    data = ModelCardData(
        library_name="peft",
        base_model=recorded_base if recorded_base and _is_repo_id(recorded_base) else None,
        tags=PACK_TAGS,
        pipeline_tag="text-generation" if config.get("task_type") in (None, "CAUSAL_LM") else None,
        license=info.get("license"),
        model_name=repo_id,
        eval_results=[_eval_result(result) for result in info.get("eval_results") or []] or None,
    )
    bands = ", ".join(
        f"{'the rest' if n is None else f'{n} directions'} at {bits} bits"
        for n, bits in config.get("precision_bands") or []
    )
    calibrated = info.get("calibrated")
    return ModelCard.from_template(
        data,
        template_path=str(templates_dir() / "skillpack.md"),
        title=f"SkillPack: {skill}" if skill else f"SkillPack {repo_id}",
        skill=skill,
        repo_id=repo_id,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if data.base_model else "#",
        base_revision=config.get("revision"),
        extracted=bool(info.get("finetuned")),
        fingerprint=config.get("base_model_fingerprint"),
        finetuned=info.get("finetuned"),
        finetuned_revision=info.get("finetuned_revision"),
        graft_version=_version(),
        format_version=config.get("format_version"),
        attn_rank=config.get("r"),
        mlp_energy=config.get("mlp_energy"),
        embed_density=config.get("embed_density"),
        bands=bands,
        group_size=config.get("group_size"),
        quantization="GPTQ on calibration activations (Vᵀ on the inputs x, then U on Σ·V̂ᵀ·x)"
        if calibrated
        else "round-to-nearest (no calibration data)",
        budget=f"{info['budget']:.4g}" if info.get("budget") else None,
        table_key="role" if roles else "form",
        size_table=size_table,
        pack_bytes=human_bytes(pack_bytes),
        fp16_delta_bytes=human_bytes(fp16_delta_bytes) if fp16_delta_bytes else None,
        ratio=f"{pack_bytes / fp16_delta_bytes:.4f}" if fp16_delta_bytes else None,
        eval_rows=eval_rows,
    )


def router_card(config: dict[str, Any], repo_id: str) -> ModelCard:
    """The model card of a router, from its ``router_config.json`` contents."""
    recorded_base = config.get("base_model_name_or_path")
    base_model = recorded_base or "unknown"
    packs = []
    for name in config.get("labels", []):
        source = config["packs"][name]
        if "repo_id" in source:
            packs.append({"name": name, "source": f"`{source['repo_id']}`", "revision": source.get("revision") or "-"})
        else:
            packs.append({"name": name, "source": f"`{source['path']}` (in this repo)", "revision": "-"})
    router_kind = "a small feed-forward classifier over base-model embeddings"
    if config.get("router") is None and config.get("manual"):
        router_kind = "a fixed task-type → pack map"
    data = ModelCardData(
        library_name="peft",
        base_model=recorded_base if recorded_base and _is_repo_id(recorded_base) else None,
        tags=ROUTER_TAGS,
        pipeline_tag="text-generation",
    )
    return ModelCard.from_template(
        data,
        template_path=str(templates_dir() / "router.md"),
        title=f"SkillPack router {repo_id}",
        repo_id=repo_id,
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if data.base_model else "#",
        router_kind=router_kind,
        threshold=config.get("threshold"),
        packs=packs,
        fingerprint=config.get("base_model_fingerprint"),
    )


def write_card(card: ModelCard, folder: str | os.PathLike) -> Path:
    """Write ``README.md`` atomically."""
    return write_file(Path(folder) / CARD_FILE, str(card))


def write_pack_card(folder: str | os.PathLike | PackFolder, repo_id: str | None = None) -> Path:
    """(Re)write a pack folder's README.md from its files."""
    pack = folder if isinstance(folder, PackFolder) else PackFolder(folder, require_weights=False)
    return write_card(pack_card(pack, repo_id=repo_id), pack.path)


def _eval_result(result: dict[str, Any]) -> EvalResult:
    return EvalResult(
        task_type="text-generation",
        dataset_type=str(result.get("dataset", result["task"])),
        dataset_name=str(result.get("dataset", result["task"])),
        metric_type=str(result["metric"]),
        metric_value=result["value"],
    )


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _version() -> str:
    from .._version import __version__

    return __version__
