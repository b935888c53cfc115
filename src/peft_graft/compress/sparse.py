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
    return largest_mask(flat.detach().abs(), keep).nonzero().squeeze(1)


def largest_mask(magnitude: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of the (at most) `keep` largest non-zero entries of a 1-D non-negative tensor; of entries tied at the
    cut, the first ones.

    A selection (``kthvalue``) finds the cut: several times faster than ``topk`` when `keep` is millions, as for an
    embedding delta.
    """
    count = magnitude.numel()
    if keep >= count:
        return magnitude > 0
    if keep <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    cut = magnitude.kthvalue(count - keep + 1).values
    mask = magnitude > cut
    ties = (magnitude == cut).nonzero().squeeze(1)[: keep - int(mask.sum())]
    mask[ties] = True
    return mask & (magnitude > 0)


class LargestEntries:
    """The `keep` largest-magnitude non-zero entries over a stream of 1-D blocks, and their flat positions.

    Blocks must come in ascending position order; the result is then in ascending position order too. Memory stays
    within about ``2 · keep`` entries plus one block: the candidates are cut back to `keep` whenever they pass twice
    that. After a cut, entries not above its magnitude can never be kept (the kept ones are at least as large and
    come first), so they are dropped as they arrive and later cuts are rare.
    """

    def __init__(self, keep: int, *, positions: bool = True) -> None:
        self.keep = max(0, keep)
        self._track_positions = positions
        self._positions: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._count = 0
        self._floor = 0.0  # magnitude an entry must exceed to be kept: 0, then the last cut's

    def add(self, values: torch.Tensor, offset: int = 0) -> None:
        if self.keep == 0:
            return
        candidate = values.abs() > self._floor
        self._values.append(values[candidate])
        if self._track_positions:
            self._positions.append(candidate.nonzero().squeeze(1) + offset)
        self._count += self._values[-1].numel()
        if self._count > 2 * self.keep:
            self._cut()

    def _cut(self) -> None:
        values = torch.cat(self._values) if self._values else torch.empty(0)
        magnitude = values.abs()
        mask = largest_mask(magnitude, self.keep)
        if values.numel() >= self.keep > 0:
            self._floor = max(self._floor, float(magnitude[mask].min()))
        self._values = [values[mask]]
        if self._track_positions:
            positions = torch.cat(self._positions) if self._positions else torch.empty(0, dtype=torch.int64)
            self._positions = [positions[mask]]
        self._count = self._values[0].numel()

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(ascending positions or None, values)`` of the kept entries."""
        self._cut()
        return (self._positions[0] if self._track_positions else None), self._values[0]


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


class MagnitudeHistogram:
    """Counts and energies of the non-zero entries of a stream of blocks, in 1/16-octave bins of their squared
    magnitude (from 2⁻¹²⁰ to 2⁴⁰, far wider than any delta needs). Bins never cut between equal magnitudes, so a
    selection can be settled bin by bin and only the one bin holding the cut needs the exact values."""

    LOG2_LOW, LOG2_HIGH, PER_OCTAVE = -120, 40, 16

    def __init__(self) -> None:
        size = (self.LOG2_HIGH - self.LOG2_LOW) * self.PER_OCTAVE + 2  # bin 0: zeros; the last: everything above
        self.counts = torch.zeros(size, dtype=torch.float64)
        self.energies = torch.zeros(size, dtype=torch.float64)

    def bins(self, squared: torch.Tensor) -> torch.Tensor:
        """Each entry's bin (0 for zeros) from its squared magnitude; a higher bin holds strictly larger ones."""
        squared = squared.double()
        index = ((squared.log2() - self.LOG2_LOW) * self.PER_OCTAVE).floor().clamp(0, self.counts.numel() - 2) + 1
        return torch.where(squared > 0, index, torch.zeros_like(index)).long()

    def add(self, squared: torch.Tensor, sign: float = 1.0) -> None:
        """Count entries given by their squared magnitudes (`sign` -1 takes them out again)."""
        index = self.bins(squared).cpu()
        self.counts += sign * torch.bincount(index, minlength=self.counts.numel()).double()
        self.energies += sign * torch.bincount(index, weights=squared.double().cpu(), minlength=self.counts.numel())

    def cut(self, keep: int) -> tuple[int, int]:
        """``(bin, above)``: the bin holding the `keep`-th largest non-zero entry, and how many entries lie in higher
        bins; ``(0, nonzero)`` when `keep` covers every non-zero entry."""
        counts = self.counts.round().long()
        above = 0
        for index in range(counts.numel() - 1, 0, -1):
            if above + int(counts[index]) >= keep:
                return index, above
            above += int(counts[index])
        return 0, above

    def descending(self) -> list[tuple[int, float]]:
        """``(count, energy)`` of each non-empty bin, largest magnitudes first."""
        return [
            (round(float(self.counts[index])), float(self.energies[index]))
            for index in range(self.counts.numel() - 1, 0, -1)
            if self.counts[index] >= 0.5
        ]
