"""Budget mode's first pass: every module's spectrum (or entry magnitudes), then the greedy allocation.

Each low-rank module starts with a partial spectrum, its `FIRST_DIRECTIONS` leading singular directions (randomized;
exact where that is most of the short side), cached in the work folder with its vectors for the compression pass, so
no module is decomposed twice. Where the plan reaches the end of a module's partial spectrum, the direction after it
might have been bought too: that module's spectrum is recomputed with twice the directions and the budget planned
again, until every plan stops inside what its spectrum knows. A sparse module keeps at most `EXACT_ENTRIES`
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
from .devices import DevicePool
from .roles import ModuleSpec
from .staging import Staging

EXACT_ENTRIES = 1 << 22
FIRST_DIRECTIONS = 96  # above the ranks a 1/16 budget buys up to ~1B parameters, so rarely extended


def plan_extraction(
    specs: list[ModuleSpec],
    readers: DevicePool,
    config: GraftConfig,
    budget_bytes: int,
    grown_rows: dict[str, int],
    staging: Staging,
    progress: bool,
) -> BudgetPlan:
    """Spectra and magnitudes of every delta (the spectra spread over the pool's DeltaReaders, one per device), then
    the greedy allocation of `budget_bytes`."""
    deltas: DeltaReader = readers.primary
    base, finetuned = deltas.base, deltas.finetuned
    # no sparse module can keep more entries than the whole budget buys
    affordable_entries = budget_bytes // SPARSE_ENTRY_BYTES
    mandatory = 0
    matrices, sparse = [], []
    for spec in specs:
        if spec.role == "skip":
            continue
        if spec.bias is not None and deltas.delta(spec.bias).any():
            mandatory += 2 * base.numel(spec.bias) + header_bytes(spec.name, 1)
        if spec.role != "embed":
            matrices.append(spec)
            continue
        rows, cols = finetuned.shape(spec.weight)
        head_rows = grown_rows.get(spec.name, rows)
        if head_rows < rows:
            mandatory += 2 * (rows - head_rows) * cols + header_bytes(spec.name, 2)
        candidate = _sparse_candidate(spec, deltas, head_rows, cols, affordable_entries)
        if candidate is not None:
            sparse.append(candidate)

    bar = tqdm(total=len(matrices), desc="planning budget", unit="module", disable=not progress)

    def survey(reader: DeltaReader, spec: ModuleSpec) -> LowRankCandidate | int:
        """The module's candidate, or the dense bytes it needs (0 when its delta is zero)."""
        try:
            cached = staging.vectors(spec.name)
            if cached is not None:
                return LowRankCandidate(spec.name, *reader.logical_shape(spec), cached[1].float())
            delta = reader.delta(spec.weight)
            if not delta.any():
                return 0
            logical = delta.T if spec.transposed else delta
            if spec.role == "dense" or logical.dim() != 2:
                return dense_bytes(spec.name, logical.numel())
            return _lowrank_candidate(spec, logical, FIRST_DIRECTIONS, staging)
        finally:
            bar.update()

    lowrank = []
    with bar:
        for found in readers.map(survey, matrices):
            if isinstance(found, LowRankCandidate):
                lowrank.append(found)
            else:
                mandatory += found
    specs_by_name = {spec.name: spec for spec in specs}

    def extended(reader: DeltaReader, candidate: LowRankCandidate) -> LowRankCandidate:
        spec = specs_by_name[candidate.name]
        delta = reader.delta(spec.weight)
        logical = delta.T if spec.transposed else delta
        return _lowrank_candidate(spec, logical, 2 * candidate.singular_values.numel(), staging)

    while True:
        try:
            plan = plan_budget(budget_bytes, mandatory, lowrank, sparse, config.group_size)
        except ValueError as error:
            raise BudgetError(str(error)) from error
        short = {
            candidate.name
            for candidate in lowrank
            if len(plan.lowrank.get(candidate.name, ())) >= candidate.singular_values.numel()
            and candidate.singular_values.numel() < min(candidate.out_features, candidate.in_features)
        }
        if not short:
            return plan
        wider = iter(readers.map(extended, [candidate for candidate in lowrank if candidate.name in short]))
        lowrank = [next(wider) if candidate.name in short else candidate for candidate in lowrank]


def _lowrank_candidate(spec: ModuleSpec, logical, directions: int, staging: Staging) -> LowRankCandidate:
    """A module's leading `directions` (all of them where that is most of its short side), cached for compression."""
    found = spectrum(logical, top=directions)
    staging.save_vectors(spec.name, found.vectors.float(), found.values)
    return LowRankCandidate(spec.name, logical.shape[0], logical.shape[1], found.values.float().cpu())


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
