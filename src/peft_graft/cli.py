"""The ``peft-graft`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import GraftError


def _bands(text: str) -> list[tuple[int | None, int]]:
    """Parse ``16:8,112:4,rest:2`` into precision bands."""
    bands = []
    for part in text.split(","):
        count, _, bits = part.partition(":")
        if not bits:
            raise argparse.ArgumentTypeError(f"band {part!r} is not n_directions:bits (use 'rest' for the rest)")
        bands.append((None if count.strip() in ("rest", "*") else int(count), int(bits)))
    return bands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-graft", description="GraftLLM SkillPacks for Hugging Face PEFT.")
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser("extract", help="compress a fine-tune's delta against its base into a SkillPack")
    extract.add_argument("--base", required=True, help="base model: local folder or Hub repo id")
    extract.add_argument("--finetuned", required=True, help="fine-tuned model: local folder or Hub repo id")
    extract.add_argument("--output", required=True, help="pack folder to create")
    extract.add_argument("--base-revision")
    extract.add_argument("--finetuned-revision")
    extract.add_argument("--calibration", help=".jsonl ({'text': ...} per line) or .txt (one text per line) for GPTQ")
    extract.add_argument("--calibration-samples", type=int, default=128)
    extract.add_argument("--calibration-length", type=int, default=256, help="tokens per calibration text")
    extract.add_argument("--budget", type=float, help="pack size as a fraction of the fp16 delta, e.g. 0.0625")
    extract.add_argument("--attn-rank", type=int, help="rank of attention projections (GraftConfig.r)")
    extract.add_argument("--mlp-energy", type=float, help="energy kept by MLP projections (GraftConfig.mlp_energy)")
    extract.add_argument("--embed-density", type=float, help="kept fraction of embedding deltas")
    extract.add_argument("--bands", type=_bands, help="precision bands, e.g. 16:8,112:4,rest:2")
    extract.add_argument("--group-size", type=int)
    extract.add_argument("--no-act-order", action="store_true", help="GPTQ in natural column order")
    extract.add_argument("--allow-pickle", action="store_true", help="read .bin checkpoints (only if you trust them)")
    extract.add_argument("--overwrite", action="store_true")

    inspect = commands.add_parser("inspect", help="print a pack's per-module table")
    inspect.add_argument("pack", help="pack folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "extract":
            return _extract(args)
        return _inspect(args)
    except (GraftError, FileExistsError, FileNotFoundError) as error:
        print(f"peft-graft: error: {error}", file=sys.stderr)
        return 2


def _extract(args: argparse.Namespace) -> int:
    from .config import GraftConfig
    from .extraction import extract_skillpack

    overrides = {
        "r": args.attn_rank,
        "mlp_energy": args.mlp_energy,
        "embed_density": args.embed_density,
        "precision_bands": args.bands,
        "group_size": args.group_size,
    }
    config = GraftConfig(**{key: value for key, value in overrides.items() if value is not None})
    report = extract_skillpack(
        args.base,
        args.finetuned,
        args.output,
        config,
        calibration=args.calibration,
        budget=args.budget,
        base_revision=args.base_revision,
        finetuned_revision=args.finetuned_revision,
        allow_pickle=args.allow_pickle,
        act_order=not args.no_act_order,
        calibration_samples=args.calibration_samples,
        calibration_length=args.calibration_length,
        overwrite=args.overwrite,
    )
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .extraction import ExtractionReport

    print(ExtractionReport.load(args.pack).table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
