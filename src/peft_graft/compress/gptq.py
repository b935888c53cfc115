"""GPTQ (Frantar et al., 2023): quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs, so ``‖(W − Ŵ)·X‖`` stays small.

``W`` is (rows, cols) acting on inputs of dimension cols, ``H = XᵀX`` is (cols, cols). Two grid layouts:

* ``grid="row"`` (standard GPTQ): every row has one fp16 scale and zero point per group of `group_size` columns.
  Used for Vᵀ, whose rows are singular directions.
* ``grid="column"``: every column has one scale and zero point per group of `group_size` rows. Used for U, whose
  columns are singular directions, so each direction's vector is quantized on its own grid (the SkillPack layout).

Bits may differ per row (row grid) or per column (column grid): precision bands. Rows / columns at 16 bits are kept
as they are (they are stored as fp16) and take no part in the rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .quantize import fit_grid, num_groups, quantize_to_grid

# Hessians up to this width are inverted in float64, wider ones in float32 (see _inverse_cholesky_upper).
FLOAT64_INVERSION_COLUMNS = 8192
# Entries per block of rows in output_error.
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class GPTQResult:
    """Codes and grids of a GPTQ-quantized weight, in the original column order.

    For ``grid="row"`` scales/zeros are (rows, groups over cols); for ``grid="column"`` they are (groups over rows,
    cols). ``dequantized`` is the weight the codes decode to.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    dequantized: torch.Tensor


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int | Sequence[int],
    group_size: int,
    *,
    grid: Literal["row", "column"] = "row",
    act_order: bool = False,
    damp: float = 0.01,
) -> GPTQResult:
    """Quantize `weight` (rows, cols) with GPTQ on `hessian` (cols, cols).

    `bits` is one width, or one per row (row grid) / per column (column grid). `damp` adds ``damp · mean(diag H)`` to
    the diagonal. With `act_order`, columns are processed by decreasing ``diag(H)``; row grids are then fitted on the
    original weight per group ("static groups") so that groups stay contiguous in the stored layout.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"hessian must be ({cols}, {cols}) for a weight with {cols} columns, got {tuple(hessian.shape)}"
        )
    if grid not in ("row", "column"):
        raise ValueError(f"grid must be 'row' or 'column', got {grid!r}")
    per = rows if grid == "row" else cols
    device = weight.device
    bits_tensor = torch.as_tensor(
        bits if not isinstance(bits, int) else [bits] * per, dtype=torch.float32, device=device
    )
    if bits_tensor.shape != (per,):
        raise ValueError(f"bits must be an int or have one entry per {'row' if grid == 'row' else 'column'} ({per})")
    exact = bits_tensor >= 16
    bits_tensor = bits_tensor.clamp(max=8)  # 16-bit entries get a dummy grid; their values pass through unrounded
    exact_rows = exact if grid == "row" else None
    w = weight.detach().float().clone()
    diagonal = torch.diagonal(hessian).to(device, torch.float32)
    dead = diagonal == 0
    diagonal = diagonal.masked_fill(dead, 1.0)
    w[:, dead] = 0.0
    order = torch.argsort(diagonal, descending=True) if act_order else torch.arange(cols, device=device)
    inverse_order = torch.argsort(order)
    w = w[:, order]
    hinv = _inverse_cholesky_upper(hessian, order, dead, damp)

    codes = torch.zeros(rows, cols, device=device)
    if grid == "row":
        groups = num_groups(cols, group_size)
        scales, zeros = torch.zeros(rows, groups, device=device), torch.zeros(rows, groups, device=device)
        if act_order:  # static groups, fitted on the weight before any error feedback, in natural column order
            natural = w[:, inverse_order]
            for group in range(groups):
                block = natural[:, group * group_size : (group + 1) * group_size]
                scales[:, group], zeros[:, group] = fit_grid(block, bits_tensor)
    else:
        row_groups = num_groups(rows, group_size)
        scales = torch.zeros(row_groups, cols, device=device)
        zeros = torch.zeros(row_groups, cols, device=device)

    block_size = group_size * max(1, math.ceil(128 / group_size))  # blocks start on group starts
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        w_block = w[:, start:stop].clone()
        errors = torch.zeros_like(w_block)
        hinv_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = int(order[start + i])
            values = w_block[:, i]
            if grid == "row":
                group = column // group_size
                if not act_order and column % group_size == 0:
                    scales[:, group], zeros[:, group] = fit_grid(w[:, start + i : start + i + group_size], bits_tensor)
                scale, zero, column_bits = scales[:, group], zeros[:, group], bits_tensor
            else:
                padded = _pad_rows(values, group_size)
                scale, zero = fit_grid(padded.view(-1, group_size), bits_tensor[column])
                scales[:, column], zeros[:, column] = scale, zero
                scale = scale.repeat_interleave(group_size)[:rows]
                zero = zero.repeat_interleave(group_size)[:rows]
                column_bits = bits_tensor[column]
            q = quantize_to_grid(values, scale, zero, column_bits)
            codes[:, start + i] = q
            dequantized = torch.where(exact_rows if grid == "row" else exact[column], values, (q - zero) * scale)
            error = (values - dequantized) / hinv_block[i, i]
            w_block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            w_block[:, i] = dequantized
            errors[:, i] = error
        w[:, start:stop] = w_block
        w[:, stop:] -= errors @ hinv[start:stop, stop:]

    codes = codes[:, inverse_order]
    return GPTQResult(
        codes=codes.to(torch.uint8),
        scales=scales.to(torch.float16),
        zeros=zeros.to(torch.uint8),
        dequantized=w[:, inverse_order],
    )


def output_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative output-space error ``‖(W − Ŵ)X‖ / ‖WX‖`` computed from ``H = XᵀX``, in blocks of rows (float32
    products, float64 sums), so nothing of the Hessian's or the weight's size is copied."""
    numerator = denominator = 0.0
    step = max(1, _BLOCK_ENTRIES // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].float()
        difference = rows - approximation[start : start + step].float()
        numerator += float(((difference @ hessian) * difference).sum(dtype=torch.float64))
        denominator += float(((rows @ hessian) * rows).sum(dtype=torch.float64))
    return math.sqrt(max(numerator, 0.0) / max(denominator, 1e-300))


def _inverse_cholesky_upper(
    hessian: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float
) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (float32), for H permuted by `order`, its dead columns set to 1 on the diagonal and
    damped by `damp` × its mean diagonal; more damping is added if H is not positive definite.

    Inverted in float64 up to ``FLOAT64_INVERSION_COLUMNS`` columns; beyond, in float32, as GPTQ's reference
    implementation does throughout: the damping keeps H well conditioned, and float64 would hold two 1.6 GB copies of
    a 14336-wide Hessian (an 8B model's down_proj) on top of everything else a calibrated layer holds. The caller's
    Hessian is copied once (permuted), and factored, inverted and factored again in that copy.
    """
    dtype = torch.float64 if hessian.shape[0] <= FLOAT64_INVERSION_COLUMNS else torch.float32
    extra, bump = 0.0, None
    info = torch.empty((), dtype=torch.int32, device=order.device)
    for _ in range(8):
        h = hessian.detach().to(order.device, torch.float32)[order[:, None], order]
        h.diagonal()[dead[order]] = 1.0
        h.diagonal().add_(damp * torch.mean(torch.diag(h)))
        if bump is None:
            bump = 1e-6 * float(torch.mean(torch.diag(h)).clamp(min=1e-12))
        h = h.to(dtype)
        h.diagonal().add_(extra)
        # In place, on the transposed view: LAPACK works on column-major matrices, and h is symmetric, so its .mT is
        # the same matrix already in that layout; torch copies whatever is not (a second n×n buffer).
        column_major = h.mT
        torch.linalg.cholesky_ex(column_major, out=(column_major, info))
        if int(info) == 0:
            torch.cholesky_inverse(column_major, out=column_major)
            torch.linalg.cholesky(column_major, upper=True, out=column_major)
            return column_major.float()
        del h
        extra += bump
        bump *= 10
    raise ValueError("the Hessian is not positive definite even after extra damping")


def _pad_rows(values: torch.Tensor, group_size: int) -> torch.Tensor:
    # Repeating the last entry leaves every group's min and max unchanged.
    missing = (-values.shape[0]) % group_size
    return values if missing == 0 else torch.cat([values, values[-1:].expand(missing)])
