"""Budget mode's first pass: every module's spectrum (or entry magnitudes), then the greedy allocation."""

from __future__ import annotations

from tqdm.auto import tqdm

from ..compress import LargestEntries
from ..compress.svd import singular_values
from ..config import GraftConfig
from ..errors import BudgetError
from ..pack.cost import SPARSE_ENTRY_BYTES, dense_bytes, header_bytes
from .budget import BudgetPlan, LowRankCandidate, SparseCandidate, plan_budget
from .delta import DeltaReader
from .roles import ModuleSpec


def plan_extraction(
    specs: list[ModuleSpec],
    deltas: DeltaReader,
    config: GraftConfig,
    budget_bytes: int,
    grown_rows: dict[str, int],
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
            largest = LargestEntries(affordable_entries, positions=False)
            for start, delta in deltas.row_blocks(spec.weight):
                largest.add(delta[: max(0, head_rows - start)].reshape(-1).pow(2))
            squared = largest.result()[1]
            if squared.numel():
                sparse.append(SparseCandidate(spec.name, head_rows * cols, squared.sort(descending=True).values))
            continue
        delta = deltas.delta(spec.weight)
        if not delta.any():
            continue
        logical = delta.T if spec.transposed else delta
        if spec.role == "dense" or logical.dim() != 2:
            mandatory += dense_bytes(spec.name, logical.numel())
        else:
            lowrank.append(LowRankCandidate(spec.name, logical.shape[0], logical.shape[1], singular_values(logical)))
    try:
        return plan_budget(budget_bytes, mandatory, lowrank, sparse, config.group_size)
    except ValueError as error:
        raise BudgetError(str(error), budget=None) from error
