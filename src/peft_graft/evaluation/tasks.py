"""Skills with automatic scoring, from reasoning-gym: prompts, answers, generation and accuracy.

A :class:`ReasoningTask` turns a reasoning-gym dataset into chat prompts for an instruct model, scores completions
with the dataset's own scorer, and measures accuracy with batched greedy generation. It works for a plain model, a
``PeftModel`` with one pack, or a mixed batch of packs (``adapter_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..utils.extras import require_extra

SYSTEM_PROMPT = "Answer with the final answer only."


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    entry: dict[str, Any]


class ReasoningTask:
    """A reasoning-gym task (``pip install reasoning-gym``), e.g. ``ReasoningTask("basic_arithmetic")``."""

    def __init__(self, name: str, **dataset_options: Any) -> None:
        require_extra("eval", "a reasoning-gym task", ("reasoning_gym",))
        import reasoning_gym

        self.name = name
        self.dataset_options = dataset_options
        self._reasoning_gym = reasoning_gym
        self._scorer = reasoning_gym.create_dataset(name, size=1, seed=0, **dataset_options)

    def examples(self, count: int, seed: int) -> list[Example]:
        dataset = self._reasoning_gym.create_dataset(self.name, size=count, seed=seed, **self.dataset_options)
        return [Example(entry["question"], str(entry["answer"]), entry) for entry in dataset]

    def split(self, train: int, test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """Training and held-out examples; held-out questions are distinct and never appear in training."""
        train_examples = self.examples(train, seed)
        seen = {example.question for example in train_examples}
        test_examples: list[Example] = []
        for attempt in range(1, 9):
            for example in self.examples(test * 2, seed + 1_000_003 * attempt):
                if example.question not in seen and len(test_examples) < test:
                    seen.add(example.question)
                    test_examples.append(example)
            if len(test_examples) == test:
                return train_examples, test_examples
        raise ValueError(
            f"{self.name}: found only {len(test_examples)} held-out questions distinct from {train} training ones; "
            "use fewer training examples or a wider task configuration"
        )

    def score(self, completion: str, example: Example) -> float:
        """The dataset's score (1.0 = correct) of a completion's first line."""
        answer = completion.strip().split("\n")[0].strip().rstrip(".").strip()
        return float(self._scorer.score_answer(answer, example.entry))


def chat_prompt(tokenizer, question: str) -> str:
    """The instruct prompt for a question, ending where the assistant's answer starts.

    A tokenizer without a chat template (a base model) gets the plain ``Question: …\nAnswer:`` format instead.
    """
    if not getattr(tokenizer, "chat_template", None):
        return few_shot_prompt(question, ())
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def few_shot_prompt(question: str, shots: Sequence[Example]) -> str:
    """A plain-text prompt for base models: worked examples, then the question, ending where the answer starts."""
    worked = "".join(f"Question: {shot.question}\nAnswer: {shot.answer}\n\n" for shot in shots)
    return f"{worked}Question: {question}\nAnswer:"


def chat_text(tokenizer, question: str, answer: str) -> str:
    """Prompt plus answer plus end-of-turn: one training text."""
    return chat_prompt(tokenizer, question) + answer + tokenizer.eos_token


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    adapter_names: Sequence[str] | None = None,
    progress: bool = False,
    description: str = "generating",
    generation_options: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions of `prompts` (left-padded batches); `adapter_names` gives each prompt its own pack.

    `generation_options` go to ``generate`` (e.g. sampling); with ``num_return_sequences=n`` the result holds n
    completions per prompt, prompt by prompt.
    """
    options = {"do_sample": False, **(generation_options or {})}
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    completions = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=description, disable=not progress, unit="batch"):
            batch = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True)
            extra = {}
            if adapter_names is not None:
                extra["adapter_names"] = list(adapter_names[start : start + batch_size])
            with torch.no_grad():
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    **options,
                    **extra,
                )
            completions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
    return completions


def accuracy(
    model, tokenizer, task: ReasoningTask, examples: Sequence[Example], *, description: str = "evaluating", **options
) -> float:
    """Mean score of greedy answers to `examples` (options go to :func:`generate_answers`)."""
    prompts = [chat_prompt(tokenizer, example.question) for example in examples]
    completions = generate_answers(model, tokenizer, prompts, description=description, **options)
    return sum(task.score(c, e) for c, e in zip(completions, examples, strict=True)) / len(examples)
