"""Two tiny-model skills over five-letter words, reverse and sort: they conflict, so one model cannot hold both
unless something (a router) tells them apart."""

from __future__ import annotations

import random

from peft_graft._demo.finetune import full_finetune
from peft_graft.evaluation.tasks import Example

from tiny_models import tiny_tokenizer

SKILLS = ("reverse", "sort")
STEPS, LEARNING_RATE = 120, 3e-3


def word_examples(skill: str, count: int, seed: int, tagged: bool = False) -> list[Example]:
    """Reverse the letters, or sort them; `tagged` prefixes the question with the skill (then it is routable)."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        word = "".join(rng.choice("abcdefgh") for _ in range(5))
        answer = word[::-1] if skill == "reverse" else "".join(sorted(word))
        examples.append(Example(f"{skill[:3]} {word}" if tagged else word, answer, {}))
    return examples


def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    return tokenizer


def finetune_skill(model, tokenizer, skill: str, tagged: bool = False):
    """A full fine-tune of `model` (in place) on 256 examples of `skill`."""
    full_finetune(
        model,
        tokenizer,
        word_examples(skill, 256, seed=1, tagged=tagged),
        steps=STEPS,
        batch_size=16,
        learning_rate=LEARNING_RATE,
        seed=0,
        progress=False,
    )
    return model.eval()
