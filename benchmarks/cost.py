"""Extraction cost on the real pair: wall time and peak RSS of ``peft-graft extract`` (data-free and calibrated)
against the low-rank extractor (``mergekit-extract-lora``) on the SmolLM2-135M arithmetic fine-tune, at the same
bytes, each in its own process. How extraction grows with model size is benchmarks/scale.py.

    python benchmarks/cost.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, run_measured, write_results

from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, finetuned_skill
from peft_graft.evaluation.tasks import chat_text

BUDGET = 1 / 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="data-free and mergekit only (the target's pair), written as cost-quick.*",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-cost-"))
    base_dir, tuned_dir = bundled_model(), finetuned_skill(ARITHMETIC)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, _ = ARITHMETIC.split()
    calibration = work / "calibration.jsonl"
    calibration.write_text(
        "".join(json.dumps({"text": chat_text(tokenizer, e.question, e.answer)}) + "\n" for e in train[:64])
    )
    model_bytes = _checkpoint_bytes(tuned_dir)
    rank = _rank_for(base_dir, BUDGET)

    cli = str(Path(sys.executable).with_name("peft-graft"))
    mergekit = str(Path(sys.executable).with_name("mergekit-extract-lora"))
    common = ["extract", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--budget", str(BUDGET)]
    runs = {
        "peft-graft extract (data-free)": [cli, *common, "--output", str(work / "df")],
        "peft-graft extract (calibrated)": [
            cli,
            *common,
            "--output",
            str(work / "cal"),
            "--calibration",
            str(calibration),
        ],
        f"mergekit-extract-lora (rank {rank})": [
            mergekit,
            "--model",
            str(tuned_dir),
            "--base-model",
            str(base_dir),
            "--out-path",
            str(work / "mk"),
            "--max-rank",
            str(rank),
            "--embed-lora",
            "--quiet",
        ],
    }
    if args.quick:  # the calibrated run is the slowest of the three, and no target names it
        del runs["peft-graft extract (calibrated)"]
    real = {}
    for name, command in runs.items():
        seconds, peak = run_measured(command, env={"OMP_NUM_THREADS": str(os.cpu_count() or 1)})
        real[name] = {"seconds": seconds, "peak_rss": peak, "rss_over_model": peak / model_bytes}
        print(f"{name:<40} {seconds:6.1f} s  peak RSS {peak / 2**20:7.0f} MiB ({peak / model_bytes:.2f}x the model)")
    mk_name = next(n for n in real if n.startswith("mergekit"))
    real_ratio = real["peft-graft extract (data-free)"]["seconds"] / real[mk_name]["seconds"]

    table = (
        f"SmolLM2-135M-Instruct -> arithmetic fine-tune ({model_bytes / 2**20:.0f} MiB on disk, fp32), budget 1/16"
        + (" (quick: no calibrated run)" if args.quick else "")
        + "\n\n"
    )
    table += markdown_table(
        ["extractor", "wall (s)", "peak RSS (MiB)", "RSS / model bytes"],
        [
            [n, f"{r['seconds']:.1f}", f"{r['peak_rss'] / 2**20:.0f}", f"{r['rss_over_model']:.2f}"]
            for n, r in real.items()
        ],
    )
    table += f"\n\ndata-free time / mergekit time: {real_ratio:.2f} (target <= 0.5)\n\n"
    suffix = "-quick" if args.quick else ""
    write_results(
        "cost",
        {
            "real": real,
            "data_free_over_mergekit": real_ratio,
            "budget": BUDGET,
            "seconds": time.perf_counter() - started,
        },
        table,
        suffix,
    )
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


def _checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _rank_for(base_dir: Path, budget: float) -> int:
    """The rank at which fp16 low-rank factors of every matrix fill `budget` of the fp16 delta."""
    from safetensors import safe_open

    entries = per_rank = 0
    with safe_open(str(base_dir / "model.safetensors"), "pt") as handle:
        for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            shape = handle.get_slice(name).get_shape()
            entries += 2 * torch.Size(shape).numel()
            if len(shape) == 2:
                per_rank += 2 * (shape[0] + shape[1])
    return max(1, int(budget * entries // per_rank))


if __name__ == "__main__":
    main()
