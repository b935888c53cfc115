"""What serving through vLLM costs: the demo's packs against their ``export --to vllm`` LoRA adapters, which drop
every delta vLLM has no form for (the tied embedding / ``lm_head``, norms, biases).

    python benchmarks/lora_export.py [--questions N]

For each demo skill (SmolLM2-135M-Instruct, the demo's cached fine-tunes), the pack is extracted as ``make demo``
does (1/16 of the fp16 delta, calibrated GPTQ) but with ``forms="lowrank"``, the profile that exports as LoRA
(default-profile packs are refused by ``--to vllm`` when a projection is stored dense). The same held-out questions
are answered (greedy, exact match) by the base, the fine-tune, the pack (PEFT, GRAFT) and the exported LoRA (PEFT,
LoRA, on the unchanged base), and scored by KL(fine-tune ‖ model) per answer token, teacher-forced.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results
from quality import _answer_batches, _answer_logits, _kl

from peft_graft import export_vllm, extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill
from peft_graft.evaluation.tasks import chat_prompt, chat_text, generate_answers

SKILLS = {"arithmetic": ARITHMETIC, "letters": LETTER_COUNTING}  # the demo's (examples/demo.py)
BUDGET = 1 / 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300, help="held-out questions per skill (at most 300)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-lora-export-"))
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def load_base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    packs, splits = {}, {}
    for name, recipe in SKILLS.items():
        train, held_out = recipe.split()
        splits[name] = held_out[: args.questions]
        calibration = [chat_text(tokenizer, e.question, e.answer) for e in train[:64]]
        extract_skillpack(
            base_dir, finetuned_skill(recipe), work / name, budget=BUDGET, calibration=calibration, forms="lowrank"
        )
        packs[name] = work / name
    exported = export_vllm(packs, work / "vllm")

    rows, skills = [], {}
    for name, recipe in SKILLS.items():
        task, examples = recipe.build_task(), splits[name]
        prompts = [chat_prompt(tokenizer, e.question) for e in examples]
        batches = _answer_batches(tokenizer, examples)
        models = {
            "base": load_base,
            "fine-tune": lambda recipe=recipe: AutoModelForCausalLM.from_pretrained(
                finetuned_skill(recipe), dtype=torch.float32
            ).eval(),
            "pack (GRAFT)": lambda name=name: PeftModel.from_pretrained(load_base(), str(packs[name])).eval(),
            "vLLM LoRA export": lambda name=name: PeftModel.from_pretrained(
                load_base(), exported.packs[name].output_dir
            ).eval(),
        }
        measured, reference = {}, None
        for label, load in models.items():
            model = load()
            answers = generate_answers(model, tokenizer, prompts, max_new_tokens=8, batch_size=32)
            correct = [task.score(a, e) for a, e in zip(answers, examples, strict=True)]
            mean = sum(correct) / len(correct)
            logits = _answer_logits(model, batches)
            if label == "fine-tune":
                reference = logits
            measured[label] = {
                "accuracy": mean,
                "accuracy_se": math.sqrt(max(mean * (1 - mean), 1e-12) / len(correct)),
                "logits": logits,
            }
            del model
            print(f"{name}: {label} accuracy {mean:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        base_acc, tuned_acc = measured["base"]["accuracy"], measured["fine-tune"]["accuracy"]
        for label, result in measured.items():
            logits = result.pop("logits")
            kl = [_kl(f, m) for f, m in zip(reference, logits, strict=True)]
            kl_mean = sum(kl) / len(kl)
            kl_se = math.sqrt(sum((k - kl_mean) ** 2 for k in kl) / max(1, len(kl) - 1) / len(kl))
            retention = (result["accuracy"] - base_acc) / (tuned_acc - base_acc)
            retention_se = result["accuracy_se"] / (tuned_acc - base_acc)
            rows.append(
                {
                    "skill": name,
                    "model": label,
                    **result,
                    "kl": kl_mean,
                    "kl_se": kl_se,
                    "retention": retention,
                    "retention_se": retention_se,
                }
            )
        report = exported.packs[name]
        skills[name] = {
            "questions": len(examples),
            "lora_modules": len(report.lora_modules),
            "max_rank": max(report.ranks.values()),
            "dropped": report.dropped,
        }

    table = (
        f"Demo packs (SmolLM2-135M-Instruct, 1/{round(1 / BUDGET)} of the fp16 delta, calibrated, forms='lowrank') "
        "and their `export --to vllm` LoRA adapters (dropped: "
        + "; ".join(f"{n}: {_dropped_summary(s['dropped'])}" for n, s in skills.items())
        + ")\n\n"
    )
    table += markdown_table(
        ["skill", "model", "accuracy", "retention", "KL(fine-tune ‖ model)", "questions"],
        [
            [
                r["skill"],
                r["model"],
                f"{r['accuracy']:.3f} ± {r['accuracy_se']:.3f}",
                f"{100 * r['retention']:.1f} % ± {100 * r['retention_se']:.1f}",
                f"{r['kl']:.3g} ± {r['kl_se']:.2g}",
                skills[r["skill"]]["questions"],
            ]
            for r in rows
        ],
    )
    payload = {"skills": skills, "rows": rows, "seconds": time.perf_counter() - started}
    write_results("lora_export", payload, table)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


def _dropped_summary(dropped: list[str]) -> str:
    embeddings = [d for d in dropped if "embed" in d or "lm_head" in d]
    norms = [d for d in dropped if "norm" in d]
    other = len(dropped) - len(embeddings) - len(norms)
    parts = [", ".join(embeddings)] if embeddings else []
    parts += [f"{len(norms)} norm vectors"] if norms else []
    parts += [f"{other} others"] if other else []
    return " and ".join(parts) or "nothing"


if __name__ == "__main__":
    main()
