"""Budget mode's first pass: what every module's delta offers in each form, then the allocation of the budget.

Each projection (and each embedding, unless the fine-tune grew its vocabulary) offers its low-rank form from a
partial spectrum, its `FIRST_DIRECTIONS` leading singular directions (randomized; exact where that is most of the short
side), cached in the work folder with its vectors for the compression pass, so no module is decomposed twice. Where
a plan takes directions past the end of a module's partial spectrum (it plans with an optimistic guess of the rest),
that module's spectrum is recomputed with twice the directions and the budget planned again, until every plan stops
inside what its spectrum knows. An embedding's spectrum is complete, from its Gram matrix summed over row blocks, so
it is never held whole. With ``forms="any"`` every projection also offers its group-quantized dense form (its
round-to-nearest error measured at each bit width), and every 2-D delta fp16 storage; so does every embedding the
fine-tune did not grow (its rounding error measured row block by row block). Embeddings offer their sparse form
too: at most `EXACT_ENTRIES` exact candidates (the largest squared entries); below them a log-spaced histogram stands
in for the rest, so the planner's memory does not grow with the vocabulary or the budget.

With calibration, an embedding's errors are weighted by row (`row_weights`: its token's frequency in the calibration
text, plus a floor): its spectrum is that of the row-weighted delta, and its sparse form keeps the entries largest
after weighting. Measured on the 200-step arithmetic pair with the rest exact: the rank-111 embedding of the Frobenius
plan cost KL 7.0e-5, the same rank from the weighted spectrum 1.7e-8, at about the same Frobenius error.
"""

from __future__ import annotations

import dataclasses

import torch
from tqdm.auto import tqdm

from ..compress import LargestEntries, MagnitudeHistogram
from ..compress.dense import rounding_errors
from ..compress.svd import Spectrum, gram_spectrum, spectrum, squared_norm
from ..config import GraftConfig
from ..pack.cost import SPARSE_ENTRY_BYTES, dense_bytes, header_bytes
from .budget import BudgetPlan, ModuleCandidate, plan_budget
from .delta import DeltaReader
from .devices import DevicePool
from .roles import ModuleSpec
from .staging import Staging

EXACT_ENTRIES = 1 << 22
FIRST_DIRECTIONS = 96  # above the ranks a 1/16 budget buys up to ~1B parameters, so rarely extended
QUANTIZED_LEVELS = (2, 3, 4, 8)


def plan_extraction(
    specs: list[ModuleSpec],
    readers: DevicePool,
    config: GraftConfig,
    budget_bytes: int,
    grown_rows: dict[str, int],
    staging: Staging,
    progress: bool,
    forms: str = "any",
    frequencies: torch.Tensor | None = None,
) -> BudgetPlan:
    """Every delta's candidate forms (spread over the pool's DeltaReaders, one per device), then the allocation of
    `budget_bytes`. ``forms="lowrank"`` keeps projections low-rank (LoRA-exportable); ``"any"`` offers every form.
    `frequencies` (calibrated: each token id's share of the calibration tokens) weights embedding rows."""
    deltas: DeltaReader = readers.primary
    base = deltas.base
    # no sparse module can keep more entries than the whole budget buys
    affordable_entries = budget_bytes // SPARSE_ENTRY_BYTES
    mandatory = 0
    matrices = []
    for spec in specs:
        if spec.role == "skip":
            continue
        if spec.bias is not None and deltas.delta(spec.bias).any():
            mandatory += 2 * base.numel(spec.bias) + header_bytes(spec.name, 1)
        if spec.role == "embed":
            rows, cols = deltas.finetuned.shape(spec.weight)
            head_rows = grown_rows.get(spec.name, rows)
            if head_rows < rows:
                mandatory += 2 * (rows - head_rows) * cols + header_bytes(spec.name, 2)
        matrices.append(spec)

    bar = tqdm(total=len(matrices), desc="planning budget", unit="module", disable=not progress)

    def survey(reader: DeltaReader, spec: ModuleSpec) -> ModuleCandidate | int | None:
        """The module's candidate, the dense bytes it needs (a norm), or None when its delta is zero."""
        try:
            if spec.role == "embed":
                return _embedding_candidate(
                    spec, reader, config, grown_rows, affordable_entries, staging, forms,
                    frequencies if spec.tokens else None,
                )  # fmt: skip
            delta = reader.delta(spec.weight)
            if not delta.any():
                return None
            logical = delta.T if spec.transposed else delta
            if spec.role == "dense" or logical.dim() != 2:
                return dense_bytes(spec.name, logical.numel())
            return _projection_candidate(spec, logical, squared_norm(logical), staging, config.group_size, forms)
        finally:
            bar.update()

    candidates = []
    with bar:
        for found in readers.map(survey, matrices):
            if isinstance(found, ModuleCandidate):
                candidates.append(found)
            elif found is not None:
                mandatory += found
    specs_by_name = {spec.name: spec for spec in specs}

    def extended(reader: DeltaReader, candidate: ModuleCandidate) -> ModuleCandidate:
        spec = specs_by_name[candidate.name]
        delta = reader.delta(spec.weight)
        logical = delta.T if spec.transposed else delta
        wider = _cached(spec, staging, spectrum(logical, top=2 * candidate.singular_values.numel()))
        return dataclasses.replace(
            candidate, singular_values=wider.values.float().cpu(), spectrum_complete=wider.complete
        )

    while True:
        plan = plan_budget(budget_bytes, mandatory, candidates, config.group_size)
        short = {
            candidate.name
            for candidate in candidates
            if not candidate.spectrum_complete
            and len(plan.lowrank.get(candidate.name, ())) > candidate.singular_values.numel()
        }
        if not short:
            plan.forms = forms
            return plan
        wider = iter(readers.map(extended, [candidate for candidate in candidates if candidate.name in short]))
        candidates = [next(wider) if candidate.name in short else candidate for candidate in candidates]


