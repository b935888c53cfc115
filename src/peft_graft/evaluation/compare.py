"""Evaluate base, fine-tune and SkillPacks side by side with `evaluate` metrics shipped inside the package.

The metrics live in ``peft_graft/metrics/<name>/<name>.py`` and load by path (``load_metric("reasoning_exact_match")``),
so nothing is fetched from the Hub: ``reasoning_exact_match`` (reasoning-gym scorers), ``code_pass_at_1`` (programs
run in a sandboxed subprocess) and ``token_perplexity`` (from :func:`text_nll`). :func:`compare` scores several models
on the same prompts and reports the retention ``(pack − base) / (fine-tune − base)``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..utils.extras import require_extra
from .tasks import Example, ReasoningTask, chat_prompt, generate_answers

METRICS_DIR = Path(__file__).parent / "metrics"
METRICS = ("reasoning_exact_match", "code_pass_at_1", "token_perplexity")


def load_metric(name: str):
    """A metric shipped with peft-graft, loaded by path with ``evaluate.load`` (offline)."""
    require_extra("eval", "peft-graft's metrics", ("evaluate",))
    import evaluate

    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; peft-graft ships {', '.join(METRICS)}")
    return evaluate.load(str(METRICS_DIR / name))


def text_nll(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    prompts: Sequence[str] | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    adapter_names=None,
) -> tuple[list[float], list[int]]:
    """Summed next-token negative log-likelihood (nats) and predicted-token count of each text.

    With `prompts` (each a prefix of its text), only the tokens after the prompt count: the loss of the answers.
    """
    if prompts is not None and len(prompts) != len(texts):
        raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts")
    sums, counts = [], []
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            extra = {} if adapter_names is None else {"adapter_names": list(adapter_names[start : start + batch_size])}
            with torch.no_grad():
                logits = model(**batch, **extra).logits.float()
            targets = batch["input_ids"][:, 1:]
            mask = batch["attention_mask"][:, 1:].bool()
            if prompts is not None:
                for row, prompt in enumerate(prompts[start : start + batch_size]):
                    prompt_length = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
                    mask[row, : max(prompt_length - 1, 0)] = False
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            sums += (losses * mask).sum(dim=1).tolist()
            counts += mask.sum(dim=1).tolist()
    finally:
        tokenizer.padding_side = padding_side
    return sums, counts


def perplexity(model, tokenizer, texts: Sequence[str], **options) -> float:
    nll, tokens = text_nll(model, tokenizer, texts, **options)
    return load_metric("token_perplexity").compute(predictions=nll, references=tokens)["perplexity"]


def reasoning_exact_match(
    model, tokenizer, task: ReasoningTask, examples: Sequence[Example], *, max_new_tokens: int = 16, **options
) -> float:
    """Greedy answers to `examples`, scored by the task's reasoning-gym scorer through the shipped metric."""
    prompts = [chat_prompt(tokenizer, example.question) for example in examples]
    completions = generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **options)
    references = [
        json.dumps({"task": task.name, "entry": example.entry, "options": task.dataset_options}, default=str)
        for example in examples
    ]
    return load_metric("reasoning_exact_match").compute(predictions=completions, references=references)["exact_match"]


def retention(score: float, base: float, finetuned: float) -> float | None:
    """``(score − base) / (finetuned − base)``: 1.0 keeps all the fine-tune's gain; None when there is no gain."""
    gain = finetuned - base
    if abs(gain) < 1e-12:
        return None
    return (score - base) / gain


@dataclass
class Comparison:
    """Scores of several models on the same data, one row per model."""

    metric: str
    scores: dict[str, float] = field(default_factory=dict)
    perplexities: dict[str, float] = field(default_factory=dict)
    base: str = "base"
    finetuned: str = "finetuned"

    def retention(self, name: str) -> float | None:
        """The share of the fine-tune's gain over the base that `name` keeps, on exact match (higher is better);
        None for the references themselves, without both references, and for perplexity (lower is better)."""
        if self.metric == "perplexity":
            return None
        if name in (self.base, self.finetuned) or self.base not in self.scores or self.finetuned not in self.scores:
            return None
        return retention(self.scores[name], self.scores[self.base], self.scores[self.finetuned])

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "rows": [
                {
                    "model": name,
                    self.metric: score,
                    "retention": self.retention(name),
                    "perplexity": self.perplexities.get(name),
                }
                for name, score in self.scores.items()
            ],
        }

    def table(self) -> str:
        """A markdown table: exact match and retention when questions were scored, perplexity when texts were."""
        columns = ["model"]
        if self.metric != "perplexity":
            columns += [self.metric, "retention"]
        if self.perplexities:
            columns.append("perplexity (lower is better)")
        lines = ["| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
        for row in self.to_dict()["rows"]:
            cells = [row["model"]]
            if self.metric != "perplexity":
                cells += [f"{row[self.metric]:.4f}", "-" if row["retention"] is None else f"{row['retention']:.1%}"]
            if self.perplexities:
                cells.append("-" if row["perplexity"] is None else f"{row['perplexity']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def compare(
    models: Mapping[str, Any],
    tokenizer,
    *,
    task: ReasoningTask | None = None,
    examples: Sequence[Example] = (),
    texts: Sequence[str] = (),
    adapter_names: Mapping[str, Sequence[str] | None] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
) -> Comparison:
    """Score every model on the same `examples` (exact match) and `texts` (perplexity).

    Name the references ``"base"`` and ``"finetuned"`` to get retention for the others. `adapter_names` gives a model
    per-row pack names (a routed or mixed-batch model).
    """
    if not examples and not texts:
        raise ValueError("compare needs examples (with a task) or texts")
    if examples and task is None:
        raise ValueError("examples need their task, to be scored")
    comparison = Comparison("exact_match" if examples else "perplexity")
    for name, model in models.items():
        rows = (adapter_names or {}).get(name)
        if examples:
            comparison.scores[name] = reasoning_exact_match(
                model,
                tokenizer,
                task,
                examples,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                adapter_names=rows,
            )
        if texts:
            nll_rows = None if rows is None else [rows[0]] * len(texts)
            value = perplexity(model, tokenizer, texts, batch_size=batch_size, adapter_names=nll_rows)
            comparison.perplexities[name] = value
            if not examples:
                comparison.scores[name] = value
    return comparison


def record_in_pack(pack_dir: str | os.PathLike, comparison: Comparison, pack_name: str, task_name: str) -> None:
    """Store the pack's score and retention in its ``pack_info.eval_results`` and re-render its model card."""
    from ..pack.folder import PackFolder

    pack = PackFolder(pack_dir)
    config = dict(pack.config)
    info = dict(config.get("pack_info") or {})
    results = [r for r in info.get("eval_results") or [] if r.get("task") != task_name]
    results.append({"task": task_name, "metric": comparison.metric, "value": comparison.scores[pack_name]})
    kept = comparison.retention(pack_name)
    if kept is not None and not math.isnan(kept):
        results.append({"task": task_name, "metric": "retention", "value": kept})
    info["eval_results"] = results
    config["pack_info"] = info
    pack.write_config(config)


__all__ = [
    "Comparison",
    "compare",
    "load_metric",
    "perplexity",
    "reasoning_exact_match",
    "record_in_pack",
    "retention",
    "text_nll",
]
