"""Budget mode's first pass: every module's spectrum (or entry magnitudes), then the greedy allocation.

Each low-rank module's spectrum comes from one float64 eigendecomposition, whose vectors are cached in the work
folder for the compression pass, so no module is decomposed twice. A sparse module keeps at most `EXACT_ENTRIES`
exact candidates (its largest squared entries); below them a log-spaced histogram stands in for the rest, so the
planner's memory does not grow with the vocabulary or the budget. Plans are exact whenever the budget buys fewer
entries than that, as it does for every model up to a few billion parameters at 1/16.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..compress import LargestEntries
from ..compress.svd import Spectrum, spectrum
from ..config import GraftConfig
from ..errors import BudgetError
from ..pack.cost import SPARSE_ENTRY_BYTES, dense_bytes, header_bytes
from .budget import BudgetPlan, LowRankCandidate, SparseCandidate, plan_budget
from .delta import DeltaReader
from .roles import ModuleSpec
from .staging import Staging

EXACT_ENTRIES = 1 << 22
# Histogram of squared magnitudes: 1/16-octave bins from 2^-120 to 2^40 (a delta's entries are far inside).
_LOG2_LOW, _LOG2_HIGH, _BINS_PER_OCTAVE = -120, 40, 16


def plan_extraction(
    specs: list[ModuleSpec],
    deltas: DeltaReader,
    config: GraftConfig,
    budget_bytes: int,
    grown_rows: dict[str, int],
    staging: Staging,
    progress: bool,
) -> BudgetPlan:
    """Spectra and magnitudes of every delta, then the greedy allocation of `budget_bytes`."""
    base, finetuned = deltas.base, deltas.finetuned
    # no sparse module can keep more entries than the whole budget buys
    affordable_entries = budget_bytes // SPARSE_ENTRY_BYTES
    mandatory = 0
    lowrank, sparse = [], []
    for spec in tqdm(specs, desc="planning budget", unit="module", disable=not progress):
        if spec.role == "skip":
            continue
        if spec.bias is not None and deltas.delta(spec.bias).any():
            mandatory += 2 * base.numel(spec.bias) + header_bytes(spec.name, 1)
        if spec.role == "embed":
            rows, cols = finetuned.shape(spec.weight)
            head_rows = grown_rows.get(spec.name, rows)
            if head_rows < rows:
                mandatory += 2 * (rows - head_rows) * cols + header_bytes(spec.name, 2)
            candidate = _sparse_candidate(spec, deltas, head_rows, cols, affordable_entries)
            if candidate is not None:
                sparse.append(candidate)
            continue
        cached = staging.vectors(spec.name)
        if cached is not None:
            lowrank.append(LowRankCandidate(spec.name, *deltas.logical_shape(spec), cached[1].float()))
            continue
        delta = deltas.delta(spec.weight)
        if not delta.any():
            continue
        logical = delta.T if spec.transposed else delta
        if spec.role == "dense" or logical.dim() != 2:
            mandatory += dense_bytes(spec.name, logical.numel())
            continue
        found = spectrum(logical)
        staging.save_vectors(spec.name, found.vectors.float(), found.values)
        lowrank.append(LowRankCandidate(spec.name, logical.shape[0], logical.shape[1], found.values.float().cpu()))
        del delta, logical, found
    try:
        return plan_budget(budget_bytes, mandatory, lowrank, sparse, config.group_size)
    except ValueError as error:
        raise BudgetError(str(error)) from error


def cached_spectrum(staging: Staging, name: str) -> Spectrum | None:
    """The spectrum planning cached for a module, if any."""
    cached = staging.vectors(name)
    return None if cached is None else Spectrum(cached[1], cached[0])


def _sparse_candidate(
    spec: ModuleSpec, deltas: DeltaReader, head_rows: int, cols: int, affordable_entries: int
) -> SparseCandidate | None:
    exact = min(affordable_entries, EXACT_ENTRIES)
    largest = LargestEntries(exact, positions=False)
    bins = (_LOG2_HIGH - _LOG2_LOW) * _BINS_PER_OCTAVE
    counts = torch.zeros(bins + 2, dtype=torch.float64)
    energies = torch.zeros(bins + 2, dtype=torch.float64)
    histogram = affordable_entries > exact
    for start, delta in deltas.row_blocks(spec.weight):
        squared = delta[: max(0, head_rows - start)].reshape(-1).pow(2)
        largest.add(squared)
        if histogram:
            _histogram_add(counts, energies, squared)
    squared = largest.result()[1].sort(descending=True).values.cpu()
    if not squared.numel():
        return None
    tail: tuple[tuple[int, float], ...] = ()
    if histogram and squared.numel() == exact:
        _histogram_add(counts, energies, squared, sign=-1.0)  # what the exact part holds is not tail
        tail = tuple(
            (round(float(counts[index])), float(energies[index]))
            for index in range(bins + 1, 0, -1)
            if counts[index] >= 0.5
        )
    return SparseCandidate(spec.name, head_rows * cols, squared, tail)


def _histogram_add(counts: torch.Tensor, energies: torch.Tensor, squared: torch.Tensor, sign: float = 1.0) -> None:
    values = squared[squared > 0].double()
    index = ((values.log2() - _LOG2_LOW) * _BINS_PER_OCTAVE).floor().clamp(-1, counts.numel() - 2).long() + 1
    counts += sign * torch.bincount(index.cpu(), minlength=counts.numel()).double()
    energies += sign * torch.bincount(index.cpu(), weights=values.cpu(), minlength=counts.numel())
