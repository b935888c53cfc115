"""Reproducible skill fine-tunes of the bundled base model, cached on disk.

A :class:`SkillRecipe` pins everything a fine-tune depends on (task, data sizes, steps, learning rate, seed), so the
demo, the real-model tests and the benchmarks share one fine-tune per recipe instead of training it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .bundled import DEFAULT_MODEL, bundled_model, cache_dir
from .tasks import Example, ReasoningTask


@dataclass(frozen=True)
class SkillRecipe:
    """A reasoning-gym skill and how to fine-tune it."""

    task: str
    options: dict[str, Any] = field(default_factory=dict)
    train_examples: int = 640
    test_examples: int = 300
    steps: int = 80
    learning_rate: float = 3e-4
    batch_size: int = 8
    seed: int = 0

    def build_task(self) -> ReasoningTask:
        return ReasoningTask(self.task, **self.options)

    def split(self) -> tuple[list[Example], list[Example]]:
        return self.build_task().split(self.train_examples, self.test_examples, self.seed)

    def key(self, base: str) -> str:
        payload = json.dumps({"base": base, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# Measured with SmolLM2-135M-Instruct on 2 CPU cores (held-out accuracy, base -> fine-tune):
# single-digit arithmetic 0.6 % -> 31 % in 80 steps; counting a letter in a short text 0.8 % -> 56 % in 60 steps;
# counting animals' legs 0.2 % -> 6 % in 60 steps (a weak skill: routing tests use it for its distinct prompts).
ARITHMETIC = SkillRecipe("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
LETTER_COUNTING = SkillRecipe("letter_counting", {"min_words": 3, "max_words": 5}, steps=60)
LEG_COUNTING = SkillRecipe("leg_counting", {"min_animals": 1, "max_animals": 2}, steps=20)


def finetuned_skill(recipe: SkillRecipe = ARITHMETIC, base: str = DEFAULT_MODEL, *, progress: bool = True) -> Path:
    """Folder of the recipe's full fine-tune of a bundled base model, trained on first use and cached."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .finetune import full_finetune, save_finetune

    base_dir = bundled_model(base)
    target = cache_dir() / "finetunes" / f"{base}-{recipe.task}-{recipe.key(base)}"
    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    train, _ = recipe.split()
    losses = full_finetune(
        model,
        tokenizer,
        train,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        learning_rate=recipe.learning_rate,
        seed=recipe.seed,
        progress=progress,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        save_finetune(model, tokenizer, staging)
        (staging / "recipe.json").write_text(json.dumps({**asdict(recipe), "losses": losses}, indent=2, default=list))
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
