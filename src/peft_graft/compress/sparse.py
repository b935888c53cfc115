"""Magnitude pruning into a flat sparse delta (sorted row-major indices + values)."""

from __future__ import annotations

import math

import torch


def magnitude_prune(dense: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``ceil(density * numel)`` largest-magnitude non-zero entries of `dense`.

    Returns ``(indices, values)``: int64 flat row-major indices in ascending order and the kept values. Exact zeros are
    never kept, so a zero delta prunes to an empty one.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    flat = dense.reshape(-1)
    positions = top_magnitude_positions(flat, math.ceil(density * flat.numel()))
    return positions, flat[positions]


def top_magnitude_positions(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """Ascending positions of the (at most) `keep` largest-magnitude non-zero entries of a 1-D tensor."""
    magnitude = flat.detach().abs()
    if keep < flat.numel():
        positions = torch.topk(magnitude, keep, sorted=False).indices
    else:
        positions = torch.arange(flat.numel(), device=flat.device)
    return positions[magnitude[positions] > 0].sort().values


def csr_row_pointers(indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """CSR row pointers (rows + 1,) for sorted flat row-major `indices` of a (rows, cols) matrix."""
    pointers = torch.zeros(rows + 1, dtype=torch.int64, device=indices.device)
    pointers[1:] = torch.bincount(indices // cols, minlength=rows).cumsum(0)
    return pointers


def scatter_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Dense tensor of `shape` holding `values` at flat row-major `indices`, zeros elsewhere."""
    dense = values.new_zeros(math.prod(shape))
    dense[indices] = values
    return dense.view(shape)
