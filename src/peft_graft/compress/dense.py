"""A dense delta quantized group-wise as a whole: round-to-nearest, or GPTQ under the module's input Hessian.

The alternative to low-rank factors for a delta whose spectrum is flat (full-rank fine-tunes): every entry at a few
bits, each row in groups of `group_size` columns with its own fp16 scale and integer zero point.
"""

from __future__ import annotations

import torch

from .gptq import gptq_quantize
from .quantize import GroupQuantized, quantize_groupwise, round_trip

# Rows quantized (and measured) at a time, so that no float copy of a whole large matrix is made per bit width.
_BLOCK_ROWS = 1024


def quantize_dense(
    delta: torch.Tensor,
    bits: int,
    group_size: int,
    *,
    hessian: torch.Tensor | None = None,
    act_order: bool = True,
    damp: float = 0.01,
) -> GroupQuantized:
    """`delta` (out, in) quantized row-wise in groups along its inputs: GPTQ on `hessian` (in, in), else RTN."""
    if hessian is None:
        return quantize_groupwise(delta, bits, group_size)
    found = gptq_quantize(delta.float(), hessian, bits, group_size, grid="row", act_order=act_order, damp=damp)
    return GroupQuantized(
        codes=found.codes.to(torch.uint8).contiguous(),
        scales=found.scales.to(torch.float16).contiguous(),
        zeros=found.zeros.to(torch.uint8).contiguous(),
        bits=bits,
        group_size=group_size,
    )


def rounding_errors(
    delta: torch.Tensor,
    levels: tuple[int, ...],
    group_size: int,
    weight: torch.Tensor | None = None,
    row_weights: torch.Tensor | None = None,
) -> dict[int, float]:
    """Squared error of round-to-nearest at each bit width in `levels`: ``‖Δ − Q(Δ)‖²``, or with `weight` (a
    symmetric (in, in) matrix, e.g. the input Hessian ``XᵀX``) the output error ``tr(E·W·Eᵀ)``, ``E = Δ − Q(Δ)``;
    with `row_weights` (one per row), each row's squared error counts times its weight.

    Measured, not modelled: fine-tune deltas are heavy-tailed, so a Gaussian noise model misjudges them. GPTQ's
    error under the Hessian is at most about this, so planning on it is conservative.
    """
    errors = dict.fromkeys(levels, 0.0)
    weight = None if weight is None else weight.float()
    for start in range(0, delta.shape[0], _BLOCK_ROWS):
        block = delta[start : start + _BLOCK_ROWS].float()
        for bits in levels:
            error = block - round_trip(block, bits, group_size)
            squared = error.pow(2) if weight is None else (error @ weight) * error
            if row_weights is not None:
                squared = squared.sum(1).double() * row_weights[start : start + block.shape[0]].to(squared.device)
            errors[bits] += float(squared.double().sum())
    return errors
