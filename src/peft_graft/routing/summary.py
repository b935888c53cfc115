"""What a router folder holds, for ``peft-graft inspect``: how it routes, and its packs with their sizes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .config import RouterConfig


def router_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready summary of a router folder: base, how it routes (a classifier, a manual map, or both), and each
    pack's location and size (local packs; Hub packs are not downloaded)."""
    from ..pack.folder import PackFolder

    root = Path(folder)
    config = RouterConfig.read(root)
    packs = []
    for name, source in config.sources(root).items():
        local = source.is_local
        where = Path(source.location).resolve().relative_to(root.resolve()).as_posix() if local else source.location
        if not local and (source.commit or source.revision):
            where += f"@{source.commit or source.revision}"
        packs.append(
            {
                "name": name,
                "location": where,
                "local": local,
                "pack_bytes": PackFolder(source.location).pack_bytes if local else None,
            }
        )
    kinds = [kind for kind, present in (("classifier", config.router), ("manual map", config.manual)) if present]
    return {
        "path": str(root),
        "kind": "router",
        "router": " + ".join(kinds) or "none",
        "labels": list(config.labels),
        "threshold": config.threshold,
        "embedder": config.embedder,
        "manual": config.manual,
        "base": config.base_model_name_or_path,
        "base_fingerprint": config.base_model_fingerprint,
        "format_version": config.format_version,
        "packs": packs,
    }
