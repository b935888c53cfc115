"""Low-rank factor algebra: canonical SVD form of U·diag(S)·Vᵀ and precision bands over singular directions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

PrecisionBand = tuple[int | None, int]


class BandSlice(NamedTuple):
    """Directions ``start:stop`` (in singular-value order) stored at ``bits`` bits."""

    start: int
    stop: int
    bits: int


def canonical_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the exact thin SVD of ``u @ diag(s) @ v.T``.

    `u` is (out, r), `s` is (r,), `v` is (in, r), with r <= min(out, in). The result has orthonormal columns and
    non-negative singular values in descending order, so precision bands can be assigned by importance. Trained
    factors are neither orthogonal nor sorted; QR on each side plus an r×r SVD fixes that in O((out + in)·r²).
    """
    if u.dim() != 2 or v.dim() != 2 or s.dim() != 1 or not (u.shape[1] == v.shape[1] == s.shape[0]):
        raise ValueError(
            f"expected u (out, r), s (r,), v (in, r); got {tuple(u.shape)}, {tuple(s.shape)}, {tuple(v.shape)}"
        )
    rank = s.shape[0]
    if rank > min(u.shape[0], v.shape[0]):
        raise ValueError(f"rank {rank} exceeds min(out, in) = {min(u.shape[0], v.shape[0])}")
    q_u, r_u = torch.linalg.qr(u.double())
    q_v, r_v = torch.linalg.qr(v.double())
    core_u, sigma, core_vh = torch.linalg.svd((r_u * s.double()) @ r_v.T)
    dtype = u.dtype if u.dtype.is_floating_point and u.dtype != torch.float64 else torch.float32
    return (q_u @ core_u).to(dtype), sigma.to(dtype), (q_v @ core_vh.T).to(dtype)


def band_slices(rank: int, bands: Sequence[PrecisionBand]) -> list[BandSlice]:
    """Cut directions ``0:rank`` into the non-empty slices of `bands`, in order.

    ``n_directions=None`` means "the rest". Raises ValueError when the bands cover fewer than `rank` directions.
    """
    slices: list[BandSlice] = []
    start = 0
    for n_directions, bits in bands:
        if start >= rank:
            break
        stop = rank if n_directions is None else min(start + n_directions, rank)
        slices.append(BandSlice(start, stop, bits))
        start = stop
    if start < rank:
        covered = sum(n for n, _ in bands if n is not None)
        raise ValueError(
            f"precision_bands cover {covered} directions but the rank is {rank}; "
            "end the bands with (None, bits) to cover the rest"
        )
    return slices
