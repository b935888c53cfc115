"""Truncated SVD of a weight delta, at a fixed rank or at the smallest rank holding a fraction of the energy.

Full ``torch.linalg.svd`` is exact; ``torch.svd_lowrank`` (randomized) is much cheaper when the rank is far below
``min(shape)``. A randomized result is checked before it is used: a second run with twice the power iterations must
not capture noticeably more energy (else it had not converged to the top singular subspace), otherwise the full SVD
is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Use the randomized SVD when the wanted rank is at most this fraction of min(shape) and the matrix is big enough
# for it to pay off (measured on 2 CPU cores: a full SVD of 576x1536 takes 0.07 s, of 2048x2048 1.2 s vs 0.2 s).
RANDOMIZED_BELOW = 0.25
RANDOMIZED_MIN_SIZE = 1024
_OVERSAMPLE = 10
_POWER_ITERATIONS = 4
# A randomized SVD is accepted when a better-converged run captures at most this fraction of ‖Δ‖² more.
_CONVERGENCE = 1e-3


@dataclass(frozen=True)
class Factorization:
    """``delta ≈ u · diag(s) · vᵀ`` with orthonormal columns and descending ``s``."""

    u: torch.Tensor  # (out, rank)
    s: torch.Tensor  # (rank,)
    v: torch.Tensor  # (in, rank)
    energy: float  # Σσ² kept / ‖Δ‖²
    method: str  # "full" or "randomized"

    @property
    def rank(self) -> int:
        return self.s.shape[0]


def factorize(
    delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None, seed: int = 0
) -> Factorization:
    """Truncated SVD of a 2-D `delta` at `rank`, or at the smallest rank whose Σσ² reaches `energy` · ‖Δ‖².

    Exactly one of `rank` / `energy` must be given. The rank is capped at ``min(delta.shape)``.
    """
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank or energy")
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D delta, got shape {tuple(delta.shape)}")
    delta = delta.float()
    full_rank = min(delta.shape)
    randomized_limit = RANDOMIZED_BELOW * full_rank if full_rank >= RANDOMIZED_MIN_SIZE else 0
    total = float(delta.double().pow(2).sum())
    if total == 0.0:
        zero = delta.new_zeros
        return Factorization(zero(delta.shape[0], 0), zero(0), zero(delta.shape[1], 0), 1.0, "full")
    if rank is not None:
        rank = max(1, min(rank, full_rank))
        if rank <= randomized_limit:
            found = _randomized(delta, rank, total, seed)
            if found is not None:
                return _truncate(*found, rank, total, "randomized")
        return _truncate(*torch.linalg.svd(delta, full_matrices=False), rank, total, "full")

    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    probe = 32
    while probe <= randomized_limit:
        found = _randomized(delta, probe, total, seed)
        if found is None:
            break
        kept = _rank_for_energy(found[1], total, energy)
        if kept is not None and kept < probe:  # the probe saw past the needed rank, so the rank is settled
            return _truncate(*found, kept, total, "randomized")
        probe *= 2
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _truncate(u, s, vh, _rank_for_energy(s, total, energy) or full_rank, total, "full")


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D delta, descending (for budget planning)."""
    return torch.linalg.svdvals(delta.float())


def _randomized(
    delta: torch.Tensor, rank: int, total: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Rank-`rank` randomized SVD as (u, s, vh), or None if it has not converged."""
    q = min(rank + _OVERSAMPLE, min(delta.shape))
    runs = []
    for offset, power_iterations in enumerate((_POWER_ITERATIONS, 2 * _POWER_ITERATIONS)):
        torch.manual_seed(seed + offset)  # svd_lowrank draws from the global generator
        u, s, v = torch.svd_lowrank(delta, q=q, niter=power_iterations)
        runs.append((float(s[:rank].double().pow(2).sum()), u[:, :rank], s[:rank], v[:, :rank].T))
    (first_energy, *_), (second_energy, u, s, vh) = runs
    if second_energy - first_energy > _CONVERGENCE * total:
        return None
    return u, s, vh


def _rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest k with Σ_{i<k} σᵢ² ≥ energy · total, or None if `s` does not get there."""
    cumulative = torch.cumsum(s.double().pow(2), dim=0)
    reached = torch.nonzero(cumulative >= energy * total * (1 - 1e-9))
    return int(reached[0]) + 1 if reached.numel() else None


def _truncate(u, s, vh, rank: int, total: float, method: str) -> Factorization:
    u, s, v = u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].T.contiguous()
    return Factorization(u, s, v, float(s.double().pow(2).sum()) / total, method)
