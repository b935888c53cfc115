"""Lossless packing of small unsigned integer codes into a uint8 bitstream.

Codes are packed little-endian within each byte, in row-major order of the input. Widths that divide 8 (1, 2, 4, 8)
take a shift-and-sum fast path; other widths (3, 5, 6, 7) go through bit planes.
"""

from __future__ import annotations

import torch

SUPPORTED_CODE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack `numel` codes of `bits` bits each."""
    return (numel * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` into a 1-D uint8 tensor of ``packed_nbytes(numel, bits)`` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to be packed at {bits} bits")
    flat = flat.to(torch.int32)
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        flat = _pad_to_multiple(flat, per_byte)
        shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * bits
        return (flat.view(-1, per_byte) << shifts).sum(dim=1).to(torch.uint8)
    planes = (flat.unsqueeze(1) >> torch.arange(bits, dtype=torch.int32, device=flat.device)) & 1
    stream = _pad_to_multiple(planes.reshape(-1), 8)
    weights = torch.arange(8, dtype=torch.int32, device=flat.device)
    return (stream.view(-1, 8) << weights).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: return the first `numel` codes as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} with shape {tuple(packed.shape)}"
        )
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold exactly {numel} codes of {bits} bits "
            f"(expected {packed_nbytes(numel, bits)} bytes)"
        )
    data = packed.to(torch.int32)
    if bits == 8:
        return data.to(torch.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, dtype=torch.int32, device=data.device) * bits
        codes = (data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:numel].to(torch.uint8)
    stream = ((data.unsqueeze(1) >> torch.arange(8, dtype=torch.int32, device=data.device)) & 1).reshape(-1)
    planes = stream[: numel * bits].view(numel, bits)
    weights = torch.arange(bits, dtype=torch.int32, device=data.device)
    return (planes << weights).sum(dim=1).to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_CODE_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_CODE_BITS}, got {bits!r}")


def _pad_to_multiple(flat: torch.Tensor, multiple: int) -> torch.Tensor:
    remainder = flat.numel() % multiple
    if remainder == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(multiple - remainder)])