def _cached(spec: ModuleSpec, staging: Staging, found: Spectrum) -> Spectrum:
    """Cache a module's spectrum (its vectors too) for the compression pass."""
    staging.save_vectors(spec.name, found.vectors.float(), found.values)
    return found


def cached_spectrum(staging: Staging, name: str) -> Spectrum | None:
    """The spectrum planning cached for a module, if any."""
    cached = staging.vectors(name)
    return None if cached is None else Spectrum(cached[1], cached[0])


def row_weights(frequencies: torch.Tensor | None, start: int, count: int, rows: int) -> torch.Tensor | None:
    """Weights of embedding rows ``start … start+count`` (of `rows`): ``wⱼ = fⱼ + 1/rows``, half the mass on the
    tokens' calibration frequencies `frequencies`, half spread evenly so that no row is dropped outright (ids the
    calibration never reached, or rows past its vocabulary, take the floor). None without calibration."""
    if frequencies is None:
        return None
    weights = torch.full((count,), 1.0 / rows, dtype=torch.float64)
    known = frequencies[start : start + count]
    weights[: known.numel()] += known
    return weights


def _embedding_candidate(
    spec: ModuleSpec,
    deltas: DeltaReader,
    config: GraftConfig,
    grown_rows: dict[str, int],
    affordable_entries: int,
    staging: Staging,
    forms: str,
    frequencies: torch.Tensor | None = None,
) -> ModuleCandidate | None:
    """An embedding's (or output embedding's) forms, in one streaming pass over row blocks: its sparse form always;
    its low-rank (complete spectrum from ΔᵀΔ), group-quantized (rounding error measured block by block, about 1 s at
    135M) and dense forms unless the fine-tune added rows (those are stored whole, beside a sparse delta of the
    others).

    With `frequencies`, each row's squared entries count times its weight (`row_weights`), scaled so that the
    weighted energy equals ``‖Δ‖²``: the module keeps its Frobenius share of the budget against the projections,
    while the weights decide which rows and directions it keeps."""
    rows, cols = deltas.finetuned.shape(spec.weight)
    head_rows = grown_rows.get(spec.name, rows)
    whole = head_rows == rows
    quantized = dict.fromkeys(QUANTIZED_LEVELS, 0.0) if whole and forms == "any" else {}
    exact = min(affordable_entries, EXACT_ENTRIES)
    largest = LargestEntries(exact, positions=False)
    histogram = MagnitudeHistogram() if affordable_entries > exact else None
    known = cached_spectrum(staging, spec.name) if whole else None
    gram = torch.zeros(cols, cols, dtype=torch.float64) if whole and known is None else None
    energy = weighted = 0.0
    for start, delta in deltas.row_blocks(spec.weight):
        head = delta[: max(0, head_rows - start)]
        if not head.numel():
            continue
        weights = row_weights(frequencies, start, head.shape[0], head_rows)
        squared = head.float().pow(2)
        energy += float(squared.double().sum())
        if weights is not None:
            squared = squared * weights.to(squared.device, squared.dtype)[:, None]
        squared = squared.reshape(-1)
        weighted += float(squared.double().sum())
        largest.add(squared)
        if histogram is not None:
            histogram.add(squared)
        for bits, error in rounding_errors(head, tuple(quantized), config.group_size, row_weights=weights).items():
            quantized[bits] += error
        if gram is not None:
            block = head.double()
            rows_side = block if weights is None else block * weights.to(block.device)[:, None]
            gram += (rows_side.T @ block).to(gram.device)
    if energy == 0.0:
        return None
    scale = energy / weighted  # 1 without weights
    squared = largest.result()[1].sort(descending=True).values.cpu() * scale
    tail: tuple[tuple[int, float], ...] = ()
    if histogram is not None and squared.numel() == exact:
        histogram.add(largest.result()[1], sign=-1.0)  # what the exact part holds is not tail
        tail = tuple((count, bin_energy * scale) for count, bin_energy in histogram.descending())
    if gram is not None:
        known = _cached(spec, staging, gram_spectrum(gram * scale))
    return ModuleCandidate(
        spec.name,
        head_rows,
        cols,
        energy=energy,
        singular_values=known.values.float().cpu() if known is not None else None,
        quantized_errors={bits: error * scale for bits, error in quantized.items()},
        dense=whole and forms == "any",
        squared_magnitudes=squared,
        sparse_tail=tail,
    )


