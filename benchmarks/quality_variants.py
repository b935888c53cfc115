"""Where a quality miss comes from: extraction variants of one skill at one budget, each scored by KL(fine-tune ‖
pack) on held-out questions and on the calibration questions themselves (answer tokens, teacher-forced), with the
plan's forms and each role's mean relative Frobenius error. docs/benchmarks.md's "Where the misses come from" quotes it.

    python benchmarks/quality_variants.py letters 0.03125 [--variants data-free,calibrated,unweighted] [--prompts 200]

Variants: ``data-free``; ``calibrated`` (the default: GPTQ, token-frequency row weights); ``unweighted``
(calibrated, ``row_weights=False``); ``damp0.1`` / ``damp0.5`` (calibrated, more GPTQ damping).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS
from quality import SKILLS, _answer_batches, _answer_logits, _forms_summary, _fresh, _kl

from peft_graft import extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import finetuned_skill
from peft_graft.evaluation.tasks import chat_text
from peft_graft.ops import pack_deltas

VARIANTS = {
    "data-free": {"calibrated": False},
    "calibrated": {"calibrated": True},
    "unweighted": {"calibrated": True, "row_weights": False},
    "damp0.1": {"calibrated": True, "damp": 0.1},
    "damp0.5": {"calibrated": True, "damp": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("skill", choices=sorted(SKILLS))
    parser.add_argument("budget", type=float)
    parser.add_argument("--variants", default="data-free,calibrated,unweighted", help=", ".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=200, help="held-out questions scored")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = SKILLS[args.skill]
    base_dir, tuned_dir = bundled_model(), finetuned_skill(recipe)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, held_out = recipe.build_task().split(recipe.train_examples, 500, seed=recipe.seed)
    texts = [chat_text(tokenizer, e.question, e.answer) for e in train[:64]]  # as quality.py calibrates
    batches = {"held_out": _answer_batches(tokenizer, held_out[: args.prompts]), "calibration": _answer_batches(
        tokenizer, train[:64])}  # fmt: skip
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    base_state = {k: v.clone() for k, v in base.named_parameters()}
    reference = {split: _answer_logits(tuned, b) for split, b in batches.items()}
    del tuned
    work = Path(tempfile.mkdtemp(prefix="graft-bench-variants-"))
    found = {}
    for name in args.variants.split(","):
        settings = dict(VARIANTS[name])
        calibration = texts if settings.pop("calibrated") else None
        t0 = time.perf_counter()
        report = extract_skillpack(
            base_dir, tuned_dir, work / name, budget=args.budget, calibration=calibration, progress=False, **settings
        )
        approx = pack_deltas(_fresh(base, base_state), work / name)
        with torch.no_grad():
            parameters = dict(base.named_parameters())
            for key, value in base_state.items():
                parameters[key].copy_(value + approx.get(key, torch.zeros_like(value)))
        row = {"seconds": time.perf_counter() - t0, "forms": _forms_summary(report)}
        for split, b in batches.items():
            kl = [_kl(f, m) for f, m in zip(reference[split], _answer_logits(base, b), strict=True)]
            mean = sum(kl) / len(kl)
            row[f"{split}_kl"] = mean
            row[f"{split}_kl_se"] = math.sqrt(sum((k - mean) ** 2 for k in kl) / (len(kl) - 1) / len(kl))
        errors: dict[str, list[float]] = {}
        for module in report.modules:
            errors.setdefault(module.role, []).append(module.frobenius_error)
        row["frobenius_error"] = {role: sum(e) / len(e) for role, e in errors.items()}
        found[name] = row
        print(
            f"{name:<11} held-out KL {row['held_out_kl']:.3g} ± {row['held_out_kl_se']:.2g}  calibration KL "
            f"{row['calibration_kl']:.3g} ± {row['calibration_kl_se']:.2g}  {row['forms']}  "
            f"Frobenius {', '.join(f'{k} {v:.3f}' for k, v in row['frobenius_error'].items())}",
            flush=True,
        )
    out = RESULTS / f"quality-variants-{args.skill}-{args.budget:g}.json"
    out.write_text(json.dumps({"skill": args.skill, "budget": args.budget, "variants": found}, indent=1) + "\n")


if __name__ == "__main__":
    main()
