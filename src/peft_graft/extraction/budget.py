"""Spend a byte budget where the delta's error drops most: greedy on marginal error reduction per byte.

Each low-rank module offers singular directions, each at a bit width from `levels`: adding direction i at b bits
keeps ``σᵢ²·(1 − 2·ε_b)`` of its energy (both singular vectors are quantized, each losing a fraction ε_b), and
upgrading it from b to b' recovers ``2·σᵢ²·(ε_b − ε_b')``. Sparse modules offer their entries in magnitude order.
Directions join in singular-value order and bit widths never increase along them, so a module's plan is a rank plus
contiguous precision bands. A low-rank module whose plan would cost more than its dense fp16 delta becomes dense.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from ..pack.cost import (
    SPARSE_ENTRY_BYTES,
    band_overhead_bytes,
    dense_bytes,
    direction_bytes,
    header_bytes,
    lowrank_overhead_bytes,
)

# Relative squared error of a unit-RMS vector quantized group-wise (groups of 128) by round-to-nearest, measured on
# Gaussian vectors of length 576 and 1536: the planner's noise model.
QUANT_NOISE = {2: 0.25, 3: 0.046, 4: 0.010, 8: 4e-5, 16: 1e-7}
_SPARSE_CHUNK = 4096


@dataclass(frozen=True)
class LowRankCandidate:
    name: str
    out_features: int
    in_features: int
    singular_values: torch.Tensor  # descending


@dataclass(frozen=True)
class SparseCandidate:
    """A sparse module's entries by decreasing magnitude: the largest ones exactly, then (for matrices too large to
    hold every candidate) the rest as histogram bins of (count, energy), in decreasing magnitude."""

    name: str
    numel: int
    squared_magnitudes: torch.Tensor  # descending, non-zero entries only
    tail: tuple[tuple[int, float], ...] = ()


@dataclass
class BudgetPlan:
    """Bits per direction for low-rank modules (non-increasing; empty = left out), modules stored dense instead, and
    the number of entries kept per sparse module."""

    lowrank: dict[str, list[int]] = field(default_factory=dict)
    dense: set[str] = field(default_factory=set)
    sparse: dict[str, int] = field(default_factory=dict)
    planned_bytes: int = 0


def plan_budget(
    budget_bytes: int,
    mandatory_bytes: int,
    lowrank: list[LowRankCandidate],
    sparse: list[SparseCandidate],
    group_size: int,
    levels: tuple[int, ...] = (2, 3, 4, 8),
) -> BudgetPlan:
    """Allocate `budget_bytes` (minus `mandatory_bytes`) across modules; see the module docstring."""
    if budget_bytes < mandatory_bytes:
        raise ValueError(
            f"the budget ({budget_bytes} bytes) is below what norms, biases and added rows need alone "
            f"({mandatory_bytes} bytes); raise the budget"
        )
    levels = tuple(sorted(levels))
    dense: set[str] = set()
    for _ in range(len(lowrank) + 1):
        fixed = mandatory_bytes + sum(
            dense_bytes(c.name, c.out_features * c.in_features) for c in lowrank if c.name in dense
        )
        active = [c for c in lowrank if c.name not in dense]
        plan = _greedy(budget_bytes - fixed, active, sparse, group_size, levels)
        converted = {
            c.name
            for c in active
            if plan.lowrank.get(c.name)
            and _lowrank_cost(c, plan.lowrank[c.name], group_size)
            >= dense_bytes(c.name, c.out_features * c.in_features)
        }
        if not converted:
            plan.dense = dense
            plan.planned_bytes += fixed
            return plan
        dense |= converted
    raise AssertionError("unreachable: each round converts at least one module")


def _lowrank_cost(candidate: LowRankCandidate, bits: list[int], group_size: int) -> float:
    cost = sum(direction_bytes(candidate.out_features, candidate.in_features, b, group_size) for b in bits)
    return cost + lowrank_overhead_bytes(candidate.name, len(set(bits)))


def _greedy(
    budget: float, lowrank: list[LowRankCandidate], sparse: list[SparseCandidate], group_size: int, levels
) -> BudgetPlan:
    plan = BudgetPlan(lowrank={c.name: [] for c in lowrank}, sparse={c.name: 0 for c in sparse})
    spent = 0.0
    heap: list[tuple[float, int, tuple]] = []
    counter = 0

    def push(ratio: float, item: tuple) -> None:
        nonlocal counter
        if ratio > 0:
            heapq.heappush(heap, (-ratio, counter, item))
            counter += 1

    noise = {bits: QUANT_NOISE[bits] for bits in levels}
    sigma2 = {c.name: c.singular_values.double().pow(2).tolist() for c in lowrank}
    by_name = {c.name: c for c in lowrank}
    level_counts = {c.name: dict.fromkeys(levels, 0) for c in lowrank}

    def offer_direction(name: str, direction: int, level: int) -> None:
        """Offer raising `direction` of module `name` to levels[level] (level 0 = adding it)."""
        values = sigma2[name]
        if direction >= len(values) or values[direction] <= 0:
            return
        bits_now = plan.lowrank[name]
        if level > 0 and (direction >= len(bits_now) or bits_now[direction] != levels[level - 1]):
            return
        # keep bits non-increasing along directions
        if direction > 0 and (len(bits_now) < direction or bits_now[direction - 1] < levels[level]):
            return
        candidate = by_name[name]
        cost = direction_bytes(candidate.out_features, candidate.in_features, levels[level], group_size)
        if level == 0:
            gain = values[direction] * (1 - 2 * noise[levels[0]])
            if not bits_now:
                cost += header_bytes(name, 1)  # graft_S
        else:
            cost -= direction_bytes(candidate.out_features, candidate.in_features, levels[level - 1], group_size)
            gain = 2 * values[direction] * (noise[levels[level - 1]] - noise[levels[level]])
        push(gain / max(cost, 1.0), ("lowrank", name, direction, level))

    def band_change(name: str, direction: int, level: int) -> float:
        """Header bytes gained (+) or freed (−) by moving a direction into levels[level]."""
        counts = level_counts[name]
        change = band_overhead_bytes(name) if counts[levels[level]] == 0 else 0
        if level > 0 and counts[levels[level - 1]] == 1:
            change -= band_overhead_bytes(name)
        return change

    def offer_chunk(candidate: SparseCandidate, chunk: int) -> None:
        exact = candidate.squared_magnitudes.numel()
        chunks = math.ceil(exact / _SPARSE_CHUNK)
        if chunk < chunks:
            values = candidate.squared_magnitudes[chunk * _SPARSE_CHUNK : (chunk + 1) * _SPARSE_CHUNK]
            count, energy = values.numel(), float(values.double().sum())
        elif chunk - chunks < len(candidate.tail):
            count, energy = candidate.tail[chunk - chunks]
        else:
            return
        cost = SPARSE_ENTRY_BYTES * count + (header_bytes(candidate.name, 2) if chunk == 0 else 0)
        push(energy / cost, ("sparse", candidate, chunk, cost, count))

    for candidate in lowrank:
        offer_direction(candidate.name, 0, 0)
    for candidate in sparse:
        offer_chunk(candidate, 0)

    while heap:
        _, _, item = heapq.heappop(heap)
        if item[0] == "sparse":
            _, candidate, chunk, cost, count = item
            if spent + cost > budget:
                continue
            spent += cost
            plan.sparse[candidate.name] += count
            offer_chunk(candidate, chunk + 1)
            continue
        _, name, direction, level = item
        candidate = by_name[name]
        bits_now = plan.lowrank[name]
        cost = direction_bytes(candidate.out_features, candidate.in_features, levels[level], group_size)
        if level == 0:
            cost += header_bytes(name, 1) if not bits_now else 0
        else:
            cost -= direction_bytes(candidate.out_features, candidate.in_features, levels[level - 1], group_size)
        cost += band_change(name, direction, level)
        if spent + cost > budget:
            continue
        spent += cost
        level_counts[name][levels[level]] += 1
        if level == 0:
            bits_now.append(levels[0])
            offer_direction(name, direction + 1, 0)
        else:
            level_counts[name][levels[level - 1]] -= 1
            bits_now[direction] = levels[level]
            offer_direction(name, direction + 1, level)  # the next direction may follow up to this level now
        if level + 1 < len(levels):
            offer_direction(name, direction, level + 1)
    plan.planned_bytes = math.ceil(spent)
    return plan
