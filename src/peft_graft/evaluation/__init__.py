"""Evaluation (behind the ``[eval]`` extra): reasoning-gym tasks and prompts (``tasks``), sandboxed code execution
(``sandbox``), offline ``evaluate`` metrics (``metrics/``), and the base / fine-tune / pack comparison (``compare``)."""

from .compare import (
    Comparison,
    compare,
    load_metric,
    perplexity,
    reasoning_exact_match,
    record_in_pack,
    retention,
    text_nll,
)

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
