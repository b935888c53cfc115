"""Quality per byte: every method compresses the same real delta (SmolLM2-135M-Instruct -> its arithmetic fine-tune)
at the same byte budgets, and is scored in one process, side by side.

    python benchmarks/quality.py [--quick]

Methods (bytes = what each stores, all deltas included; fp16 delta = 2 bytes per parameter):
- ``graft``: peft-graft's default, calibrated GPTQ with mixed precision bands, at the budget;
- ``graft data-free``: the same without calibration data (round-to-nearest);
- ``lowrank (mergekit)``: ``mergekit-extract-lora`` (the real package) at the largest rank that fits, fp16 factors,
  embeddings low-rank too (``--embed-lora``), norms stored whole;
- ``BitDelta``: 1-bit signs + one fp16 scale (mean |delta|) per matrix, no scale distillation; one size only;
- ``DARE``: random drop with rescale; kept entries stored as fp16 value + int32 index (6 bytes each);
- ``RTN int4`` / ``RTN int2``: group-wise (128) round-to-nearest of the dense delta, fp16 scale + 8-bit zero per group.
1-D deltas (norms, biases) are stored whole in fp16 by every method except mergekit (which stores them itself).

Metrics on held-out data: exact-match accuracy (retention = (method - base) / (fine-tune - base)), KL(fine-tune ||
method) per answer token, and relative output error ||logits_method - logits_ft|| / ||logits_ft - logits_base||.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, write_results

from peft_graft import extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, finetuned_skill
from peft_graft.compress.quantize import dequantize_groupwise, quantize_groupwise
from peft_graft.evaluation.tasks import chat_prompt, chat_text, generate_answers
from peft_graft.ops import pack_deltas

BUDGETS = {"1/4": 1 / 4, "1/8": 1 / 8, "1/16": 1 / 16, "1/32": 1 / 32, "1/64": 1 / 64}
QUICK_BUDGETS = ("1/16",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="budget 1/16 only, 100 prompts (about 4 minutes)")
    parser.add_argument("--prompts", type=int, help="held-out questions (default: 300, quick: 100)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the saved results")
    args = parser.parse_args()
    if args.plot_only:
        suffix = "-quick" if args.quick else ""
        saved = json.loads((RESULTS / f"quality{suffix}.json").read_text())
        _plot(saved["rows"], saved["scores"], suffix)
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    budgets = {k: BUDGETS[k] for k in QUICK_BUDGETS} if args.quick else BUDGETS
    prompts_n = args.prompts or (100 if args.quick else 300)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-quality-"))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, tuned_dir = bundled_model(), finetuned_skill(ARITHMETIC)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    task = ARITHMETIC.build_task()
    train, held_out = task.split(ARITHMETIC.train_examples, prompts_n, seed=ARITHMETIC.seed)
    calibration = [chat_text(tokenizer, e.question, e.answer) for e in train[:64]]
    texts = [chat_text(tokenizer, e.question, e.answer) for e in held_out[:60]]
    text_prompts = [chat_prompt(tokenizer, e.question) for e in held_out[:60]]
    prompts = [chat_prompt(tokenizer, e.question) for e in held_out]

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    base_state = {k: v.clone() for k, v in base.named_parameters()}
    tuned_state = dict(tuned.named_parameters())
    delta = {k: (tuned_state[k].detach() - base_state[k]) for k in base_state}
    fp16_bytes = 2 * sum(t.numel() for t in delta.values())

    def accuracy(model) -> float:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=16)
        return sum(task.score(a, e) for a, e in zip(answers, held_out, strict=True)) / len(held_out)

    def answer_logits(model) -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for text, prompt in zip(texts, text_prompts, strict=True):
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                start = len(tokenizer(prompt)["input_ids"]) - 1
                out.append(model(input_ids=ids).logits[0, start:-1].float())
        return out

    reference = {"base": answer_logits(base), "ft": answer_logits(tuned)}
    scores = {"base": accuracy(base), "finetuned": accuracy(tuned)}
    print(f"base {scores['base']:.4f}  fine-tune {scores['finetuned']:.4f}  ({time.perf_counter() - started:.0f} s)")
    del tuned, tuned_state

    def measure(name: str, budget: str | None, approx: dict[str, torch.Tensor], stored: int, seconds: float) -> dict:
        with torch.no_grad():
            parameters = dict(base.named_parameters())
            for key, value in base_state.items():
                parameters[key].copy_(value + approx.get(key, torch.zeros_like(value)))
        acc = accuracy(base)
        logits = answer_logits(base)
        kl = sum(
            torch.nn.functional.kl_div(m.log_softmax(-1), f.log_softmax(-1), log_target=True, reduction="sum").item()
            for m, f in zip(logits, reference["ft"], strict=True)
        ) / sum(f.shape[0] for f in reference["ft"])
        error = math.sqrt(sum(((m - f) ** 2).sum().item() for m, f in zip(logits, reference["ft"], strict=True)))
        error /= math.sqrt(
            sum(((f - b) ** 2).sum().item() for f, b in zip(reference["ft"], reference["base"], strict=True))
        )
        kept = (acc - scores["base"]) / (scores["finetuned"] - scores["base"])
        row = {
            "method": name,
            "budget": budget,
            "bytes": stored,
            "ratio": stored / fp16_bytes,
            "accuracy": acc,
            "retention": kept,
            "kl": kl,
            "relative_error": error,
            "seconds": seconds,
        }
        print(
            f"{name:<20} {budget or '-':>5}  ratio {row['ratio']:.4f}  acc {acc:.4f}  retention {kept:6.1%}  "
            f"KL {kl:.4f}  err {error:.3f}  ({seconds:.0f} s to compress)"
        )
        return row

    rows = []
    for label, budget in budgets.items():
        for name, calibrated in (("graft", True), ("graft data-free", False)):
            pack = work / f"{name}-{budget}"
            t0 = time.perf_counter()
            extract_skillpack(
                base_dir,
                tuned_dir,
                pack,
                budget=budget,
                calibration=calibration if calibrated else None,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            approx = pack_deltas(_fresh(base, base_state), pack)
            rows.append(measure(name, label, approx, _folder_bytes(pack), seconds))
            shutil.rmtree(pack)
        t0 = time.perf_counter()
        approx, stored = _mergekit_lowrank(base_dir, tuned_dir, delta, budget * fp16_bytes, work)
        rows.append(measure("lowrank (mergekit)", label, approx, stored, time.perf_counter() - t0))
        t0 = time.perf_counter()
        approx, stored = _dare(delta, budget * fp16_bytes)
        rows.append(measure("DARE", label, approx, stored, time.perf_counter() - t0))
    for name, method in (
        ("BitDelta", _bitdelta),
        ("RTN int4", lambda d: _rtn(d, 4)),
        ("RTN int2", lambda d: _rtn(d, 2)),
    ):
        t0 = time.perf_counter()
        approx, stored = method(delta)
        rows.append(measure(name, None, approx, stored, time.perf_counter() - t0))

    table_rows = [
        [
            r["method"],
            r["budget"] or "-",
            f"{r['ratio']:.4f}",
            r["accuracy"],
            f"{r['retention']:.1%}",
            r["kl"],
            r["relative_error"],
        ]
        for r in rows
    ]
    header = f"base {scores['base']:.4f}, fine-tune {scores['finetuned']:.4f} on {len(held_out)} held-out questions\n\n"
    table = header + markdown_table(
        ["method", "budget", "bytes / fp16 delta", "accuracy", "retention", "KL(ft‖method)", "rel. output error"],
        table_rows,
    )
    suffix = "-quick" if args.quick else ""
    payload = {
        "pair": {"base": str(base_dir), "finetuned": str(tuned_dir), "fp16_delta_bytes": fp16_bytes},
        "held_out": len(held_out),
        "scores": scores,
        "rows": rows,
        "seconds": time.perf_counter() - started,
    }
    write_results("quality", payload, table, suffix)
    _plot(rows, scores, suffix)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


def _fresh(model, state):
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            parameter.copy_(state[key])
    return model


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _whole(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    return tensor.half().float(), 2 * tensor.numel()


def _bitdelta(delta):
    approx, stored = {}, 0
    for key, d in delta.items():
        if d.dim() < 2:
            approx[key], size = _whole(d)
        else:
            scale = d.abs().mean().half().float()
            approx[key], size = torch.sign(d) * scale, math.ceil(d.numel() / 8) + 2
        stored += size
    return approx, stored


def _rtn(delta, bits: int, group: int = 128):
    approx, stored = {}, 0
    for key, d in delta.items():
        if d.dim() < 2:
            approx[key], size = _whole(d)
        else:
            q = quantize_groupwise(d, bits, group)
            approx[key] = dequantize_groupwise(q)
            size = math.ceil(d.numel() * bits / 8) + 3 * q.scales.numel()
        stored += size
    return approx, stored


def _dare(delta, budget_bytes: float, seed: int = 0):
    """Random drop with rescale; keep fraction chosen so that 6 bytes per kept entry + 1-D deltas fit the budget."""
    whole = sum(2 * d.numel() for d in delta.values() if d.dim() < 2)
    matrix_entries = sum(d.numel() for d in delta.values() if d.dim() >= 2)
    keep = max(1e-6, min(1.0, (budget_bytes - whole) / (6 * matrix_entries)))
    generator = torch.Generator().manual_seed(seed)
    approx, stored = {}, whole
    for key, d in delta.items():
        if d.dim() < 2:
            approx[key] = _whole(d)[0]
            continue
        mask = torch.rand(d.shape, generator=generator) < keep
        approx[key] = torch.where(mask, d / keep, torch.zeros_like(d)).half().float()
        stored += 6 * int(mask.sum())
    return approx, stored


def _mergekit_lowrank(base_dir, tuned_dir, delta, budget_bytes: float, work: Path):
    """``mergekit-extract-lora`` at the largest rank whose factors (+ 1-D deltas), counted at fp16, fit the budget.

    mergekit writes factors in the fine-tune's dtype (fp32 here): they are cast to fp16 before use and counting, as a
    user shipping them would. A tied lm_head is excluded: its delta is the embedding's, which is extracted once.
    """
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    tied = AutoConfig.from_pretrained(base_dir).tie_word_embeddings
    whole = sum(2 * d.numel() for d in delta.values() if d.dim() < 2)
    per_rank = sum(2 * (d.shape[0] + d.shape[1]) for d in delta.values() if d.dim() >= 2)
    rank = max(1, int((budget_bytes - whole) // per_rank))
    out = work / f"mergekit-r{rank}"
    command = [
        str(Path(sys.executable).with_name("mergekit-extract-lora")),
        "--model",
        str(tuned_dir),
        "--base-model",
        str(base_dir),
        "--out-path",
        str(out),
        "--max-rank",
        str(rank),
        "--embed-lora",
        "--quiet",
    ]
    if tied:
        command += ["--exclude-regex", "lm_head"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    weights = out / "adapter_model.safetensors"
    save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.named_parameters()}
    merged = PeftModel.from_pretrained(model, str(out)).merge_and_unload()
    approx = {k: v.detach().float() - before[k] for k, v in merged.named_parameters()}
    stored = _folder_bytes(out)
    shutil.rmtree(out)
    return approx, stored


def _plot(rows, scores, suffix: str, folder: Path = RESULTS) -> Path:
    """Retention (the headline) and KL(fine-tune ‖ method) (more sensitive at this sample size) against bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted((r["ratio"], r["retention"], r["kl"]) for r in rows if r["method"] == method)
        style = "o-" if len(points) > 1 else "s"
        left.plot([p[0] for p in points], [100 * p[1] for p in points], style, label=method)
        right.plot([p[0] for p in points], [p[2] for p in points], style, label=method)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("bytes / fp16 delta (log scale)")
    left.axhline(100, color="grey", lw=0.8, ls="--")
    left.set_ylabel("accuracy retention (%)")
    left.set_title("retention vs bytes")
    right.set_yscale("log")
    right.set_ylabel("KL(fine-tune ‖ method) per answer token")
    right.set_title("KL to the fine-tune vs bytes (lower is better)")
    left.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M-Instruct, arithmetic fine-tune delta")
    figure.tight_layout()
    path = folder / f"retention_vs_bytes{suffix}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
