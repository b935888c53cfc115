"""Extraction at scale: peak RSS and time of ``peft-graft extract`` on synthetic bf16 Llama pairs from 135M to
Llama-3.1-8B shapes, data-free and calibrated, against ``mergekit-extract-lora`` on the same pairs at the same bytes.

    python benchmarks/scale.py [--quick] [--work DIR] [--sizes 135M,360M,1.5B,8B]
                               [--modes data-free,calibrated,mergekit] [--update]

The pairs (benchmarks/synthetic.py: realistic low-rank-plus-noise deltas) are written once into ``--work`` and kept
(an 8B-shaped pair of 8 layers is 11 GB; ``--clean`` removes them at the end). Every extraction runs in its own
process; peak RSS is that process's own (benchmarks/common.run_measured), time per stage comes from the pack's report.
Calibrated runs use 128 texts of 256 tokens (SmolLM2's tokenizer, copied into the synthetic bases), budget 1/16.
Deep shapes are cut to fewer layers where a full run would take hours on this CPU: memory does not depend on depth
(tests/test_extraction_scale.py), and time per layer is reported and extrapolated. The data-free comparison with
mergekit alternates the two for ``--rounds`` rounds and keeps the median run of each. Run it from the environment
``make`` builds, whose packages are byte-compiled as pip's would be: without bytecode every process spends about
6 s more compiling torch and transformers at import, which both extractors pay.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, run_measured, write_results
from synthetic import SHAPES, Shape, write_pair

BUDGET = 1 / 16
# size: (layers for data-free, layers for calibrated); None is the full depth
DEPTHS = {"135M": (None, None), "360M": (None, None), "1.5B": (None, 4), "8B": (8, 2)}
MERGEKIT_SIZES = ("135M", "360M")
QUICK = {"135M": (4, 2)}
# Llama-3.1-70B, for the extrapolation only
LLAMA_70B = Shape(8192, 28672, 80, 64, 8, 128256, False)
CALIBRATION_SAMPLES, CALIBRATION_TOKENS = 128, 256
STAGES = ("startup", "setup", "planning", "compression", "writing")
MODES = ("data-free", "calibrated", "mergekit")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 4-layer 135M-shaped pair only (about 2 minutes)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "peft-graft" / "scale")
    parser.add_argument("--sizes", default=",".join(DEPTHS), help="comma-separated, from " + ", ".join(SHAPES))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the rows measured now in the committed results, keep the others (a partial re-run)",
    )
    parser.add_argument("--render", action="store_true", help="only redraw the table and plot from the results JSON")
    parser.add_argument("--clean", action="store_true", help="delete the synthetic pairs at the end")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the peft-graft / mergekit comparison (medians)"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    depths = QUICK if args.quick else {size: DEPTHS[size] for size in args.sizes.split(",")}
    if args.render:
        depths, args.update = {}, True  # no run: the committed rows, drawn again
    cli = str(Path(sys.executable).with_name("peft-graft"))
    mergekit = str(Path(sys.executable).with_name("mergekit-extract-lora"))
    calibration = _calibration_file(args.work)

    rows: list[dict] = []
    for size, (free_layers, calibrated_layers) in depths.items():
        shape = SHAPES[size]
        for mode, layers in (("data-free", free_layers), ("calibrated", calibrated_layers)):
            if mode not in modes and not (mode == "data-free" and "mergekit" in modes):
                continue
            base, tuned = _pair(args.work, size, shape, layers)
            compare = (
                mode == "data-free"
                and "mergekit" in modes
                and ((size in MERGEKIT_SIZES and not args.quick) or mode not in modes)
            )
            # the head-to-head comparison alternates the two extractors and keeps medians: this shared machine's
            # speed drifts by tens of percent between minutes
            rounds = args.rounds if compare and mode in modes and not args.quick else 1
            graft_runs, mergekit_runs = [], []
            for _ in range(rounds):
                if mode in modes:
                    graft_runs.append(_graft_run(args.work, size, mode, base, tuned, cli, calibration))
                if compare:
                    mergekit_runs.append(_mergekit_run(args.work, size, shape, layers, base, tuned, mergekit))
            if graft_runs:
                seconds, peak, report = _median(graft_runs)
                rows.append(_row(size, shape, layers, mode, seconds, peak, report, len(graft_runs)))
                print(_line(rows[-1]), flush=True)
            if mergekit_runs:
                seconds, peak, rank = _median(mergekit_runs)
                label = f"mergekit-extract-lora (rank {rank})"
                rows.append(_row(size, shape, layers, label, seconds, peak, None, len(mergekit_runs)))
                print(_line(rows[-1]), flush=True)
    shutil.rmtree(args.work / "out", ignore_errors=True)

    suffix = "-quick" if args.quick else ""
    if args.update:
        rows = _merged(rows, RESULTS / f"scale{suffix}.json")
    ratios = _mergekit_ratios(rows)
    extrapolation = _extrapolate(rows)
    table = _table(rows, ratios, extrapolation)
    write_results(
        "scale",
        {"budget": BUDGET, "rows": rows, "mergekit_ratios": ratios, "extrapolation": extrapolation,
         "seconds": time.perf_counter() - started},
        table,
        suffix,
    )  # fmt: skip
    _plot(rows, suffix)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.clean:
        shutil.rmtree(args.work, ignore_errors=True)


def _graft_run(work: Path, size: str, mode: str, base, tuned, cli: str, calibration: Path) -> tuple[float, int, dict]:
    """One ``peft-graft extract`` in its own process: wall seconds, peak RSS and the pack's report."""
    output = work / "out" / f"{size}-{mode}"
    shutil.rmtree(output, ignore_errors=True)
    command = [cli, "extract", "--base", base, "--finetuned", tuned, "--budget", str(BUDGET)]
    command += ["--output", output, "--no-progress"]
    if mode == "calibrated":
        command += ["--calibration", calibration, "--calibration-samples", str(CALIBRATION_SAMPLES)]
        command += ["--calibration-length", str(CALIBRATION_TOKENS)]
    _warm(base, tuned)
    seconds, peak = run_measured(command)
    report = json.loads((output / "graft_report.json").read_text())
    shutil.rmtree(output, ignore_errors=True)
    return seconds, peak, report


