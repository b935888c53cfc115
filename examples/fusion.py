"""Explicit fusion on a real model: SkillPacks from different sources on one pivot base (SmolLM2-135M-Instruct), served
through a router, against static merges (sum and TIES) of their reconstructed deltas.

    python examples/fusion.py [--held-out 100] [--density 0.2]

Packs (each at 1/16 of its fp16 delta):
- arithmetic: from the transfer example (taught by Gemma-3 270M's checked answers, SFT + DPO) when its work folder
  holds a pack, else from a full fine-tune on the task's reference answers (the demo's). The script prints which.
- letter counting: from a full fine-tune of SmolLM2 on the task's reference answers (the demo's, cached).

Then: one RoutedGraftModel holding both packs with a router trained on 50 prompts per skill, scored on a mixed batch of
both skills' held-out questions; and two merged models (sum, TIES) with no router. Every model is scored on the same
held-out questions of both skills.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import extract_skillpack
from peft_graft._demo.bundled import bundled_model, cache_dir
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill
from peft_graft.evaluation.tasks import chat_prompt, generate_answers
from peft_graft.ops import merge_packs
from peft_graft.routing import RoutedGraftModel

ANSWER_TOKENS = 8
TRANSFER_PACK = cache_dir() / "examples" / "transfer-gemma3-270m-dpo" / "pack"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=100, help="held-out questions per skill")
    parser.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each delta kept")
    parser.add_argument("--budget", type=float, default=1 / 16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    output = Path(tempfile.mkdtemp(prefix="graft-fusion-"))
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    print("1/4  packs from two sources on one base")
    packs = {"arithmetic": output / "arithmetic", "letters": output / "letters"}
    if (TRANSFER_PACK / "adapter_config.json").is_file():
        packs["arithmetic"] = TRANSFER_PACK
        print(f"     arithmetic: the transfer example's pack (Gemma-3 270M -> SmolLM2, SFT + DPO): {TRANSFER_PACK}")
    else:
        extract_skillpack(base_dir, finetuned_skill(ARITHMETIC), packs["arithmetic"], budget=args.budget)
        print("     arithmetic: a full fine-tune on reference answers (run examples/transfer.py for Gemma's)")
    extract_skillpack(base_dir, finetuned_skill(LETTER_COUNTING), packs["letters"], budget=args.budget)
    print("     letters: a full fine-tune on reference answers")

    recipes = {"arithmetic": ARITHMETIC, "letters": LETTER_COUNTING}
    tasks = {name: recipe.build_task() for name, recipe in recipes.items()}
    # held-out questions: distinct from the fine-tunes' 640 and the transfer's 968 training questions
    held_out = {name: tasks[name].split(968, args.held_out)[1] for name in recipes}
    prompts = {name: [chat_prompt(tokenizer, e.question) for e in examples] for name, examples in held_out.items()}

    def score(model, name, **options) -> float:
        answers = generate_answers(model, tokenizer, prompts[name], max_new_tokens=ANSWER_TOKENS, **options)
        return sum(tasks[name].score(a, e) for a, e in zip(answers, held_out[name], strict=True)) / len(answers)

    def base_model():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()

    rows: dict[str, dict[str, float]] = {"base": {name: score(base_model(), name) for name in recipes}}
    for name, pack in packs.items():
        model = PeftModel.from_pretrained(base_model(), pack).eval()
        rows[f"pack {name} alone"] = {other: score(model, other) for other in recipes}

    print("2/4  routed: both packs on one base, a router trained on 50 prompts per skill")
    routed = RoutedGraftModel.from_packs(base_model(), packs, tokenizer)
    train = {
        name: [chat_prompt(tokenizer, e.question) for e in recipes[name].build_task().examples(50, 7)]
        for name in recipes
    }
    routed.fit_router(train)
    mixed = [p for name in recipes for p in prompts[name]]
    routes = [route for route, _ in routed.route(mixed)]
    expected = [name for name in recipes for _ in prompts[name]]
    routing_accuracy = sum(r == e for r, e in zip(routes, expected, strict=True)) / len(expected)
    offset = 0
    rows["routed (router picks per query)"] = {}
    answers = generate_answers(routed.model, tokenizer, mixed, max_new_tokens=ANSWER_TOKENS, adapter_names=routes)
    for name in recipes:
        own = answers[offset : offset + len(prompts[name])]
        rows["routed (router picks per query)"][name] = sum(
            tasks[name].score(a, e) for a, e in zip(own, held_out[name], strict=True)
        ) / len(own)
        offset += len(own)

    print("3/4  static merges of the reconstructed deltas (no router)")
    for method in ("sum", "ties"):
        merged_dir = merge_packs(
            base_dir,
            list(packs.values()),
            output / f"merged-{method}",
            method=method,
            density=args.density,
            dtype=torch.float32,
        )
        label = f"merged: {method}" + (f" (density {args.density:g})" if method == "ties" else "")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        rows[label] = {name: score(merged, name) for name in recipes}

    print(f"4/4  {args.held_out} held-out questions per skill (exact match)\n")
    print(f"{'':<36}{'arithmetic':>12}{'letters':>10}{'mean':>8}")
    for label, values in rows.items():
        mean = sum(values.values()) / len(values)
        print(f"{label:<36}{values['arithmetic']:>12.3f}{values['letters']:>10.3f}{mean:>8.3f}")
    print(f"\nrouting accuracy on the {len(mixed)} mixed held-out prompts: {routing_accuracy:.3f}")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
