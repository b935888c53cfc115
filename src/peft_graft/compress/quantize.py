"""Group-wise asymmetric integer quantization of 2-D matrices.

Each row is cut into groups of ``group_size`` consecutive columns (the last group may be shorter). A group gets an
fp16 scale and an integer zero point; a value ``x`` is stored as ``q = clamp(round(x / scale) + zero, 0, 2**bits - 1)``
and read back as ``(q - zero) * scale``. The grid always contains 0, as in GPTQ, so zero rows stay exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GroupQuantized:
    """A matrix quantized group-wise: codes plus one fp16 scale and one integer zero point per (row, group)."""

    codes: torch.Tensor  # uint8, (rows, cols)
    scales: torch.Tensor  # float16, (rows, n_groups)
    zeros: torch.Tensor  # uint8, (rows, n_groups)
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1])


def num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def fit_grid(values: torch.Tensor, bits: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max grid over the last dim of `values`: returns (scale, zero) with the last dim reduced.

    `bits` is an int or a tensor broadcastable to ``values.shape[:-1]``. The scale is rounded *up* to fp16 (returned
    as float32 holding fp16 values): encoding then uses exactly the scale that decoding reads back, and the grid still
    spans the group, so every value is within scale / 2 of the grid.
    """
    qmax = _qmax(bits, values.device)
    values = values.float()
    low = values.amin(dim=-1).clamp(max=0.0)
    high = values.amax(dim=-1).clamp(min=0.0)
    scale = (high - low) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale_fp16 = scale.to(torch.float16)
    scale_fp16 = torch.where(
        scale_fp16.float() < scale, torch.nextafter(scale_fp16, torch.full_like(scale_fp16, float("inf"))), scale_fp16
    )
    if not bool(torch.isfinite(scale_fp16).all()):
        raise ValueError(
            f"a quantization group spans {float((high - low).max()):.3g}, too wide for fp16 scales; "
            "rescale the matrix before quantizing it"
        )
    scale = scale_fp16.float()
    zero = torch.minimum(torch.round(-low / scale).clamp(min=0), qmax)
    return scale, zero


def quantize_to_grid(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor
) -> torch.Tensor:
    """Codes of `values` on a given grid; `scale`, `zero` and `bits` broadcast against `values`."""
    return torch.minimum((torch.round(values.float() / scale) + zero).clamp(min=0), _qmax(bits, values.device))


def _qmax(bits: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    bits = torch.as_tensor(bits, device=device)
    return (torch.ones_like(bits, dtype=torch.float32) * 2.0**bits) - 1.0


def quantize_groupwise(matrix: torch.Tensor, bits: int, group_size: int) -> GroupQuantized:
    """Round-to-nearest group-wise quantization of a 2-D matrix (the data-free mode)."""
    _check_args(matrix, bits, group_size)
    rows, cols = matrix.shape
    groups = num_groups(cols, group_size)
    padded = _pad_columns(matrix.float(), groups * group_size).view(rows, groups, group_size)
    scale, zero = fit_grid(padded, bits)
    codes = quantize_to_grid(padded, scale.unsqueeze(-1), zero.unsqueeze(-1), bits)
    return GroupQuantized(
        codes=codes.view(rows, groups * group_size)[:, :cols].to(torch.uint8).contiguous(),
        scales=scale.to(torch.float16),
        zeros=zero.to(torch.uint8),
        bits=bits,
        group_size=group_size,
    )


def round_trip(matrix: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """What :func:`quantize_groupwise` then :func:`dequantize_groupwise` give, in one pass and without codes (for
    measuring rounding errors). The matrix is trusted: it comes from the caller's own computation."""
    rows, cols = matrix.shape
    groups = num_groups(cols, group_size)
    padded = _pad_columns(matrix.float(), groups * group_size).view(rows, groups, group_size)
    scale, zero = fit_grid(padded, bits)
    scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    restored = (quantize_to_grid(padded, scale, zero, bits) - zero) * scale
    return restored.view(rows, groups * group_size)[:, :cols]


def dequantize_groupwise(quantized: GroupQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Read a :class:`GroupQuantized` matrix back as floats."""
    cols = quantized.shape[1]
    # each column's group, so nothing is sized by group_size (which may exceed the row: one group per row)
    group = torch.arange(cols, device=quantized.codes.device) // quantized.group_size
    scale = quantized.scales.float()[:, group]
    zero = quantized.zeros.float()[:, group]
    return ((quantized.codes.float() - zero) * scale).to(dtype)


def _check_args(matrix: torch.Tensor, bits: int, group_size: int) -> None:
    if matrix.dim() != 2 or matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"expected a non-empty 2-D matrix, got shape {tuple(matrix.shape)}")
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS} for integer quantization, got {bits!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("cannot quantize a matrix that holds NaN or Inf")


def _pad_columns(matrix: torch.Tensor, width: int) -> torch.Tensor:
    # Repeating the last column leaves every group's min and max unchanged.
    missing = width - matrix.shape[1]
    if missing == 0:
        return matrix
    return torch.cat([matrix, matrix[:, -1:].expand(-1, missing)], dim=1)
