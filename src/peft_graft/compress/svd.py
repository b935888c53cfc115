"""Truncated SVD of a weight delta, at a fixed rank or at the smallest rank holding a fraction of the energy.

The exact path diagonalizes the Gram matrix of the short side in float64 (``eigh`` of ΔΔᵀ or ΔᵀΔ), which is 2-3x
faster than ``torch.linalg.svd`` on CPU for these shapes and, in float64, keeps Σσ² to ~1e-7 of ‖Δ‖²; singular
directions with σ below 1e-6·σ_max (numerically unresolvable this way) are returned as zero. The Gram matrix and the
long side's vectors are computed in blocks of the long side, so the delta is never copied whole to float64, and the
long side only for the directions kept. A :class:`Spectrum` (singular values and the short side's vectors) can
be computed once and reused, as budget planning does: then no second eigendecomposition runs. Everything runs on
the delta's device; the float64 math stays float64 there.
A spectrum can also be partial: only its `top` leading directions, from a randomized range finder (two float32
power iterations on a fixed Gaussian sketch drawn on the CPU, so every device starts from the same one; then the
exact SVD of the sketched matrix in float64). That costs O(m·n·top) instead of O(m·n·min(m, n)), 10-25x less at
Llama-8B shapes (and about the same below a 512 short side, where the exact one is kept). Measured on the synthetic
360M deltas (top 96): the leading half of the values agree with the exact ones to ~1e-4, the last ones, in the flat
noise, to ~8 % (4 iterations: 4 %, at 1.7x the time); a plan only compares them, and the error of what it chose is
measured on the delta itself. Budget planning asks for more where its plan reaches the end of a partial spectrum.
A randomized SVD (the range finder below) is cheaper still when the rank is far below ``min(shape)``. Its result is
checked before it is used: a second run with twice the power iterations must not capture noticeably more energy
(else it had not converged to the top singular subspace), otherwise the full SVD is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Use the randomized SVD when the wanted rank is at most this fraction of min(shape) and the matrix is big enough
# for it to pay off (measured on 2 CPU cores: a full SVD of 576x1536 takes 0.07 s, of 2048x2048 1.2 s vs 0.2 s).
RANDOMIZED_BELOW = 0.25
RANDOMIZED_MIN_SIZE = 1024
_POWER_ITERATIONS = 4
# Power iterations of a partial spectrum (planning), which only needs its values to rank directions against each other
_PLANNING_ITERATIONS = 2
# A randomized SVD is accepted when a better-converged run captures at most this fraction of ‖Δ‖² more.
_CONVERGENCE = 1e-3
# Columns (or rows) of the long side converted to float64 at a time.
_BLOCK = 2048
# Partial spectra are computed where the short side is at least this long: below, the exact one costs about the same
# (measured on 2 CPU cores, top 96: 960x960 53 ms partial vs 172 ms exact, 2560x960 90 vs 188 ms, 320x960 35 vs 15 ms;
# at 4096 and 14336x4096, top 64: 0.4-2.5 s vs 35-60 s).
PARTIAL_MIN_SIDE = 512
# A partial spectrum of `top` directions sketches top + max(10, top/4) of them, with _PLANNING_ITERATIONS power
# iterations; it is computed exactly instead when the sketch would cover more than half the short side.


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


@dataclass(frozen=True)
class Spectrum:
    """The leading singular values of a 2-D delta (descending, float64; unresolved ones are 0) and its short side's
    singular vectors as columns, in the same order: left ones when the delta is wide (out ≤ in), right ones
    otherwise. All of them, or (partial) only the first few."""

    values: torch.Tensor
    vectors: torch.Tensor

    @property
    def rank(self) -> int:
        return int((self.values > 0).sum())

    @property
    def complete(self) -> bool:
        """Whether every direction is here (else the spectrum is partial: its leading ``values.numel()`` only)."""
        return self.values.numel() == self.vectors.shape[0]


def spectrum(delta: torch.Tensor, top: int | None = None, seed: int = 0) -> Spectrum:
    """The spectrum of a 2-D delta: all of it, from its short side's Gram matrix in float64, or (with `top`) only its
    `top` leading directions, from a randomized range finder when that is well below the short side."""
    short_side = min(delta.shape)
    if top is not None and short_side >= PARTIAL_MIN_SIDE and 2 * _sketch_width(top, short_side) <= short_side:
        return _partial_spectrum(delta, top, seed, _PLANNING_ITERATIONS)
    eigenvalues, vectors = torch.linalg.eigh(_gram(delta))
    return _resolved(eigenvalues.flip(0), vectors.flip(1))


def gram_spectrum(gram: torch.Tensor) -> Spectrum:
    """The complete spectrum of a delta from its short side's Gram matrix (e.g. ΔᵀΔ summed over row blocks of a
    tall delta, which is how an embedding's is found without holding it whole)."""
    eigenvalues, vectors = torch.linalg.eigh(gram.double())
    return _resolved(eigenvalues.flip(0), vectors.flip(1))


