"""Quality per byte: every method compresses the same real deltas (SmolLM2-135M-Instruct -> two skill fine-tunes) at
the same byte budgets, and is scored in one process, side by side.

    python benchmarks/quality.py [--quick] [--skills arithmetic,letters] [--prompts N] [--accuracy-prompts N]
    python benchmarks/quality.py --merge arithmetic,letters   # quality.* from the one-skill runs quality-<skill>.*
    python benchmarks/quality.py --skills letters --methods graft   # re-measure some methods' rows in place

Methods (bytes = what each stores, all deltas included; fp16 delta = 2 bytes per parameter):
- ``graft``: peft-graft's default (``forms="any"``), calibrated (GPTQ) at the budget;
- ``graft data-free``: the same without calibration data (round-to-nearest);
- ``graft lowrank``: data-free with ``forms="lowrank"`` (projections low-rank only: the LoRA-exportable profile);
- ``lowrank (mergekit)``: ``mergekit-extract-lora`` (the real package) at the largest rank that fits, fp16 factors,
  embeddings low-rank too (``--embed-lora``), norms stored whole;
- ``DARE``: random drop with rescale; kept entries stored as fp16 value + int32 index (6 bytes each);
- ``BitDelta``: 1-bit signs + one fp16 scale (mean |delta|) per matrix, no scale distillation; one size only;
- ``RTN int8/4/3/2``: group-wise (128) round-to-nearest of the dense delta, fp16 scale + zero per group; one size each.
1-D deltas (norms, biases) are stored whole in fp16 by every method except mergekit (which stores them itself).

Metrics on held-out questions (none seen in training): KL(fine-tune ‖ method) per answer token, teacher-forced (the
primary metric; mean over questions, with its standard error), exact-match accuracy by greedy generation and
retention = (method − base) / (fine-tune − base), both with the standard error of the method's accuracy, and the
relative output error ‖logits_method − logits_ft‖ / ‖logits_ft − logits_base‖ on the answer tokens.
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
from peft_graft._demo.recipes import SkillRecipe, finetuned_skill
from peft_graft.compress.quantize import dequantize_groupwise, quantize_groupwise
from peft_graft.evaluation.tasks import chat_prompt, chat_text, generate_answers
from peft_graft.ops import pack_deltas

BUDGETS = {"1/4": 1 / 4, "1/8": 1 / 8, "1/16": 1 / 16, "1/32": 1 / 32, "1/64": 1 / 64, "1/128": 1 / 128}
QUICK_BUDGETS = ("1/16", "1/64")
# Stronger fine-tunes than the demo's (200 steps on 1600 examples, one epoch): 0.6 % -> ~40 % (arithmetic) and
# 0.8 % -> ~60 % (letter counting) held-out accuracy, so that methods are told apart by what they keep.
SKILLS = {
    "arithmetic": SkillRecipe(
        "basic_arithmetic",
        {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        train_examples=1600,
        test_examples=500,
        steps=200,
    ),
    "letters": SkillRecipe(
        "letter_counting", {"min_words": 3, "max_words": 5}, train_examples=1600, test_examples=500, steps=200
    ),
}
QUICK_SKILLS = ("arithmetic",)
# The methods a graft row is compared with (fixed-size ones count where they use at least graft's bytes)
PEERS = ("lowrank (mergekit)", "DARE", "BitDelta", "RTN int8", "RTN int4", "RTN int3", "RTN int2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="arithmetic at 1/16 and 1/64, KL on 100 questions, accuracy on 50, without the LoRA-profile row",
    )
    parser.add_argument("--skills", help=f"comma-separated, from {', '.join(SKILLS)} (default: all; quick: arithmetic)")
    parser.add_argument("--prompts", type=int, help="held-out questions per skill (default: 500, quick: 100)")
    parser.add_argument(
        "--accuracy-prompts", type=int, help="of those, how many are also answered by generation (default: all)"
    )
    parser.add_argument(
        "--plot-only", action="store_true", help="recompute the targets, tables and plots from the saved rows"
    )
    parser.add_argument(
        "--merge",
        metavar="SKILLS",
        help="write the full results (quality.json, .md, plot) from the one-skill runs quality-<skill>.json",
    )
    parser.add_argument(
        "--methods",
        help="comma-separated method names (as in the tables): measure only these and replace their rows in the saved "
        "results of the same run (the other rows stay, each row keeps the date it was measured)",
    )
    args = parser.parse_args()
    if args.merge:
        _merge(args.merge.split(","))
        return
    suffix = "-quick" if args.quick else ""
    if args.skills and not args.quick:  # a partial run never overwrites the full results
        suffix = "-" + "-".join(args.skills.split(","))
    if args.plot_only:
        saved = json.loads((RESULTS / f"quality{suffix}.json").read_text())
        rows, summaries = saved["rows"], saved.get("skills", {})
        targets = _targets(rows, summaries)
        table = _tables(rows, summaries, targets)
        payload = {"skills": summaries, "rows": rows, "targets": targets, "seconds": saved.get("seconds")}
        write_results("quality", payload, table, suffix)
        _plot(rows, summaries, suffix)
        print(table)
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    budgets = {k: BUDGETS[k] for k in QUICK_BUDGETS} if args.quick else BUDGETS
    skills = args.skills.split(",") if args.skills else list(QUICK_SKILLS if args.quick else SKILLS)
    prompts_n = args.prompts or (100 if args.quick else 500)
    methods = set(args.methods.split(",")) if args.methods else None
    started = time.perf_counter()
    rows, summaries = [], {}
    if methods:  # the saved rows of the other methods stay
        saved = json.loads((RESULTS / f"quality{suffix}.json").read_text())
        date = saved["machine"]["date"]
        kept = [r for r in saved["rows"] if r["method"] not in methods or r["skill"] not in skills]
        rows = [{"measured": date, **r} for r in kept]
        summaries = saved["skills"]
    for skill in skills:
        accuracy_n = args.accuracy_prompts or (50 if args.quick else None)
        skill_rows, summary = _run_skill(skill, SKILLS[skill], budgets, prompts_n, accuracy_n, args.quick, methods)
        today = time.strftime("%Y-%m-%d")
        rows += [{"measured": today, **r} for r in skill_rows] if methods else skill_rows
        summaries[skill] = summary
        # after every skill, so that a run stopped during the next one keeps what it measured
        targets = _targets(rows, summaries)
        table = _tables(rows, summaries, targets)
        payload = {"skills": summaries, "rows": rows, "targets": targets, "seconds": time.perf_counter() - started}
        write_results("quality", payload, table, suffix)
    _plot(rows, summaries, suffix)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")


def _merge(skills: list[str]) -> None:
    """The full results from one run per skill (each in its own process, possibly with its own --prompts): each
    skill's summary keeps its question counts and the date it was measured."""
    rows, summaries, seconds = [], {}, 0.0
    for skill in skills:
        saved = json.loads((RESULTS / f"quality-{skill}.json").read_text())
        rows += [r for r in saved["rows"] if r["skill"] == skill]
        summaries[skill] = {**saved["skills"][skill], "measured": saved["machine"]["date"]}
        seconds += saved.get("seconds") or 0.0
    targets = _targets(rows, summaries)
    table = _tables(rows, summaries, targets)
    write_results("quality", {"skills": summaries, "rows": rows, "targets": targets, "seconds": seconds}, table)
    _plot(rows, summaries, "", folder=RESULTS)
    print(table)


