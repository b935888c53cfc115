"""The bytes a module costs in a pack file, by form: what the budget planner counts (see pack/codec.py's layout).

Tensor data is exact; safetensors header entries are bounded from above, so a plan never overshoots its budget
because of headers.
"""

from __future__ import annotations

import math

from ..compress import packed_nbytes
from .layout import PEFT_PREFIX

# Upper bound on a safetensors header entry beyond the key itself: JSON punctuation, dtype, a shape of up to two
# 6-digit sizes and two 10-digit offsets, plus the header's padding to 8 bytes.
HEADER_BYTES_PER_TENSOR = 84
# A kept entry of a sparse delta: an int32 flat index and an fp16 value.
SPARSE_ENTRY_BYTES = 6


def header_bytes(name: str, tensor_suffixes: int, suffix_length: int = 20) -> int:
    """Conservative safetensors header bytes for `tensor_suffixes` tensors under module `name`."""
    return tensor_suffixes * (len(PEFT_PREFIX) + len(name) + suffix_length + HEADER_BYTES_PER_TENSOR)


def direction_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> float:
    """Bytes of one singular direction (u and v) at `bits`, including its group scales, zeros and its σ."""
    groups = math.ceil(out_features / group_size) + math.ceil(in_features / group_size)
    if bits == 16:
        return 2 * (out_features + in_features) + 4
    return (out_features + in_features) * bits / 8 + groups * (2 + bits / 8) + 4


def lowrank_overhead_bytes(name: str, bands: int) -> int:
    """Headers and band metadata of a low-rank module with `bands` precision bands (and its graft_S)."""
    return header_bytes(name, 1) + bands * band_overhead_bytes(name)


def band_overhead_bytes(name: str) -> int:
    """Headers of one band's eight tensors (codes, scales, zeros, qmeta of U and V) and its two int32 headers."""
    return header_bytes(name, 8) + 32


def quantized_dense_bytes(name: str, rows: int, cols: int, bits: int, group_size: int) -> int:
    """A dense delta group-quantized at `bits` (codes, fp16 scales and packed zeros per row and group, qmeta)."""
    groups = rows * math.ceil(cols / group_size)
    return packed_nbytes(rows * cols, bits) + 2 * groups + packed_nbytes(groups, bits) + 16 + header_bytes(name, 4)


def dense_bytes(name: str, numel: int) -> int:
    """An fp16 dense delta of `numel` entries."""
    return 2 * numel + header_bytes(name, 1)
