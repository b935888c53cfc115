"""Inference cost, side by side in one process: base, merged pack, unmerged pack, an equal-rank PEFT LoRA (the pack
exported with ``peft-graft export``), a mixed batch of 4 packs vs one pack, the router's cost per query, and load times.

    python benchmarks/inference.py [--quick]

Each measurement is repeated in interleaved rounds (base, merged, unmerged, LoRA, base, ...) and the median is kept,
so that machine noise hits all variants alike; ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_results

from peft_graft import RoutedGraftModel, extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill
from peft_graft.evaluation.tasks import chat_prompt
from peft_graft.ops import export_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 16-token generations (about 2 minutes)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rounds = 2 if args.quick else 7
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-inference-"))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    extract_skillpack(base_dir, finetuned_skill(ARITHMETIC), work / "pack", budget=1 / 16, progress=False)
    export_lora(work / "pack", work / "lora")

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    models = {"base": load_base()}
    merged = PeftModel.from_pretrained(load_base(), work / "pack").eval()
    merged.merge_adapter()
    models["merged pack"] = merged
    models["unmerged pack"] = PeftModel.from_pretrained(load_base(), work / "pack").eval()
    models["LoRA (equal rank)"] = PeftModel.from_pretrained(load_base(), work / "lora").eval()
    four = PeftModel.from_pretrained(load_base(), work / "pack", adapter_name="p0").eval()
    for i in range(1, 4):  # four packs: the same pack under four names, so only the mixed-batch path differs
        four.load_adapter(work / "pack", adapter_name=f"p{i}")

    question = ARITHMETIC.build_task().examples(1, 123)[0].question
    prompt = chat_prompt(tokenizer, question + " " + "Think step by step. " * 12)
    single = tokenizer([prompt], return_tensors="pt")
    batch4 = tokenizer([prompt] * 4, return_tensors="pt")
    new_tokens = 16 if args.quick else 64

    def forward_seconds(model, inputs, **extra) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs, **extra)
            return time.perf_counter() - t0

    def generate_seconds(model, inputs, **extra) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
            return time.perf_counter() - t0

    variants = {name: (model, {}) for name, model in models.items()}
    variants["4 rows, one pack"] = (four, {})  # the active pack p0, PEFT's ordinary (non-mixed) path
    variants["4 rows, 4 packs (mixed)"] = (four, {"adapter_names": ["p0", "p1", "p2", "p3"]})
    samples: dict[str, dict[str, list[float]]] = {name: {"forward": [], "generate": []} for name in variants}
    for name, (model, extra) in variants.items():  # warm-up
        forward_seconds(model, batch4 if "rows" in name else single, **extra)
    for _ in range(rounds):
        for name, (model, extra) in variants.items():
            inputs = batch4 if "rows" in name else single
            samples[name]["forward"].append(forward_seconds(model, inputs, **extra))
            samples[name]["generate"].append(generate_seconds(model, inputs, **extra))
    medians = {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}
    rows = 4
    speed = {}
    for name, m in medians.items():
        count = rows if "rows" in name else 1
        speed[name] = {"forward_ms": 1000 * m["forward"], "tokens_per_s": count * new_tokens / m["generate"]}

    # router cost per query vs a 64-token generation of the same query (the router's cost does not depend on which
    # pack a label loads, so the second label reuses the pack: no second fine-tune needed). Not in --quick:
    # benchmarks/serving.py measures routing against a served generation.
    router = None
    if not args.quick:
        routed = RoutedGraftModel.from_packs(
            load_base(), {"arithmetic": work / "pack", "letters": work / "pack"}, tokenizer
        )
        train = {
            "arithmetic": [chat_prompt(tokenizer, e.question) for e in ARITHMETIC.build_task().examples(30, 7)],
            "letters": [chat_prompt(tokenizer, e.question) for e in LETTER_COUNTING.build_task().examples(30, 7)],
        }
        routed.fit_router(train)
        route_times, generation_times = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            routed.route([prompt])
            route_times.append(time.perf_counter() - t0)
            with torch.no_grad():
                t0 = time.perf_counter()
                routed.generate(
                    single, max_new_tokens=64, min_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
                generation_times.append(time.perf_counter() - t0)
        router = {
            "route_ms": 1000 * statistics.median(route_times),
            "generate64_ms": 1000 * statistics.median(generation_times),
        }
        router["ratio"] = router["route_ms"] / router["generate64_ms"]

    # load time: the pack vs its LoRA export, onto a loaded base
    loads = {"pack": [], "LoRA": []}
    target = load_base()
    for _ in range(rounds):
        for name, folder in (("pack", work / "pack"), ("LoRA", work / "lora")):
            t0 = time.perf_counter()
            attached = PeftModel.from_pretrained(target, folder)
            loads[name].append(time.perf_counter() - t0)
            target = attached.unload()
    load = {name: 1000 * statistics.median(v) for name, v in loads.items()}
    sizes = {"pack": _bytes(work / "pack"), "LoRA": _bytes(work / "lora")}

    base_speed = speed["base"]["tokens_per_s"]
    ratios = {
        "merged / base (tokens/s)": speed["merged pack"]["tokens_per_s"] / base_speed,
        "unmerged / LoRA (latency, forward)": medians["unmerged pack"]["forward"]
        / medians["LoRA (equal rank)"]["forward"],
        "unmerged / LoRA (latency, generate)": medians["unmerged pack"]["generate"]
        / medians["LoRA (equal rank)"]["generate"],
        "mixed-4 / single (latency, forward)": medians["4 rows, 4 packs (mixed)"]["forward"]
        / medians["4 rows, one pack"]["forward"],
        "mixed-4 / single (latency, generate)": medians["4 rows, 4 packs (mixed)"]["generate"]
        / medians["4 rows, one pack"]["generate"],
        "router / 64-token generation": router["ratio"] if router else None,
        "pack load / LoRA load": load["pack"] / load["LoRA"],
    }
    ratios = {name: value for name, value in ratios.items() if value is not None}
    targets = {
        "merged / base (tokens/s)": ">= 1.00 (= base)",
        "unmerged / LoRA (latency, forward)": "<= 1.10",
        "unmerged / LoRA (latency, generate)": "<= 1.10",
        "mixed-4 / single (latency, forward)": "<= 1.30",
        "mixed-4 / single (latency, generate)": "<= 1.30",
        "router / 64-token generation": "<= 0.02",
        "pack load / LoRA load": "-",
    }
    prompt_tokens = single["input_ids"].shape[1]
    table = f"prompt {prompt_tokens} tokens; generation {new_tokens} new tokens, greedy; median of {rounds} rounds\n\n"
    table += markdown_table(
        ["variant", "forward (ms)", "tokens/s"],
        [[name, f"{v['forward_ms']:.1f}", f"{v['tokens_per_s']:.1f}"] for name, v in speed.items()],
    )
    table += "\n\n" + markdown_table(
        ["ratio", "measured", "target"], [[k, f"{v:.3f}", targets[k]] for k, v in ratios.items()]
    )
    routing = (
        f"router: {router['route_ms']:.1f} ms per query vs {router['generate64_ms']:.0f} ms for 64 tokens; "
        if router
        else ""
    )
    table += (
        f"\n\n{routing}load: pack {load['pack']:.0f} ms ({sizes['pack'] / 2**20:.1f} MiB) vs LoRA "
        f"{load['LoRA']:.0f} ms ({sizes['LoRA'] / 2**20:.1f} MiB)"
    )
    payload = {
        "speed": speed,
        "ratios": ratios,
        "targets": targets,
        "router": router,
        "load_ms": load,
        "bytes": sizes,
        "rounds": rounds,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "seconds": time.perf_counter() - started,
    }
    write_results("inference", payload, table, "-quick" if args.quick else "")
    _plot(speed, "-quick" if args.quick else "")
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _plot(speed, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(speed)
    figure, axis = plt.subplots(figsize=(7, 3.8))
    axis.barh(names, [speed[n]["tokens_per_s"] for n in names], color="tab:blue")
    axis.invert_yaxis()
    axis.set_xlabel("generated tokens / s (4-row variants: all rows)")
    axis.set_title("SmolLM2-135M on CPU: decoding speed")
    figure.tight_layout()
    figure.savefig(RESULTS / f"inference{suffix}.png", dpi=120)


if __name__ == "__main__":
    main()
