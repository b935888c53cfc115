"""Spend a byte budget where the modelled error drops most, choosing each module's form and size.

Every module offers (bytes, error) choices, one curve per form it may take; `error` is what the module's delta loses,
``‖Δ − Δ̂‖²`` (or, with calibration, ``‖(Δ − Δ̂)X‖²``, when the candidate carries weights):

* low-rank: singular directions, each at a bit width from `levels`. Adding direction i at b bits keeps
  ``σᵢ²·wᵢ·(1 − 2·ε_b)`` (both singular vectors are quantized, each losing a fraction ε_b), and raising it from b to
  b' recovers ``2·σᵢ²·wᵢ·(ε_b − ε_b')``; ``wᵢ = vᵢᵀHvᵢ`` with calibration, 1 without (``‖(Δ − Δ_k)X‖² = Σ_{i>k}
  σᵢ²·vᵢᵀHvᵢ`` exactly, the uᵢ being orthonormal). Steps join in the order a greedy on error reduction per byte takes
  them within the module, directions in singular-value order and bit widths never increasing along them, so every
  point of the curve is a rank plus contiguous precision bands;
* quantized: the whole delta group-quantized at b bits, with its measured rounding error;
* dense: fp16, error ~0;
* sparse: entries by decreasing magnitude (the largest exactly, the rest as histogram bins).

The plan picks one point per module so that the summed error is smallest within the budget: a Lagrangian relaxation
(each module takes the point minimising ``error + λ·bytes``, λ found by bisection), then the leftover bytes go to
the upgrades that reduce the error most per byte. This is the lower convex hull of each module's curve, which is
where a greedy on marginal error per byte also ends; unlike that greedy, it compares whole forms (a quantized dense
delta is one jump, not a sum of small steps).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import BudgetError
from ..pack.cost import (
    SPARSE_ENTRY_BYTES,
    band_overhead_bytes,
    dense_bytes,
    direction_bytes,
    header_bytes,
    lowrank_overhead_bytes,
    quantized_dense_bytes,
)

# Relative squared error of a unit-RMS vector quantized group-wise (groups of 128) by round-to-nearest, measured on
# Gaussian vectors of length 576 and 1536: the planner's noise model for singular vectors.
QUANT_NOISE = {2: 0.25, 3: 0.046, 4: 0.010, 8: 4e-5, 16: 1e-7}
_SPARSE_CHUNK = 4096
_BISECTION_STEPS = 100


@dataclass(frozen=True)
class ModuleCandidate:
    """What planning knows of one module's delta: its energy (the error of storing nothing), and the data of each form
    it may take. A form whose data is missing is not offered."""

    name: str
    out_features: int
    in_features: int
    energy: float  # ‖Δ‖² (or ‖ΔX‖² with calibration)
    singular_values: torch.Tensor | None = None  # descending, maybe only the leading ones (low-rank form)
    spectrum_complete: bool = True  # else the values are the leading ones only (see _lowrank_points)
    direction_weights: torch.Tensor | None = None  # vᵢᵀHvᵢ per direction (calibrated), else every weight is 1
    quantized_errors: dict[int, float] = field(default_factory=dict)  # bits -> error of the whole delta (quantized)
    dense: bool = False  # offer fp16 storage of the whole delta
    squared_magnitudes: torch.Tensor | None = None  # descending, non-zero entries only (sparse form)
    sparse_tail: tuple[tuple[int, float], ...] = ()  # (count, energy) bins below the exact magnitudes


@dataclass
class BudgetPlan:
    """Per module, its form and size: bits per direction for low-rank modules (non-increasing; the leading directions
    unless `directions` says which), modules stored dense in fp16, the bit width of quantized dense modules, and the
    number of entries kept per sparse module. A module in none of them is left out."""

    lowrank: dict[str, list[int]] = field(default_factory=dict)
    dense: set[str] = field(default_factory=set)
    sparse: dict[str, int] = field(default_factory=dict)
    quantized: dict[str, int] = field(default_factory=dict)
    # low-rank modules whose directions are not the leading ones (calibrated plans): indices into the spectrum
    directions: dict[str, list[int]] = field(default_factory=dict)
    planned_bytes: int = 0
    forms: str = "any"  # the profile it was planned under (ExtractionOptions.forms)

    def module_bytes(self, name: str, out_features: int, in_features: int, group_size: int) -> int:
        """What the plan spends on a module's weight delta (its headers included)."""
        form = self.form(name)
        if form == "lowrank":
            bits = self.lowrank[name]
            spent = sum(direction_bytes(out_features, in_features, b, group_size) for b in bits)
            return math.ceil(spent + lowrank_overhead_bytes(name, len(set(bits))))
        if form == "quantized":
            return quantized_dense_bytes(name, out_features, in_features, self.quantized[name], group_size)
        if form == "dense":
            return dense_bytes(name, out_features * in_features)
        return 0

    def take(self, names: list[str], other: BudgetPlan) -> None:
        """Give modules `names` the forms and sizes `other` (a plan of just those modules) gives them."""
        for field_name in ("lowrank", "quantized", "directions", "sparse"):
            mine, theirs = getattr(self, field_name), getattr(other, field_name)
            for name in names:
                mine.pop(name, None)
                if name in theirs:
                    mine[name] = theirs[name]
        self.dense = (self.dense - set(names)) | (other.dense & set(names))

    def form(self, name: str) -> str | None:
        """The form the plan gives a module: lowrank, dense, quantized, sparse, or None (left out)."""
        if self.lowrank.get(name):
            return "lowrank"
        if name in self.dense:
            return "dense"
        if name in self.quantized:
            return "quantized"
        if self.sparse.get(name):
            return "sparse"
        return None