def project_rows(rows: torch.Tensor, known: Spectrum, rank: int) -> torch.Tensor:
    """The long side's singular vectors for some rows of a tall delta: ``rows · v / σ`` for the first `rank`
    directions of its `known` spectrum (the short side's vectors are its right ones); unresolved directions are 0."""
    s = known.values[:rank].to(rows.device, torch.float64)
    resolved = s > 0
    long = rows.double() @ known.vectors[:, :rank].to(rows.device, torch.float64)
    return torch.where(resolved, long / torch.where(resolved, s, torch.ones_like(s)), torch.zeros_like(long)).float()


def _sketch_width(top: int, short_side: int) -> int:
    return min(short_side, top + max(10, top // 4))


def _partial_spectrum(delta: torch.Tensor, top: int, seed: int, iterations: int) -> Spectrum:
    """The `top` leading directions by subspace iteration from a Gaussian sketch of the long side. The sketch comes
    from its own generator, never the global one, so concurrent extractions on several devices stay deterministic."""
    a = (delta if delta.shape[0] <= delta.shape[1] else delta.T).float()  # short side first
    width = _sketch_width(top, a.shape[0])
    generator = torch.Generator().manual_seed(seed)
    sketch = torch.randn(a.shape[1], width, generator=generator).to(a.device)
    basis = torch.linalg.qr(a @ sketch).Q
    for step in range(iterations):  # re-orthonormalized each way, so float32 keeps the small directions
        basis = _orthonormal(a @ _orthonormal(a.T @ basis, exact=False), exact=step == iterations - 1)
    projected = (basis.T @ a).double()  # width x long: the delta within the found subspace
    eigenvalues, vectors = torch.linalg.eigh(projected @ projected.T)
    vectors = basis.double() @ vectors.flip(1)[:, :top]
    return _resolved(eigenvalues.flip(0)[:top], vectors)


def _orthonormal(y: torch.Tensor, exact: bool) -> torch.Tensor:
    """An orthonormal basis of `y`'s columns: by Cholesky QR (2-5x faster than Householder on tall thin blocks)
    between power iterations, where only the span matters, and by Householder QR for the final basis, or wherever the
    Gram matrix is too ill-conditioned to factor. Float32 is enough there: each half-step's columns span about
    σ₁/σ_width, whose square stays far from float32's limit, and the final Householder step restores orthogonality."""
    if not exact:
        factor, info = torch.linalg.cholesky_ex(y.T @ y)
        if int(info) == 0:
            return torch.linalg.solve_triangular(factor.T, y, upper=True, left=False)
    return torch.linalg.qr(y).Q


def _resolved(eigenvalues: torch.Tensor, vectors: torch.Tensor) -> Spectrum:
    """Singular values from the Gram eigenvalues, those below 1e-6·σ_max (numerically unresolvable) as zero."""
    s = eigenvalues.clamp(min=0).sqrt()
    resolved = s > 1e-6 * s[0] if s.numel() and s[0] > 0 else torch.zeros_like(s, dtype=torch.bool)
    return Spectrum(torch.where(resolved, s, torch.zeros_like(s)), vectors)


def factorize(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    seed: int = 0,
    known: Spectrum | None = None,
) -> Factorization:
    """Truncated SVD of a 2-D `delta` at `rank`, or at the smallest rank whose Σσ² reaches `energy` · ‖Δ‖².

    Exactly one of `rank` / `energy` must be given. The rank is capped at ``min(delta.shape)``. With the delta's
    `known` spectrum (computed earlier, e.g. while planning), only the long side's vectors are computed, unless a
    partial spectrum falls short of the rank wanted.
    """
    if (rank is None) == (energy is None):
        raise ValueError("pass exactly one of rank or energy")
    if delta.dim() != 2:
        raise ValueError(f"expected a 2-D delta, got shape {tuple(delta.shape)}")
    delta = delta.float()
    full_rank = min(delta.shape)
    randomized_limit = RANDOMIZED_BELOW * full_rank if full_rank >= RANDOMIZED_MIN_SIZE else 0
    total = squared_norm(delta)
    if total == 0.0:
        zero = delta.new_zeros
        return Factorization(zero(delta.shape[0], 0), zero(0), zero(delta.shape[1], 0), 1.0, "full")
    if known is not None:
        if rank is not None:
            wanted = max(1, min(rank, full_rank))
        else:
            wanted = _rank_for_energy(known.values, total, energy) or (full_rank if known.complete else None)
        if wanted is not None and wanted <= known.values.numel():
            return _from_spectrum(delta, known, wanted, total)
    if rank is not None:
        rank = max(1, min(rank, full_rank))
        if rank <= randomized_limit:
            found = _randomized(delta, rank, total, seed)
            if found is not None:
                return _from_spectrum(delta, found, rank, total, "randomized")
        return _from_spectrum(delta, spectrum(delta), rank, total)

    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    probe = 32
    while probe <= randomized_limit:
        found = _randomized(delta, probe, total, seed)
        if found is None:
            break
        kept = _rank_for_energy(found.values, total, energy)
        if kept is not None and kept < probe:  # the probe saw past the needed rank, so the rank is settled
            return _from_spectrum(delta, found, kept, total, "randomized")
        probe *= 2
    known = spectrum(delta)
    return _from_spectrum(delta, known, _rank_for_energy(known.values, total, energy) or full_rank, total)


def squared_norm(x: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """``‖x − minus‖²`` (or ``‖x‖²``) in float64, summed over blocks of rows, so no float64 copy of a large matrix
    is ever made whole."""
    rows = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)
    other = None if minus is None else minus.reshape(rows.shape)
    step = max(1, (_BLOCK * _BLOCK) // max(1, rows.shape[1]))
    total = 0.0
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].double()
        if other is not None:
            block -= other[start : start + step].double()
        total += float(block.pow(2).sum())
    return total


def _gram(delta: torch.Tensor) -> torch.Tensor:
    """The short side's Gram matrix (ΔΔᵀ if wide, else ΔᵀΔ) in float64, accumulated over blocks of the long side."""
    wide = delta.shape[0] <= delta.shape[1]
    short = min(delta.shape)
    gram = torch.zeros(short, short, dtype=torch.float64, device=delta.device)
    for start in range(0, max(delta.shape), _BLOCK):
        block = (delta[:, start : start + _BLOCK] if wide else delta[start : start + _BLOCK].T).double()
        gram += block @ block.T
    return gram


def _from_spectrum(
    delta: torch.Tensor, known: Spectrum, rank: int, total: float, method: str = "full"
) -> Factorization:
    """The top-`rank` factorization: the short side from the spectrum, the long side as Δᵀu/σ (or Δv/σ)."""
    wide = delta.shape[0] <= delta.shape[1]
    s = known.values[:rank].to(delta.device, torch.float64)
    short = known.vectors[:, :rank].to(delta.device, torch.float64)
    resolved = s > 0
    long = torch.empty(max(delta.shape), rank, dtype=torch.float64, device=delta.device)
    for start in range(0, max(delta.shape), _BLOCK):
        block = (delta[:, start : start + _BLOCK].T if wide else delta[start : start + _BLOCK]).double()
        long[start : start + _BLOCK] = block @ short
    long = torch.where(resolved, long / torch.where(resolved, s, torch.ones_like(s)), torch.zeros_like(long))
    short = torch.where(resolved, short, torch.zeros_like(short))
    u, v = (short, long) if wide else (long, short)
    return _truncate(u.float(), s.float(), v.T.float(), rank, total, method)


def _randomized(delta: torch.Tensor, rank: int, total: float, seed: int) -> Spectrum | None:
    """The leading `rank` directions by the range finder, or None if it has not converged."""
    runs = [
        _partial_spectrum(delta, rank, seed + offset, iterations)
        for offset, iterations in enumerate((_POWER_ITERATIONS, 2 * _POWER_ITERATIONS))
    ]
    first_energy, second_energy = (float(run.values.pow(2).sum()) for run in runs)
    if second_energy - first_energy > _CONVERGENCE * total:
        return None
    return runs[1]


def _rank_for_energy(s: torch.Tensor, total: float, energy: float) -> int | None:
    """Smallest k with Σ_{i<k} σᵢ² ≥ energy · total, or None if `s` does not get there."""
    cumulative = torch.cumsum(s.double().pow(2), dim=0)
    reached = torch.nonzero(cumulative >= energy * total * (1 - 1e-6))  # float32 singular values: ~1e-7 relative
    return int(reached[0]) + 1 if reached.numel() else None


def _truncate(u, s, vh, rank: int, total: float, method: str) -> Factorization:
    u, s, v = u[:, :rank].contiguous(), s[:rank].contiguous(), vh[:rank].T.contiguous()
    return Factorization(u, s, v, float(s.double().pow(2).sum()) / total, method)
