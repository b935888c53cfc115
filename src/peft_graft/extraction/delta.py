"""The delta of a fine-tune against its base, read tensor by tensor (or in blocks of rows) from both checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..errors import NonFiniteDeltaError
from .checkpoint import CheckpointReader
from .roles import ModuleSpec


class DeltaReader:
    """``finetuned − base`` of any tensor, in float32 on `device`; rows a fine-tune added to an embedding are
    relative to zero."""

    # Embedding matrices are streamed in blocks of rows (about this many entries each), so the largest delta is never
    # held whole, and wide vocabularies cost no more per block than narrow ones.
    BLOCK_ENTRIES = 1 << 22

    def __init__(self, base: CheckpointReader, finetuned: CheckpointReader, device: torch.device | str = "cpu") -> None:
        self.base, self.finetuned = base, finetuned
        self.device = torch.device(device)

    def logical_shape(self, spec: ModuleSpec) -> tuple[int, int]:
        """(out, in) of a module's weight delta (Conv1D stores its weight transposed)."""
        rows, cols = self.finetuned.shape(spec.weight)
        return (cols, rows) if spec.transposed else (rows, cols)

    def delta(self, key: str) -> torch.Tensor:
        return self.delta_rows(key, 0, self.finetuned.shape(key)[0] if self.finetuned.shape(key) else 1)

    def delta_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a delta."""
        tuned = self.finetuned.get_rows(key, start, stop).to(self.device, torch.float32)
        base_rows = self.base.shape(key)[0] if self.base.shape(key) else 1
        base = self.base.get_rows(key, min(start, base_rows), min(stop, base_rows)).to(self.device, torch.float32)
        if base.shape != tuned.shape:
            base = torch.cat([base, base.new_zeros(tuned.shape[0] - base.shape[0], *tuned.shape[1:])])
        delta = tuned - base
        low, high = torch.aminmax(delta) if delta.numel() else (delta.new_zeros(()), delta.new_zeros(()))
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):  # NaN propagates: one pass, no mask
            raise NonFiniteDeltaError(
                f"the delta of {key} holds NaN or Inf; check the fine-tune's weights",
                source=self.finetuned.source,
                tensor=key,
            )
        return delta

    def row_blocks(self, key: str) -> Iterable[tuple[int, torch.Tensor]]:
        """``(first row, delta of the rows)`` over the whole tensor, in blocks of about BLOCK_ENTRIES entries."""
        rows, *rest = self.finetuned.shape(key)
        step = max(1, self.BLOCK_ENTRIES // max(1, math.prod(rest)))
        for start in range(0, rows, step):
            yield start, self.delta_rows(key, start, min(start + step, rows))