@dataclass
class _Curve:
    """One module's choices, compactly (a plan holds every module's at once): bytes and error per point, point 0 being
    nothing stored, then the points of each form in `segments`, as ``(form, first point, per-point values)``: the
    number of low-rank steps taken, the quantized bit width, nothing (dense), the entries kept (sparse)."""

    candidate: ModuleCandidate
    bytes: torch.Tensor  # float64
    errors: torch.Tensor  # float64
    segments: list[tuple[str, int, Sequence[int]]]
    steps: torch.Tensor  # int32 (n, 2): the low-rank curve's (direction, level) steps, in order

    def choice(self, point: int) -> tuple[str, int] | None:
        """``(form, value)`` of a point, None for point 0."""
        for form, first, values in self.segments:
            if first <= point < first + len(values):
                return form, values[point - first]
        return None


def plan_budget(
    budget_bytes: int,
    mandatory_bytes: int,
    candidates: list[ModuleCandidate],
    group_size: int,
    levels: tuple[int, ...] = (2, 3, 4, 8),
) -> BudgetPlan:
    """Allocate `budget_bytes` (minus `mandatory_bytes`) across modules; see the module docstring."""
    levels = tuple(sorted(levels))
    curves = [_curve(candidate, group_size, levels) for candidate in candidates]

    def needed() -> int:  # the least that keeps anything: what must be stored, plus the cheapest module's first step
        return mandatory_bytes + math.ceil(min((_least_bytes(curve) for curve in curves), default=0.0))

    if budget_bytes < mandatory_bytes:
        raise BudgetError(
            f"{budget_bytes} bytes is below what norms, biases and added rows need alone ({mandatory_bytes} bytes)",
            needed_bytes=needed(),
        )
    chosen = _allocate(curves, budget_bytes - mandatory_bytes)
    if curves and all(curve.choice(point) is None for curve, point in zip(curves, chosen, strict=True)):
        least = needed()
        raise BudgetError(
            f"{budget_bytes} bytes buys no module's delta (the least that keeps one is {least} bytes)",
            needed_bytes=least,
        )
    plan = BudgetPlan()
    spent = 0.0
    for curve, point in zip(curves, chosen, strict=True):
        spent += float(curve.bytes[point])
        choice, name = curve.choice(point), curve.candidate.name
        if choice is None:
            continue
        form, value = choice
        if form == "lowrank":
            plan.lowrank[name] = _bits_after(curve.steps[:value].tolist(), levels)
            order = _direction_values(curve.candidate)[1]
            if order is not None and order[: len(plan.lowrank[name])] != list(range(len(plan.lowrank[name]))):
                plan.directions[name] = order[: len(plan.lowrank[name])]
        elif form == "quantized":
            plan.quantized[name] = value
        elif form == "dense":
            plan.dense.add(name)
        else:
            plan.sparse[name] = value
    plan.planned_bytes = math.ceil(spent) + mandatory_bytes
    return plan


