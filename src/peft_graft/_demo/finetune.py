"""A short full-parameter fine-tune on prompt/answer pairs: how the demo, tests and benchmarks make real fine-tunes.

The loss is on answer tokens only. Plain PyTorch (AdamW, fp32, constant learning rate after a short warm-up) keeps a
CPU step as cheap as it can be; for larger runs use ``trl.SFTTrainer``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluation.tasks import Example, chat_prompt


def full_finetune(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 5e-5,
    warmup_steps: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train every parameter of `model` on `examples` for `steps` steps; returns the loss of each step."""
    if steps < 1 or not examples:
        raise ValueError("full_finetune needs steps >= 1 and at least one example")
    generator = random.Random(seed)
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [_tokenize(tokenizer, example) for example in examples]
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, warmup_steps)))
    model.train()
    losses = []
    order: list[int] = []
    bar = tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress)
    for _ in bar:
        if len(order) < batch_size:
            order += generator.sample(range(len(rows)), len(rows))
        batch = [rows[order.pop()] for _ in range(batch_size)]
        input_ids, labels = _collate(batch, pad)
        loss = model(input_ids=input_ids, labels=labels).loss  # right padding: causal attention never sees it
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    if not all(math.isfinite(loss) for loss in losses):
        raise FloatingPointError("the fine-tune diverged (non-finite loss); lower the learning rate")
    return losses


def save_finetune(model, tokenizer, folder: str | os.PathLike) -> Path:
    """Save a fine-tuned model (fp32, so small updates survive) and its tokenizer."""
    folder = Path(folder)
    model.float().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _tokenize(tokenizer, example: Example) -> tuple[list[int], int]:
    prompt = tokenizer(chat_prompt(tokenizer, example.question), add_special_tokens=False)["input_ids"]
    answer = tokenizer(example.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, len(prompt)


def _collate(batch, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad)
    labels = torch.full((len(batch), width), -100)
    for row, (ids, prompt_length) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, labels
