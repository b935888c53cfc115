"""What the commands print: results on stdout (tables through rich, or JSON), notes on stderr unless ``--quiet``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click


def _quiet() -> bool:
    context = click.get_current_context(silent=True)
    settings = context.find_root().obj if context is not None else None
    return bool(settings and settings.quiet)


def result(text: str) -> None:
    """A command's result (always shown, on stdout)."""
    click.echo(text)


def note(text: str) -> None:
    """A side remark (what was written, how long it took): stderr, and not with --quiet."""
    if not _quiet():
        click.echo(text, err=True)


def json_out(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _console():
    """A rich console on stdout; when piped, wide enough that module names are never cut (rich assumes 80)."""
    import sys

    from rich.console import Console

    return Console(soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def summary(folder: Path | str) -> dict[str, Any]:
    """The summary of a pack folder or a router folder (``kind`` says which); a clear error for anything else."""
    from peft_graft.errors import PackFormatError
    from peft_graft.pack.layout import ADAPTER_CONFIG
    from peft_graft.routing.config import ROUTER_CONFIG

    folder = Path(folder)
    if not folder.exists():
        raise click.BadParameter(f"{folder} does not exist", param_hint="FOLDER")
    if not folder.is_dir():
        raise click.BadParameter(
            f"{folder} is a file: give the pack folder (with {ADAPTER_CONFIG}) or a router folder (with "
            f"{ROUTER_CONFIG}) that holds it",
            param_hint="FOLDER",
        )
    if (folder / ROUTER_CONFIG).is_file():
        from peft_graft.routing.summary import router_summary

        return router_summary(folder)
    if not (folder / ADAPTER_CONFIG).is_file():
        raise PackFormatError(
            f"{folder} is neither a pack folder (no {ADAPTER_CONFIG}) nor a router folder (no {ROUTER_CONFIG})",
            path=folder,
        )
    from peft_graft.pack.summary import pack_summary

    return pack_summary(folder)


def pack(summary: dict[str, Any], *, modules: bool) -> None:
    """A pack's summary: its provenance, its size, a table by role (and with `modules`, one row per module)."""
    from rich.table import Table

    from peft_graft.pack.card import human_bytes
    from peft_graft.pack.summary import span_text

    console = _console()
    lines = [f"[bold]{summary['path']}[/bold]" + (f"  skill: {summary['skill']}" if summary["skill"] else "")]
    lines.append(f"base: {summary['base'] or 'not recorded'}")
    if summary["finetuned"]:
        how = "GPTQ on calibration data" if summary["calibrated"] else "round-to-nearest (no calibration data)"
        budget = f", budget {summary['budget']:.4g} of the fp16 delta" if summary["budget"] else ""
        lines.append(f"extracted from: {summary['finetuned']} ({how}{budget})")
    size = f"size: {human_bytes(summary['pack_bytes'])}"
    if summary["ratio"] is not None:
        size += f" = {summary['ratio']:.4f} of the fp16 delta ({human_bytes(summary['fp16_delta_bytes'])})"
    lines.append(size)
    for line in lines:
        console.print(line, highlight=False)
    key = summary["keyed_by"]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column, justify in ((key, "left"), ("modules", "right"), ("forms", "left"), ("ranks", "right")):
        table.add_column(column, justify=justify)
    for column in ("bits", "bytes", "share"):
        table.add_column(column, justify="right")
    for row in summary["groups"]:
        table.add_row(
            row[key],
            str(row["modules"]),
            ", ".join(row["forms"]),
            span_text(row["ranks"]),
            "/".join(map(str, row["bits"])) or "-",
            human_bytes(row["bytes"]),
            f"{row['share']:.1%}",
        )
    console.print(table)
    if modules:
        detail = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("module", "role", "form", "rank", "directions x bits", "bytes"):
            detail.add_column(column, justify="right" if column in ("rank", "bytes") else "left", no_wrap=True)
        for module in summary["modules"]:
            if module["bands"]:
                bits = ",".join(f"{count}x{bits}" for count, bits in module["bands"])
            elif module["density"]:
                bits = f"{module['density']:.3f} kept"
            else:
                bits = "/".join(map(str, module["bits"])) or "-"
            detail.add_row(
                module["name"],
                module["role"] or "-",
                module["form"],
                "-" if module["rank"] is None else str(module["rank"]),
                bits,
                human_bytes(module["bytes"]),
            )
        console.print(detail)
    elif len(summary["modules"]) > len(summary["groups"]):
        console.print(f"{len(summary['modules'])} modules: --modules lists each one", style="dim", highlight=False)


def router(summary: dict[str, Any]) -> None:
    """A router folder's summary: how it routes, and its packs."""
    from rich.table import Table

    from peft_graft.pack.card import human_bytes

    console = _console()
    console.print(f"[bold]{summary['path']}[/bold]  router: {summary['router']}", highlight=False)
    console.print(f"base: {summary['base'] or 'not recorded'}", highlight=False)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("pack", "where", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for entry in summary["packs"]:
        size = "-" if entry["pack_bytes"] is None else human_bytes(entry["pack_bytes"])
        table.add_row(entry["name"], entry["location"], size)
    console.print(table)
