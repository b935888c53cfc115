"""Budget mode's first pass: every module's spectrum (or entry magnitudes), then the greedy allocation.

Each low-rank module's spectrum comes from one float64 eigendecomposition, whose vectors are cached in the work
folder for the compression pass, so no module is decomposed twice. A sparse module keeps at most `EXACT_ENTRIES`
exact candidates (its largest squared entries); below them a log-spaced histogram stands in for the rest, so the
planner's memory does not grow with the vocabulary or the budget. Plans are exact whenever the budget buys fewer
entries than that, as it does for every model up to a few billion parameters at 1/16.
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..compress import LargestEntries, MagnitudeHistogram
from ..compress.svd import Spectrum, spectrum
from ..config import GraftConfig
from ..errors import BudgetError
from ..pack.cost import SPARSE_ENTRY_BYTES, dense_bytes, header_bytes
from .budget import BudgetPlan, LowRankCandidate, SparseCandidate, plan_budget
from .delta import DeltaReader
from .roles import ModuleSpec
from .staging import Staging

EXACT_ENTRIES = 1 << 22


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
    histogram = MagnitudeHistogram() if affordable_entries > exact else None
    for start, delta in deltas.row_blocks(spec.weight):
        squared = delta[: max(0, head_rows - start)].reshape(-1).pow(2)
        largest.add(squared)
        if histogram is not None:
            histogram.add(squared)
    squared = largest.result()[1].sort(descending=True).values.cpu()
    if not squared.numel():
        return None
    tail: tuple[tuple[int, float], ...] = ()
    if histogram is not None and squared.numel() == exact:
        histogram.add(squared, sign=-1.0)  # what the exact part holds is not tail
        tail = tuple(histogram.descending())
    return SparseCandidate(spec.name, head_rows * cols, squared, tail)