def _least_bytes(curve: _Curve) -> float:
    """The fewest bytes that keep anything of a module, whatever the budget: the cheapest point of its low-rank,
    quantized and dense forms, and for its sparse form one full chunk of entries (chunks shrink with a tiny budget,
    so a figure read off the sparse curve would not hold at a larger one)."""
    least = math.inf
    for form, first, values in curve.segments:
        if form == "sparse":
            entries = min(_SPARSE_CHUNK, curve.candidate.out_features * curve.candidate.in_features)
            least = min(least, float(header_bytes(curve.candidate.name, 2) + SPARSE_ENTRY_BYTES * entries))
        elif values:
            least = min(least, float(curve.bytes[first : first + len(values)].min()))
    return 0.0 if least == math.inf else least


def _allocate(curves: list[_Curve], budget: float) -> list[int]:
    """One point per curve, the summed error smallest within `budget`: bisection on λ, then leftover upgrades."""

    def points(price: float) -> list[int]:
        return [int(torch.argmin(c.errors + price * c.bytes)) for c in curves]

    def cost(chosen: list[int]) -> float:
        return sum(float(c.bytes[p]) for c, p in zip(curves, chosen, strict=True))

    if not curves:
        return []
    low, high = 0.0, 1.0
    while cost(points(high)) > budget:  # a price at which the plan fits
        high *= 16
        if high > 1e300:
            return [0] * len(curves)
    if cost(points(low)) <= budget:
        chosen = points(low)
    else:
        for _ in range(_BISECTION_STEPS):
            middle = math.sqrt(low * high) if low > 0 else high / 1e12
            if cost(points(middle)) > budget:
                low = middle
            else:
                high = middle
        chosen = points(high)
    # the bisection leaves up to one jump of budget unspent: take the best upgrades that still fit
    slack = budget - cost(chosen)
    while True:
        best = None
        for index, curve in enumerate(curves):
            now = chosen[index]
            extra = curve.bytes - curve.bytes[now]
            gain = curve.errors[now] - curve.errors
            fits = (extra <= slack) & (gain > 0)
            if not bool(fits.any()):
                continue
            ratio = torch.where(fits, gain / extra.clamp(min=1.0), torch.full_like(gain, -1.0))
            point = int(torch.argmax(ratio))
            if best is None or float(ratio[point]) > best[0]:
                best = (float(ratio[point]), index, point)
        if best is None:
            return chosen
        _, index, point = best
        slack -= float(curves[index].bytes[point] - curves[index].bytes[chosen[index]])
        chosen[index] = point


def _curve(candidate: ModuleCandidate, group_size: int, levels: tuple[int, ...]) -> _Curve:
    name, rows, cols = candidate.name, candidate.out_features, candidate.in_features
    sizes, errors, segments = [0.0], [candidate.energy], []

    def segment(form: str, points: list[tuple[float, float, int]], values=None) -> None:
        if points:
            segments.append((form, len(sizes), values or [value for _, _, value in points]))
            sizes.extend(size for size, _, _ in points)
            errors.extend(error for _, error, _ in points)

    dense_size = dense_bytes(name, rows * cols)
    steps: list[tuple[int, int]] = []
    if candidate.singular_values is not None:
        points = [(size, error, 0) for size, error in _lowrank_points(candidate, group_size, levels, dense_size, steps)]
        segment("lowrank", points, range(1, len(points) + 1))  # a point's value: the steps taken
    segment(
        "quantized",
        [
            (float(quantized_dense_bytes(name, rows, cols, bits, group_size)), error, bits)
            for bits, error in sorted(candidate.quantized_errors.items())
        ],
    )
    segment("dense", [(float(dense_size), 0.0, 0)] if candidate.dense else [])
    if candidate.squared_magnitudes is not None:
        segment("sparse", list(_sparse_points(candidate)))
    return _Curve(
        candidate,
        torch.tensor(sizes, dtype=torch.float64),
        torch.tensor(errors, dtype=torch.float64).clamp(min=0.0),
        segments,
        torch.tensor(steps, dtype=torch.int32).reshape(-1, 2),
    )