def _run_skill(
    skill: str,
    recipe: SkillRecipe,
    budgets: dict[str, float],
    prompts_n: int,
    accuracy_n: int | None = None,
    quick: bool = False,
    methods: set[str] | None = None,
) -> tuple[list, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-quality-"))
    base_dir, tuned_dir = bundled_model(), finetuned_skill(recipe)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    task = recipe.build_task()
    train, held_out = task.split(recipe.train_examples, prompts_n, seed=recipe.seed)
    calibration = [chat_text(tokenizer, e.question, e.answer) for e in train[:64]]
    answered = held_out[: accuracy_n or len(held_out)]  # generation costs ~10x teacher forcing
    prompts = [chat_prompt(tokenizer, e.question) for e in answered]
    answers = _answer_batches(tokenizer, held_out)

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    base_state = {k: v.clone() for k, v in base.named_parameters()}
    tuned_state = dict(tuned.named_parameters())
    delta = {k: (tuned_state[k].detach() - base_state[k]) for k in base_state}
    fp16_bytes = 2 * sum(t.numel() for t in delta.values())

    def accuracy(model) -> tuple[float, float]:
        completions = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=32)
        correct = [task.score(a, e) for a, e in zip(completions, answered, strict=True)]
        mean = sum(correct) / len(correct)
        return mean, math.sqrt(max(mean * (1 - mean), 1e-12) / len(correct))

    reference = {"base": _answer_logits(base, answers), "ft": _answer_logits(tuned, answers)}
    scores = {"base": accuracy(base), "finetuned": accuracy(tuned)}
    gain = scores["finetuned"][0] - scores["base"][0]
    print(
        f"{skill}: base {scores['base'][0]:.4f}  fine-tune {scores['finetuned'][0]:.4f}  "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    del tuned, tuned_state

    def measure(name: str, budget: str | None, approx: dict[str, torch.Tensor], stored: int, seconds: float) -> dict:
        with torch.no_grad():
            parameters = dict(base.named_parameters())
            for key, value in base_state.items():
                parameters[key].copy_(value + approx.get(key, torch.zeros_like(value)))
        acc, acc_error = accuracy(base)
        logits = _answer_logits(base, answers)
        kl = [_kl(f, m) for f, m in zip(reference["ft"], logits, strict=True)]
        kl_mean = sum(kl) / len(kl)
        kl_error = math.sqrt(sum((k - kl_mean) ** 2 for k in kl) / max(1, len(kl) - 1) / len(kl))
        error = math.sqrt(sum(((m - f) ** 2).sum().item() for m, f in zip(logits, reference["ft"], strict=True)))
        error /= math.sqrt(
            sum(((f - b) ** 2).sum().item() for f, b in zip(reference["ft"], reference["base"], strict=True))
        )
        row = {
            "skill": skill,
            "method": name,
            "budget": budget,
            "bytes": stored,
            "ratio": stored / fp16_bytes,
            "accuracy": acc,
            "accuracy_se": acc_error,
            "retention": (acc - scores["base"][0]) / gain,
            "retention_se": acc_error / gain,
            "kl": kl_mean,
            "kl_se": kl_error,
            "relative_error": error,
            "seconds": seconds,
        }
        print(
            f"{skill:<10} {name:<20} {budget or '-':>5}  ratio {row['ratio']:.4f}  acc {acc:.4f}  "
            f"retention {row['retention']:6.1%}  KL {kl_mean:.3g}±{kl_error:.2g}  err {error:.3f}  "
            f"({seconds:.0f} s to compress)",
            flush=True,
        )
        return row

    def wanted(name: str) -> bool:
        return methods is None or name in methods

    rows = []
    for label, budget in budgets.items():
        variants = [("graft", True, "any"), ("graft data-free", False, "any"), ("graft lowrank", False, "lowrank")]
        for name, calibrated, forms in variants[:2] if quick else variants:
            if not wanted(name):
                continue
            pack = work / f"{name}-{budget}"
            t0 = time.perf_counter()
            report = extract_skillpack(
                base_dir,
                tuned_dir,
                pack,
                budget=budget,
                forms=forms,
                calibration=calibration if calibrated else None,
                progress=False,
            )
            seconds = time.perf_counter() - t0
            approx = pack_deltas(_fresh(base, base_state), pack)
            row = measure(name, label, approx, _folder_bytes(pack), seconds)
            row["forms"] = _forms_summary(report)
            rows.append(row)
            shutil.rmtree(pack)
        if wanted("lowrank (mergekit)"):
            t0 = time.perf_counter()
            approx, stored = _mergekit_lowrank(base_dir, tuned_dir, delta, budget * fp16_bytes, work)
            rows.append(measure("lowrank (mergekit)", label, approx, stored, time.perf_counter() - t0))
        if wanted("DARE"):
            t0 = time.perf_counter()
            approx, stored = _dare(delta, budget * fp16_bytes)
            rows.append(measure("DARE", label, approx, stored, time.perf_counter() - t0))
    # quick: no RTN row, since every RTN size is far above 1/16 and BitDelta (0.063) is the nearest fixed size above
    # both quick budgets: they would never be the peer a target compares with
    widths = () if quick else (8, 4, 3, 2)
    fixed = [("BitDelta", _bitdelta)] + [(f"RTN int{bits}", lambda d, b=bits: _rtn(d, b)) for bits in widths]
    for name, method in fixed:
        if not wanted(name):
            continue
        t0 = time.perf_counter()
        approx, stored = method(delta)
        rows.append(measure(name, None, approx, stored, time.perf_counter() - t0))
    shutil.rmtree(work, ignore_errors=True)
    summary = {
        "recipe": {"task": recipe.task, "options": recipe.options, "steps": recipe.steps},
        "finetuned": str(tuned_dir),
        "fp16_delta_bytes": fp16_bytes,
        "held_out": len(held_out),
        "answered": len(answered),
        "base": scores["base"][0],
        "finetuned_accuracy": scores["finetuned"][0],
        "seconds": time.perf_counter() - started,
    }
    return rows, summary


def _answer_batches(tokenizer, examples, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """Teacher-forcing batches: right-padded prompt + answer ids, their mask, and each row's answer positions (the
    logits that predict the answer tokens and the end of turn)."""
    batches = []
    for start in range(0, len(examples), batch_size):
        rows, spans = [], []
        for example in examples[start : start + batch_size]:
            prompt = tokenizer(chat_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]
            text = tokenizer(chat_text(tokenizer, example.question, example.answer), add_special_tokens=False)
            rows.append(text["input_ids"])
            spans.append((len(prompt) - 1, len(text["input_ids"]) - 1))
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        batches.append((ids, mask, spans))
    return batches


def _answer_logits(model, batches) -> list[torch.Tensor]:
    """Per question, the logits at its answer positions (float32)."""
    out = []
    with torch.no_grad():
        for ids, mask, spans in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits
            # cloned: a slice would keep the whole batch's logits alive (the full run was OOM-killed at 24 GiB)
            out += [logits[row, start:stop].float().clone() for row, (start, stop) in enumerate(spans)]
    return out


def _kl(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """KL(reference ‖ approximation) per token, averaged over one question's answer tokens."""
    kl = torch.nn.functional.kl_div(
        approximation.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="sum"
    )
    return kl.item() / reference.shape[0]


def _forms_summary(report) -> dict[str, int]:
    """How many modules the plan put in each form (embeddings apart), for the results table."""
    counts: dict[str, int] = {}
    for module in report.modules:
        key = f"embed:{module.form}" if module.role == "embed" else module.form
        counts[key] = counts.get(key, 0) + 1
    return counts


def _targets(rows: list[dict], summaries: dict) -> list[dict]:
    """Each stated target, per skill: graft's KL vs the best peer's at equal bytes (or the nearest larger size),
    retention at 1/32 and 1/64, and calibrated vs data-free KL."""
    found = []
    for skill in summaries:
        mine = [r for r in rows if r["skill"] == skill]
        for graft in (r for r in mine if r["method"] == "graft"):
            # peers at the same budget, and the fixed-size peers (RTN, BitDelta) nearest above graft's bytes: a larger
            # one is not "equal bytes" any more (RTN int8 is twice the bytes of a 1/4 budget)
            larger = [r for r in mine if r["method"] in PEERS and r["budget"] is None and r["ratio"] >= graft["ratio"]]
            nearest = min((r["ratio"] for r in larger), default=None)
            peers = [r for r in mine if r["method"] in PEERS and r["budget"] == graft["budget"]]
            peers += [r for r in larger if r["ratio"] == nearest]
            best = min(peers, key=lambda r: r["kl"]) if peers else None
            free = next(r for r in mine if r["method"] == "graft data-free" and r["budget"] == graft["budget"])
            found.append(
                {
                    "skill": skill,
                    "budget": graft["budget"],
                    "graft_kl": graft["kl"],
                    "best_peer": best["method"] if best else None,
                    "best_peer_ratio": best["ratio"] if best else None,
                    "best_peer_kl": best["kl"] if best else None,
                    "kl_ratio": graft["kl"] / best["kl"] if best else None,
                    "retention": graft["retention"],
                    "retention_se": graft["retention_se"],
                    "calibrated_vs_data_free": graft["kl"] / free["kl"],
                }
            )
    return found


def _tables(rows: list[dict], summaries: dict, targets: list[dict]) -> str:
    parts = []
    for skill, summary in summaries.items():
        parts.append(
            f"### {skill}: {summary['recipe']['task']} {summary['recipe']['options']}, "
            f"{summary['recipe']['steps']}-step fine-tune; base {summary['base']:.4f}, "
            f"fine-tune {summary['finetuned_accuracy']:.4f}; KL on {summary['held_out']} held-out questions, accuracy "
            f"on {summary.get('answered', summary['held_out'])} of them"
            + (f" (measured {summary['measured']})" if "measured" in summary else "")
            + "\n"
        )
        table_rows = [
            [
                r["method"],
                r["budget"] or "-",
                f"{r['ratio']:.4f}",
                f"{r['kl']:.3g} ± {r['kl_se']:.1g}",
                f"{r['accuracy']:.3f}",
                f"{r['retention']:.1%} ± {r['retention_se']:.1%}",
                f"{r['relative_error']:.3g}",
                ", ".join(f"{k} {v}" for k, v in sorted(r.get("forms", {}).items())),
            ]
            for r in rows
            if r["skill"] == skill
        ]
        parts.append(
            markdown_table(
                [
                    "method",
                    "budget",
                    "bytes / fp16 delta",
                    "KL(ft‖method)",
                    "accuracy",
                    "retention",
                    "rel. output error",
                    "forms (modules)",
                ],
                table_rows,
            )
        )
    parts.append("\n### Targets\n")
    parts.append(
        markdown_table(
            [
                "skill",
                "budget",
                "graft KL",
                "best peer (≥ bytes)",
                "its KL",
                "graft / peer (≤ 0.8)",
                "retention",
                "calibrated / data-free KL (≤ 0.9)",
            ],
            [
                [
                    t["skill"],
                    t["budget"],
                    f"{t['graft_kl']:.3g}",
                    f"{t['best_peer']} ({t['best_peer_ratio']:.4f})" if t["best_peer"] else "-",
                    f"{t['best_peer_kl']:.3g}" if t["best_peer"] else "-",
                    f"{t['kl_ratio']:.2f}" if t["kl_ratio"] is not None else "-",
                    f"{t['retention']:.1%} ± {t['retention_se']:.1%}",
                    f"{t['calibrated_vs_data_free']:.2f}",
                ]
                for t in targets
            ],
        )
    )
    return "\n".join(parts)


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


def _plot(rows, skills, suffix: str, folder: Path = RESULTS) -> Path:
    """Per skill, KL(fine-tune ‖ method) (the primary metric) and retention against bytes, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.get("skill", "") for r in rows))
    figure, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    for (kl_axis, retention_axis), skill in zip(axes, names, strict=True):
        mine = [r for r in rows if r.get("skill", "") == skill]
        for method in dict.fromkeys(r["method"] for r in mine):
            points = sorted((r["ratio"], r["retention"], r["kl"]) for r in mine if r["method"] == method)
            style = "o-" if len(points) > 1 else "s"
            kl_axis.plot([p[0] for p in points], [p[2] for p in points], style, label=method)
            retention_axis.plot([p[0] for p in points], [100 * p[1] for p in points], style, label=method)
        for axis in (kl_axis, retention_axis):
            axis.set_xscale("log", base=2)
            axis.set_xlabel("bytes / fp16 delta (log scale)")
        kl_axis.set_yscale("log")
        kl_axis.set_ylabel("KL(fine-tune ‖ method) per answer token")
        kl_axis.set_title(f"{skill}: KL to the fine-tune vs bytes (lower is better)")
        retention_axis.axhline(100, color="grey", lw=0.8, ls="--")
        retention_axis.set_ylabel("accuracy retention (%)")
        retention_axis.set_title(f"{skill}: retention vs bytes")
        kl_axis.legend(fontsize=7)
    figure.suptitle("SmolLM2-135M-Instruct skill deltas: quality per byte")
    figure.tight_layout()
    path = folder / f"retention_vs_bytes{suffix}.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