def _mergekit_run(work: Path, size: str, shape: Shape, layers, base, tuned, mergekit: str) -> tuple[float, int, int]:
    """mergekit-extract-lora on the same pair, at the rank whose bf16 factors fill the same bytes."""
    rank = _mergekit_rank(shape, layers, BUDGET)
    target = work / "out" / f"{size}-mergekit"
    shutil.rmtree(target, ignore_errors=True)
    command = [mergekit, "--model", tuned, "--base-model", base, "--out-path", target, "--max-rank", str(rank)]
    _warm(base, tuned)
    seconds, peak = run_measured([*command, "--embed-lora", "--quiet"])
    shutil.rmtree(target, ignore_errors=True)
    return seconds, peak, rank


def _median(runs: list[tuple]) -> tuple:
    """The run of median wall time (its peak RSS and report with it)."""
    return sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]


def _warm(*folders: Path) -> None:
    """Read both checkpoints once before a measured run, so that every extractor starts from the page cache (the
    first to read a pair from disk would otherwise pay for both)."""
    for folder in folders:
        for file in sorted(Path(folder).glob("*.safetensors")):
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass


def _kind(row: dict) -> tuple[str, str]:
    return row["size"], next(mode for mode in MODES if row["mode"].startswith(mode))


def _merged(rows: list[dict], committed: Path) -> list[dict]:
    """The committed rows with those measured now replaced, ordered by model size then mode."""
    fresh = {_kind(row) for row in rows}
    kept = [row for row in json.loads(committed.read_text())["rows"] if _kind(row) not in fresh]
    order = {size: index for index, size in enumerate(SHAPES)}
    modes = ("data-free", "mergekit", "calibrated")  # each mergekit row beside the data-free one it is compared to
    return sorted(kept + rows, key=lambda row: (order[row["size"]], modes.index(_kind(row)[1])))