def _lowrank_points(
    candidate: ModuleCandidate, group_size: int, levels: tuple[int, ...], limit: float, steps: list[tuple[int, int]]
):
    """``(bytes, error)`` after each step of the module's own greedy, up to `limit` bytes; the steps are appended to
    `steps`. A step is ``(direction, level)``: add the direction at levels[0] (level 0), or raise it to
    levels[level]."""
    name, rows, cols = candidate.name, candidate.out_features, candidate.in_features
    values = _direction_values(candidate)[0]
    if not candidate.spectrum_complete and values and values[-1] > 0:
        # Beyond a partial spectrum, the best the low-rank form could do: the energy left, in directions as large as
        # the least known one. If a plan takes any of them, planning learns more of the spectrum and plans again;
        # if it picks another form even so, that form beats every real continuation.
        left = max(0.0, candidate.energy - sum(values))
        room = min(candidate.out_features, candidate.in_features) - len(values)
        each = max(values[-1], left / room) if room > 0 else 0.0  # what is left must fit in the room left
        count = min(room, math.ceil(left / each)) if each > 0 else 0
        values += [each] * max(0, count - 1) + ([left - each * (count - 1)] if count > 0 else [])
    noise = [QUANT_NOISE[bits] for bits in levels]
    step_bytes = [direction_bytes(rows, cols, bits, group_size) for bits in levels]
    bits_now: list[int] = []  # level index per direction
    level_counts = [0] * len(levels)
    heap: list[tuple[float, int, int, int]] = []

    def offer(direction: int, level: int) -> None:
        if direction >= len(values) or values[direction] <= 0:
            return
        if level > 0 and (direction >= len(bits_now) or bits_now[direction] != level - 1):
            return
        if direction > 0 and (len(bits_now) < direction or bits_now[direction - 1] < level):
            return  # bits never increase along directions
        if level == 0:
            gain = values[direction] * (1 - 2 * noise[0])
            cost = step_bytes[0] + (header_bytes(name, 1) if not bits_now else 0)
        else:
            gain = 2 * values[direction] * (noise[level - 1] - noise[level])
            cost = step_bytes[level] - step_bytes[level - 1]
        if gain > 0:
            heapq.heappush(heap, (-gain / max(cost, 1.0), direction, level, len(heap)))

    def band_change(level: int) -> float:
        change = band_overhead_bytes(name) if level_counts[level] == 0 else 0
        if level > 0 and level_counts[level - 1] == 1:
            change -= band_overhead_bytes(name)
        return change

    size, error = 0.0, candidate.energy
    offer(0, 0)
    while heap:
        _, direction, level, _ = heapq.heappop(heap)
        if level == 0:
            if direction != len(bits_now):
                continue
            cost = step_bytes[0] + (header_bytes(name, 1) if not bits_now else 0)
            gain = values[direction] * (1 - 2 * noise[0])
        else:
            if direction >= len(bits_now) or bits_now[direction] != level - 1:
                continue
            cost = step_bytes[level] - step_bytes[level - 1]
            gain = 2 * values[direction] * (noise[level - 1] - noise[level])
        cost += band_change(level)
        if size + cost >= limit:
            break
        size += cost
        error -= gain
        level_counts[level] += 1
        if level == 0:
            bits_now.append(0)
            offer(direction + 1, 0)
        else:
            level_counts[level - 1] -= 1
            bits_now[direction] = level
            offer(direction + 1, level)  # the next direction may follow up to this level now
        if level + 1 < len(levels):
            offer(direction, level + 1)
        steps.append((direction, level))
        yield size, error


def _direction_values(candidate: ModuleCandidate) -> tuple[list[float], list[int] | None]:
    """Each known direction's value, ``σᵢ²`` or ``σᵢ²·wᵢ``, descending, and (weighted) the order of the directions
    that sorts them: under H, any subset of the SVD's directions loses exactly the values of those left out, so the
    most valuable directions are kept, whatever their singular values."""
    values = candidate.singular_values.double().pow(2)
    if candidate.direction_weights is None:
        return values.tolist(), None
    values = values * candidate.direction_weights.double()
    order = torch.argsort(values, descending=True, stable=True)
    return values[order].tolist(), order.tolist()


def _bits_after(steps: list[tuple[int, int]], levels: tuple[int, ...]) -> list[int]:
    """Bits per direction after replaying low-rank steps."""
    bits: list[int] = []
    for direction, level in steps:
        if level == 0:
            bits.append(levels[0])
        else:
            bits[direction] = levels[level]
    return bits


def _sparse_points(candidate: ModuleCandidate):
    """``(bytes, error, entries)`` after each chunk of entries, largest first."""
    squared = candidate.squared_magnitudes
    chunks = [(chunk.numel(), float(chunk.double().sum())) for chunk in squared.split(_SPARSE_CHUNK) if chunk.numel()]
    size, error, count = float(header_bytes(candidate.name, 2)), candidate.energy, 0
    for entries, energy in (*chunks, *candidate.sparse_tail):
        size += SPARSE_ENTRY_BYTES * entries
        error -= energy
        count += entries
        yield size, error, count
