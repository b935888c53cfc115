"""Model cards for SkillPacks and routers, rendered from the templates in ``model_cards/``.

A pack's card is built from the pack folder alone: ``adapter_config.json`` (base, fingerprint, policy,
``pack_info``), the header of ``adapter_model.safetensors`` (bytes per module) and, when present,
``graft_report.json`` (roles, fp16 delta size). So the same card comes out of ``extract``, ``save_pretrained`` and
``push``, and a card can be re-rendered for any pack on disk.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..utils.atomic import write_file
from .folder import PackFolder
from .layout import CARD_FILE
from .summary import pack_summary, span_text

PACK_TAGS = ["peft", "graft", "skillpack"]
ROUTER_TAGS = ["peft", "graft", "skillpack", "router"]


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


def pack_card(
    folder: str | os.PathLike | PackFolder, repo_id: str | None = None, tags: list[str] | None = None
) -> ModelCard:
    """The model card of a pack folder (``repo_id`` goes into the load snippet; `tags` join the card's tags)."""
    pack = folder if isinstance(folder, PackFolder) else PackFolder(folder, require_weights=False)
    config = pack.config
    info: dict[str, Any] = dict(config.get("pack_info") or {})
    summary = pack_summary(pack)
    key = summary["keyed_by"]
    size_table = [
        {
            "key": row[key],
            "modules": row["modules"],
            "forms": ", ".join(row["forms"]),
            "ranks": span_text(row["ranks"]),
            "bits": "/".join(map(str, row["bits"])) or "-",
            "bytes": human_bytes(row["bytes"]),
            "share": f"{row['share']:.1%}",
        }
        for row in summary["groups"]
    ]
    pack_bytes, fp16_delta_bytes = summary["pack_bytes"], summary["fp16_delta_bytes"]

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
        tags=_tags(PACK_TAGS, tags),
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
        table_key=key,
        size_table=size_table,
        pack_bytes=human_bytes(pack_bytes),
        fp16_delta_bytes=human_bytes(fp16_delta_bytes) if fp16_delta_bytes else None,
        ratio=f"{pack_bytes / fp16_delta_bytes:.4f}" if fp16_delta_bytes else None,
        eval_rows=eval_rows,
    )


def router_card(config: dict[str, Any], repo_id: str, tags: list[str] | None = None) -> ModelCard:
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
        tags=_tags(ROUTER_TAGS, tags),
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


def _tags(ours: list[str], extra: list[str] | None) -> list[str]:
    return list(dict.fromkeys([*ours, *(extra or [])]))


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