def _pair(work: Path, size: str, shape: Shape, layers: int | None) -> tuple[Path, Path]:
    """The synthetic pair of this shape and depth, written once; the base gets SmolLM2's tokenizer for calibration."""
    from peft_graft._demo.bundled import bundled_model
    from peft_graft.pack.layout import TOKENIZER_FILES

    base, tuned = write_pair(work / f"{size}-{layers or shape.layers}L", shape, layers)
    for name in TOKENIZER_FILES:
        source = bundled_model() / name
        if source.is_file() and not (base / name).is_file():
            shutil.copyfile(source, base / name)
    return base, tuned


def _calibration_file(work: Path) -> Path:
    """128 texts of at least 256 tokens: sentences of arithmetic and words, varied by a fixed seed."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / "calibration.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        words = ["the", "model", "adds", "carries", "digits", "then", "checks", "every", "column", "before", "it"]
        lines = []
        for _ in range(CALIBRATION_SAMPLES):
            sentences = []
            for _ in range(40):
                a, b = rng.randrange(10**6), rng.randrange(10**6)
                sentences.append(f"{a} plus {b} is {a + b}, so {' '.join(rng.sample(words, 6))}.")
            lines.append(json.dumps({"text": " ".join(sentences)}) + "\n")
        path.write_text("".join(lines))
    return path


def _row(size, shape: Shape, layers, mode, seconds, peak, report, rounds: int = 1) -> dict:
    depth = layers or shape.layers
    row = {
        "rounds": rounds,
        "size": size,
        "layers": depth,
        "of_layers": shape.layers,
        "params": shape.parameters(depth),
        "checkpoint_bytes": 2 * shape.parameters(depth),
        "mode": mode,
        "seconds": seconds,
        "peak_rss": peak,
        "measured": time.strftime("%Y-%m-%d"),
    }
    if report is not None:
        stages = report.get("stage_seconds", {})
        # what the report cannot see: interpreter start and imports
        row["stages"] = {"startup": seconds - report["wall_seconds"], **stages}
        # planning (budget mode) and compression both walk every layer; the embeddings' share is counted in too, so
        # this is an upper bound per layer
        row["seconds_per_layer"] = (stages.get("planning", 0.0) + stages.get("compression", 0.0)) / depth
        row["pack_bytes"] = report["pack_bytes"]
    return row


def _line(row: dict) -> str:
    per_layer = f"  {row['seconds_per_layer']:.1f} s/layer" if "seconds_per_layer" in row else ""
    return (
        f"{row['size']:>5} ({row['layers']}/{row['of_layers']} layers) {row['mode']:<34} {row['seconds']:7.1f} s  "
        f"peak RSS {row['peak_rss'] / 2**20:7.0f} MiB{per_layer}"
    )


def _mergekit_rank(shape: Shape, layers: int | None, budget: float) -> int:
    """The rank at which bf16 low-rank factors of every matrix fill `budget` of the bf16 delta."""
    entries = per_rank = 0
    for _, tensor_shape in shape.tensors(layers):
        entries += math.prod(tensor_shape)
        if len(tensor_shape) == 2:
            per_rank += tensor_shape[0] + tensor_shape[1]
    return max(1, int(budget * entries // per_rank))


def _mergekit_ratios(rows: list[dict]) -> dict[str, dict[str, float]]:
    ratios = {}
    for row in rows:
        if row["mode"].startswith("mergekit"):
            ours = next(r for r in rows if r["size"] == row["size"] and r["mode"] == "data-free")
            ratios[row["size"]] = {
                "time": ours["seconds"] / row["seconds"],
                "peak_rss": ours["peak_rss"] / row["peak_rss"],
            }
    return ratios


def _layer_cost(shape: Shape, mode: str) -> float:
    """A decoder layer's work in the extractor's terms, per matrix (m ≥ n): data-free, m·n (every entry is read
    and multiplied by a sketch of fixed width); calibrated, m·n² + n³ (Hessians, their inversion and GPTQ's column
    sweep)."""
    cost = 0.0
    for name, tensor_shape in shape.tensors(1):
        if len(tensor_shape) == 2 and ".layers." in name:
            m, n = max(tensor_shape), min(tensor_shape)
            cost += m * n if mode == "data-free" else m * n * n + n**3
    return cost


def _extrapolate(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Hours on this CPU for a full 8B and 70B extraction, from the deepest 8B-shaped runs' time per layer."""
    out = {}
    for mode in ("data-free", "calibrated"):
        measured = [r for r in rows if r["size"] == "8B" and r["mode"] == mode]
        if not measured:
            continue
        per_layer = measured[0]["seconds_per_layer"]
        scale_70b = _layer_cost(LLAMA_70B, mode) / _layer_cost(SHAPES["8B"], mode)
        out[mode] = {
            "seconds_per_layer_8b": per_layer,
            "hours_8b": per_layer * SHAPES["8B"].layers / 3600,
            "seconds_per_layer_70b_estimate": per_layer * scale_70b,
            "hours_70b_estimate": per_layer * scale_70b * LLAMA_70B.layers / 3600,
            "cost_model": "m·n per matrix" if mode == "data-free" else "m·n² + n³ per matrix",
        }
    return out


