"""Quantize low-rank factors band by band: round-to-nearest, or GPTQ on calibration inputs.

Factors are first put in canonical form (an exact thin SVD, directions by decreasing singular value) and scaled so
each stored singular vector has unit RMS (norm √length) while the singular values absorb the scale; that keeps
group scales far from fp16 underflow. Bands are consecutive slices of directions, most important first, each at its
own bit width (16 = kept as floats).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .gptq import gptq_quantize
from .lowrank import BandSlice, PrecisionBand, band_slices, canonical_factors
from .quantize import GroupQuantized, quantize_groupwise


@dataclass(frozen=True)
class QuantizedBand:
    """One band of directions: the rows of Uᵀ and of Vᵀ it covers, quantized (or float rows for a 16-bit band)."""

    band: BandSlice
    u_rows: GroupQuantized | torch.Tensor
    v_rows: GroupQuantized | torch.Tensor


@dataclass(frozen=True)
class QuantizedFactors:
    """Scaled singular values and the bands of quantized singular vectors (``delta = U·diag(s)·Vᵀ``)."""

    s: torch.Tensor
    bands: list[QuantizedBand]


def unit_rms_factors(
    u: torch.Tensor, s: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical float32 factors with unit-RMS singular vectors; the product ``u·diag(s)·vᵀ`` is unchanged."""
    u, s, v = canonical_factors(u.detach().float(), s.detach().float(), v.detach().float())
    out_features, in_features = u.shape[0], v.shape[0]
    return u * math.sqrt(out_features), s / math.sqrt(out_features * in_features), v * math.sqrt(in_features)


def quantize_factors(
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    bands: Sequence[PrecisionBand] | Sequence[BandSlice],
    group_size: int,
    *,
    hessian: torch.Tensor | None = None,
    act_order: bool = True,
    damp: float = 0.01,
) -> QuantizedFactors:
    """Quantize factors ``u`` (out, r), ``s`` (r,), ``v`` (in, r) per band.

    `bands` are config bands (``(n_directions, bits)``) or explicit :class:`BandSlice` s. Without a `hessian` the
    singular vectors are rounded to nearest (data-free). With ``hessian = XᵀX`` of the module's inputs, Vᵀ is
    quantized by GPTQ on it, then U by GPTQ on the Hessian of its inputs ``z = Σ·V̂ᵀ·x``, i.e. ``Z·H·Zᵀ``.
    """
    u, s, v = unit_rms_factors(u, s, v)
    slices = list(bands) if bands and isinstance(bands[0], BandSlice) else band_slices(s.shape[0], bands)
    if hessian is None:
        quantized = []
        for band in slices:
            u_rows, v_rows = (matrix[:, band.start : band.stop].T for matrix in (u, v))
            if band.bits != 16:
                u_rows, v_rows = (quantize_groupwise(rows, band.bits, group_size) for rows in (u_rows, v_rows))
            quantized.append(QuantizedBand(band, u_rows, v_rows))
        return QuantizedFactors(s.contiguous(), quantized)

    bits = [band.bits for band in slices for _ in range(band.stop - band.start)]
    hessian = hessian.float()
    v_result = gptq_quantize(v.T, hessian, bits, group_size, grid="row", act_order=act_order, damp=damp)
    z = s[:, None] * v_result.dequantized  # (r, in): U's inputs are Σ·V̂ᵀ·x
    u_result = gptq_quantize(u, z @ hessian @ z.T, bits, group_size, grid="column", act_order=act_order, damp=damp)
    quantized = []
    for band in slices:
        pick = slice(band.start, band.stop)
        if band.bits == 16:
            quantized.append(QuantizedBand(band, u_result.dequantized[:, pick].T, v_result.dequantized[pick]))
            continue
        v_rows = GroupQuantized(
            v_result.codes[pick], v_result.scales[pick], v_result.zeros[pick], band.bits, group_size
        )
        u_rows = GroupQuantized(
            u_result.codes[:, pick].T.contiguous(),
            u_result.scales[:, pick].T.contiguous(),
            u_result.zeros[:, pick].T.contiguous(),
            band.bits,
            group_size,
        )
        quantized.append(QuantizedBand(band, u_rows, v_rows))
    return QuantizedFactors(s.contiguous(), quantized)