def replan_layer(
    plan: BudgetPlan,
    unit: list[ModuleSpec],
    hessians: dict[str, torch.Tensor],
    deltas: DeltaReader,
    staging: Staging,
    group_size: int,
) -> None:
    """Calibrated: re-divide what `plan` gives a decoder layer's projections among them by output error
    ``‖(Δ − Δ̂)X‖²`` through each one's Hessian ``H = XᵀX``, instead of Frobenius error; updates `plan` in place.

    A direction's value becomes ``σᵢ²·vᵢᵀHvᵢ`` and a quantized form's error its rounding error under H. Each module's
    H is scaled so that its delta's output energy ``tr(ΔHΔᵀ)`` equals its Frobenius energy ``‖Δ‖²``: the modules'
    shares of the layer stay comparable as in the data-free plan (their outputs feed different places, at different
    scales), while H decides which directions, bits and form each one keeps. The layer's bytes do not change, so the
    pack stays within the budget. Directions are chosen among those the global plan's spectra found (as many as its
    Frobenius plan needed, and at least `FIRST_DIRECTIONS`): no SVD runs during the walk.
    """
    candidates, layer_bytes = [], 0
    for spec in unit:
        hessian = hessians.get(spec.name)
        if hessian is None or spec.role not in ("attn", "mlp") or plan.form(spec.name) is None:
            continue
        delta = deltas.delta(spec.weight)
        logical = (delta.T if spec.transposed else delta).float()
        energy = squared_norm(logical)
        if logical.dim() != 2 or energy == 0.0:
            continue
        hessian = hessian.to(logical.device, torch.float32)
        output_energy = float(((logical @ hessian) * logical).double().sum())
        if not output_energy > 0.0:
            continue
        hessian = hessian * (energy / output_energy)
        layer_bytes += plan.module_bytes(spec.name, *logical.shape, group_size)
        candidates.append(_projection_candidate(spec, logical, energy, staging, group_size, plan.forms, hessian))
    if not candidates:
        return
    plan.take([candidate.name for candidate in candidates], plan_budget(layer_bytes, 0, candidates, group_size))


def _projection_candidate(
    spec: ModuleSpec, logical, energy: float, staging: Staging, group_size: int, forms: str, hessian=None
) -> ModuleCandidate:
    """A projection's forms: low-rank from its cached (else first partial) spectrum, and with ``forms="any"`` the
    quantized (rounding error measured at each width) and dense ones. With a (scaled) `hessian`, errors are output
    errors and directions carry their weights; the spectrum is then taken as all there is: the layer walk computes
    no more spectra."""
    known = cached_spectrum(staging, spec.name)
    if known is None:
        known = _cached(spec, staging, spectrum(logical, top=FIRST_DIRECTIONS))
    any_form = forms == "any"
    return ModuleCandidate(
        spec.name,
        *logical.shape,
        energy=energy,
        singular_values=known.values.float().cpu(),
        spectrum_complete=known.complete or hessian is not None,
        direction_weights=None if hessian is None else _direction_weights(logical, known, hessian),
        quantized_errors=rounding_errors(logical, QUANTIZED_LEVELS, group_size, weight=hessian) if any_form else {},
        dense=any_form,
    )


def _direction_weights(logical: torch.Tensor, known: Spectrum, hessian: torch.Tensor) -> torch.Tensor:
    """``vᵢᵀHvᵢ`` of each known direction's right singular vector (the cached vectors are the short side's: right
    ones for a tall delta, left ones otherwise, whose right ones are ``Δᵀuᵢ/σᵢ``)."""
    vectors = known.vectors.to(logical.device, torch.float32)
    values = known.values.to(logical.device, torch.float32)
    if logical.shape[0] > logical.shape[1]:
        right = vectors
    else:
        right = (logical.T @ vectors) / torch.where(values > 0, values, torch.ones_like(values))
    weights = ((hessian @ right) * right).sum(0)
    return torch.where(values > 0, weights, torch.ones_like(weights)).clamp(min=0.0).cpu()