def _table(rows, ratios, extrapolation) -> str:
    text = f"Synthetic bf16 Llama pairs (benchmarks/synthetic.py), budget 1/{round(1 / BUDGET)}, on the CPU\n\n"
    text += markdown_table(
        ["size", "layers", "bf16 checkpoint (GiB)", "extractor", "wall (s)", "peak RSS (MiB)", "s / layer",
         "stages (s): startup / setup / planning / compression / writing"],
        [
            [r["size"], f"{r['layers']} of {r['of_layers']}", f"{r['checkpoint_bytes'] / 2**30:.2f}",
             r["mode"] + (f", median of {r['rounds']}" if r.get("rounds", 1) > 1 else ""),
             f"{r['seconds']:.1f}", f"{r['peak_rss'] / 2**20:.0f}",
             f"{r['seconds_per_layer']:.2f}" if "seconds_per_layer" in r else "-",
             " / ".join(f"{r['stages'].get(k, 0):.1f}" for k in STAGES)
             if "stages" in r else "-"]
            for r in rows
        ],
    )  # fmt: skip
    for size, ratio in ratios.items():
        text += (
            f"\n\n{size}: peft-graft data-free / mergekit-extract-lora: time {ratio['time']:.2f}x, "
            f"peak RSS {ratio['peak_rss']:.2f}x"
        )
    for mode, estimate in extrapolation.items():
        text += (
            f"\n\n{mode}, extrapolated on this CPU from the 8B-shaped run: "
            f"8B (32 layers) {estimate['hours_8b']:.1f} h, "
            f"70B (80 layers, {estimate['seconds_per_layer_70b_estimate']:.0f} s per layer by the "
            f"{estimate['cost_model']} cost model) {estimate['hours_70b_estimate']:.1f} h"
        )
    return text


def _plot(rows: list[dict], suffix: str) -> None:
    """Peak RSS against the full model's size: memory does not depend on depth, so a run cut to fewer layers stands
    for its whole shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def params(row: dict) -> float:
        return SHAPES[row["size"]].parameters() / 1e9

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    series = {
        "peft-graft data-free": "data-free",
        "peft-graft calibrated": "calibrated",
        "mergekit-extract-lora": "mergekit",
    }
    for label, mode in series.items():
        points = sorted((params(r), r["peak_rss"] / 2**30) for r in rows if r["mode"].startswith(mode))
        if points:
            axis.plot(*zip(*points, strict=True), "o-", label=label)
    sizes = sorted({params(r) for r in rows})
    axis.plot(sizes, [2 * size * 1e9 / 2**30 for size in sizes], "k--", label="one bf16 checkpoint")
    for size in sorted({r["size"] for r in rows}, key=lambda name: SHAPES[name].parameters()):
        axis.annotate(size, (SHAPES[size].parameters() / 1e9, 0.5), ha="center", fontsize=8)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the size labels say it; minor ticks collide
    axis.set_xlabel("model size (billions of parameters, Llama shapes)")
    axis.set_ylabel("peak RSS (GiB)")
    axis.set_title(f"extraction memory vs model size (synthetic Llama, budget 1/{round(1 / BUDGET)})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"extraction_scale{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
