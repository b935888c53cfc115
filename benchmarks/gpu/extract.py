"""GPU check of extraction at scale: a Llama-3.1-8B-shaped synthetic pair (the first `--layers` decoder layers),
extracted data-free and calibrated on the device, then data-free on the CPU over the same layers; reports time and
peak device memory, and whether the CPU and the device agree (the same plan, factors equal up to float tolerance).

    bash benchmarks/gpu/extract.sh            # on a machine with a GPU, from the repository root

Runs in one process with the machine's own torch (no install): ``PYTHONPATH=src:benchmarks:tests``. Writes
``gpu-extract.json`` and ``.md`` into ``--out``. Calibration uses a character-level tokenizer built offline (the
device machine has no Hub and no bundled model): 128 texts of 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from common import machine, markdown_table
from safetensors import safe_open
from synthetic import SHAPES, write_pair

from peft_graft import extract_skillpack

from tiny_models import tiny_tokenizer  # character-level, built offline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/graft-gpu-extract"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--shape", default="8B", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--device", default="cuda", help="the device under test (cpu runs the script's own check)")
    parser.add_argument("--budget", type=float, default=1 / 16)
    args = parser.parse_args()
    started = time.perf_counter()
    base, tuned = write_pair(args.work / f"{args.shape}-{args.layers}L", SHAPES[args.shape], args.layers)
    tiny_tokenizer().save_pretrained(base)
    print(f"pair written in {time.perf_counter() - started:.0f} s", flush=True)
    texts = _texts()

    runs = {}
    for name, device, calibration in (
        (f"data-free on {args.device}", args.device, None),
        (f"calibrated on {args.device}", args.device, texts),
        ("data-free on cpu (reference)", "cpu", None),
    ):
        output = args.work / name.replace(" ", "-")
        runs[name] = _extract(base, tuned, output, device, calibration, args.budget)
        print(f"{name:<28} {runs[name]['seconds']:7.1f} s  peak device memory "
              f"{runs[name]['peak_device_bytes'] / 2**30:.2f} GiB  peak RSS {runs[name]['peak_rss'] / 2**30:.2f} GiB",
              flush=True)  # fmt: skip
    agreement = _agreement(args.work / f"data-free-on-{args.device}", args.work / "data-free-on-cpu-(reference)")
    print(json.dumps(agreement, indent=1))

    payload = {"machine": machine(), "shape": args.shape, "layers": args.layers, "budget": args.budget,
               "runs": runs, "agreement": agreement}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-extract.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    info = payload["machine"]
    table = f"_{info['date']}, device {info['device']}, torch {info['torch']}_\n\n"
    table += f"{args.shape}-shaped synthetic pair, {args.layers} decoder layers, budget {args.budget:g}\n\n"
    table += markdown_table(
        ["run", "wall (s)", "s / layer", "peak device memory (GiB)", "process peak RSS so far (GiB)"],
        [[name, f"{r['seconds']:.1f}", f"{r['seconds_per_layer']:.2f}", f"{r['peak_device_bytes'] / 2**30:.2f}",
          f"{r['peak_rss'] / 2**30:.2f}"] for name, r in runs.items()],
    )  # fmt: skip
    table += f"\n\nCPU vs {args.device}: " + ", ".join(f"{k} {v}" for k, v in agreement.items())
    (args.out / "gpu-extract.md").write_text(table + "\n")
    print(table)


def _extract(base, tuned, output, device, calibration, budget) -> dict:
    from peft_graft.extraction.report import peak_rss_bytes

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    report = extract_skillpack(
        base, tuned, output, budget=budget, device=device, calibration=calibration, overwrite=True, progress=False
    )
    return {
        "seconds": report.wall_seconds,
        "stages": report.stage_seconds,
        "seconds_per_layer": report.stage_seconds["per_layer"],
        "peak_device_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "peak_rss": peak_rss_bytes(),
        "pack_bytes": report.pack_bytes,
        "plan": {m.name: [m.form, m.rank, m.bands, m.density] for m in report.modules},
        "frobenius_error": {m.name: m.frobenius_error for m in report.modules},
    }


def _agreement(device_pack: Path, cpu_pack: Path) -> dict:
    """Same plan (forms, ranks, bands, densities), and the packs' tensors equal up to float tolerance: floating
    tensors within 1e-2 relative, quantized codes equal in at least 99 % of bytes (a rounding boundary may flip)."""
    device_report = json.loads((device_pack / "graft_report.json").read_text())
    cpu_report = json.loads((cpu_pack / "graft_report.json").read_text())
    plan = lambda report: {m["name"]: (m["form"], m["rank"], m["bands"], m["density"]) for m in report["modules"]}  # noqa: E731
    worst_float, worst_codes = 0.0, 1.0
    with (
        safe_open(device_pack / "adapter_model.safetensors", "pt") as a,
        safe_open(cpu_pack / "adapter_model.safetensors", "pt") as b,
    ):
        same_names = set(a.keys()) == set(b.keys())
        for name in set(a.keys()) & set(b.keys()):
            x, y = a.get_tensor(name), b.get_tensor(name)
            if x.shape != y.shape:
                worst_codes = 0.0
            elif x.is_floating_point():
                worst_float = max(
                    worst_float, float((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-12))
                )
            else:
                worst_codes = min(worst_codes, float((x == y).float().mean()) if x.numel() else 1.0)
    return {
        "same_plan": plan(device_report) == plan(cpu_report),
        "same_tensor_names": same_names,
        "worst_float_relative_difference": worst_float,
        "lowest_equal_code_fraction": worst_codes,
        "pack_bytes": [device_report["pack_bytes"], cpu_report["pack_bytes"]],
    }


def _texts() -> list[str]:
    rng = random.Random(0)
    texts = []
    for _ in range(128):
        a, b = rng.randrange(10**6), rng.randrange(10**6)
        texts.append(" ".join(f"{a + i} plus {b} is {a + i + b}." for i in range(12))[:256])
    return texts


if __name__ == "__main__":
    main()
