"""The SkillPack tensor layout: how one module's delta is written as named tensors, and read back.

Keys are relative to the module. A low-rank module (``delta = U·diag(S)·Vᵀ``) is stored as::

    graft_S                  float32 (r,)                singular values (see scaling below)
    graft_U.b{i}_codes       uint8, bit-packed           band i of Uᵀ: n_i rows of length out_features
    graft_U.b{i}_scales      float16 (n_i, groups)       one scale per group of `group_size` entries
    graft_U.b{i}_zeros       uint8, bit-packed           one integer zero point per group
    graft_U.b{i}_qmeta       int32 [n_i, length, bits, group_size]
    graft_U.b{i}_fp16        float16 (n_i, length)       instead of the four above for a 16-bit band
    graft_V.b{i}_...         the same for Vᵀ (rows of length in_features)

Bands are consecutive slices of singular directions, most important first. Stored singular vectors have unit RMS
(norm √length) and ``graft_S`` absorbs the scale, which keeps fp16 group scales far from underflow.

A sparse module (embedding or lm_head) is stored as::

    graft_indices            int32 (int64 past 2**31 entries) (nnz,): sorted flat row-major indices
    graft_values             float16 (nnz,)
    graft_rows               float16 (n, cols)   rows added by the fine-tune (grown vocabulary), stored dense
    graft_rows_start         int64 [first added row]

A dense module delta (norm weights, or a Linear whose factorization would be larger) is ``graft_values`` in the
weight's logical shape, float16; sparse deltas also fall back to it when it is smaller.

A dense delta quantized group-wise (the "quantized" form, for deltas without a useful low-rank structure) is::

    graft_Q_codes            uint8, bit-packed           the (out_features, in_features) delta's codes, row-major
    graft_Q_scales           float16 (out, groups)       one scale per row and group of `group_size` columns
    graft_Q_zeros            uint8, bit-packed           one integer zero point per row and group
    graft_Q_qmeta            int32 [out, in, bits, group_size]

It decodes to a dense float delta; it has no LoRA form. A bias delta is ``graft_bias``, float16.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..compress import (
    BandSlice,
    GroupQuantized,
    dequantize_groupwise,
    pack_codes,
    scatter_dense,
    top_magnitude_positions,
    unpack_codes,
)
from ..compress.factors import QuantizedFactors, quantize_factors
from ..compress.quantize import num_groups
from ..config import STORAGE_BITS
from ..errors import PackFormatError

LOWRANK_FACTORS = ("graft_U", "graft_V")
QUANTIZED_PREFIX = "graft_Q"
_QUANTIZED_KEY = re.compile(r"^graft_Q_(codes|scales|zeros|qmeta)$")
_BAND_KEY = re.compile(r"^(graft_U|graft_V)\.b(\d+)_(codes|scales|zeros|qmeta|fp16)$")
# The one dtype each stored tensor has (graft_indices: int32, or int64 past 2**31 entries). Anything else is refused:
# reading float16 bytes as bfloat16 (same size, same header otherwise) would load different values silently.
_STORED_DTYPES = {
    "graft_S": torch.float32,
    "graft_values": torch.float16,
    "graft_rows": torch.float16,
    "graft_rows_start": torch.int64,
    "graft_bias": torch.float16,
    "codes": torch.uint8,
    "scales": torch.float16,
    "zeros": torch.uint8,
    "qmeta": torch.int32,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class PackingPolicy:
    """The parts of a GraftConfig that decide the stored bytes."""

    precision_bands: tuple[tuple[int | None, int], ...]
    group_size: int
    embed_density: float

    @classmethod
    def from_config(cls, config) -> PackingPolicy:
        return cls(tuple(tuple(band) for band in config.precision_bands), config.group_size, config.embed_density)


def encode_lowrank(
    u: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    bands: Sequence[tuple[int | None, int]] | Sequence[BandSlice],
    group_size: int,
) -> dict[str, torch.Tensor]:
    """Encode factors ``u`` (out, r), ``s`` (r,), ``v`` (in, r), rounded to nearest per band (data-free)."""
    return encode_factors(quantize_factors(u, s, v, bands, group_size))


def encode_factors(factors: QuantizedFactors) -> dict[str, torch.Tensor]:
    """Lay out quantized factors (from :func:`peft_graft.compress.factors.quantize_factors`) as pack tensors."""
    tensors = {"graft_S": factors.s.float().contiguous()}
    for index, band in enumerate(factors.bands):
        for factor, rows in (("graft_U", band.u_rows), ("graft_V", band.v_rows)):
            prefix = f"{factor}.b{index}"
            if isinstance(rows, GroupQuantized):
                tensors.update(encode_quantized_rows(prefix, rows))
            else:
                tensors[f"{prefix}_fp16"] = rows.to(torch.float16).contiguous()
    return tensors


def encode_quantized_rows(prefix: str, quantized: GroupQuantized) -> dict[str, torch.Tensor]:
    rows, length = quantized.shape
    return {
        f"{prefix}_codes": pack_codes(quantized.codes, quantized.bits),
        f"{prefix}_scales": quantized.scales.contiguous(),
        f"{prefix}_zeros": pack_codes(quantized.zeros, quantized.bits),
        f"{prefix}_qmeta": torch.tensor([rows, length, quantized.bits, quantized.group_size], dtype=torch.int32),
    }


def decode_lowrank(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode :func:`encode_lowrank` output into ``(u, s, v)`` in `dtype`."""
    if "graft_S" not in tensors:
        raise PackFormatError("missing graft_S (the singular values of a low-rank delta)")
    s = _stored("graft_S", tensors["graft_S"])
    if s.dim() != 1 or not bool(torch.isfinite(s).all()):
        raise PackFormatError(f"graft_S must be a finite 1-D float32 tensor, got shape {tuple(s.shape)}")
    bands: dict[str, dict[int, dict[str, torch.Tensor]]] = {factor: {} for factor in LOWRANK_FACTORS}
    for key, tensor in tensors.items():
        if key == "graft_S":
            continue
        match = _BAND_KEY.match(key)
        if match is None:
            raise PackFormatError(f"unexpected tensor {key!r} in a low-rank delta")
        factor, index, kind = match.group(1), int(match.group(2)), match.group(3)
        bands[factor].setdefault(index, {})[kind] = _stored(key, tensor, kind)
    factors = []
    for factor in LOWRANK_FACTORS:
        if sorted(bands[factor]) != list(range(len(bands[factor]))) or not bands[factor]:
            raise PackFormatError(f"{factor} bands must be numbered 0..k-1, found {sorted(bands[factor])}")
        blocks = [decode_rows(f"{factor}.b{i}", bands[factor][i]) for i in range(len(bands[factor]))]
        factors.append(torch.cat(blocks, dim=0).T)
    u, v = factors
    if not (u.shape[1] == v.shape[1] == s.shape[0]):
        raise PackFormatError(
            f"inconsistent ranks: graft_U has {u.shape[1]} directions, graft_V {v.shape[1]}, graft_S {s.shape[0]}"
        )
    return u.to(dtype), s.to(dtype), v.to(dtype)


def encode_quantized_dense(quantized: GroupQuantized) -> dict[str, torch.Tensor]:
    """Lay out a group-quantized dense delta (out_features, in_features) as pack tensors."""
    return encode_quantized_rows(QUANTIZED_PREFIX, quantized)


def decode_quantized_dense(tensors: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Decode :func:`encode_quantized_dense` output into a float32 matrix of the module's logical `shape`."""
    parts = {}
    for key, tensor in tensors.items():
        match = _QUANTIZED_KEY.match(key)
        if match is None:
            raise PackFormatError(f"unexpected tensor {key!r} in a quantized dense delta")
        parts[match.group(1)] = _stored(key, tensor, match.group(1))
    if set(parts) != {"codes", "scales", "zeros", "qmeta"}:
        raise PackFormatError(f"a quantized dense delta needs graft_Q_codes/scales/zeros/qmeta; got {sorted(tensors)}")
    meta = parts["qmeta"]
    if len(shape) != 2 or meta.shape != (4,) or tuple(int(x) for x in meta[:2]) != tuple(shape):
        raise PackFormatError(
            f"graft_Q_qmeta {meta.tolist()} does not describe the module's {tuple(shape)} delta; the pack must belong "
            "to this base model"
        )
    return decode_rows(QUANTIZED_PREFIX, parts)


def decode_rows(prefix: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Decode one band block (written by :func:`encode_factors`) as a float32 (n, length) matrix."""
    if set(parts) == {"fp16"}:
        rows = parts["fp16"]
        if rows.dim() != 2 or 0 in rows.shape:
            raise PackFormatError(f"{prefix}_fp16 must be a non-empty 2-D tensor, got shape {tuple(rows.shape)}")
        rows = rows.float()
    elif set(parts) == {"codes", "scales", "zeros", "qmeta"}:
        rows = dequantize_groupwise(_read_quantized(prefix, parts))
    else:
        raise PackFormatError(f"{prefix} has parts {sorted(parts)}; expected fp16, or codes/scales/zeros/qmeta")
    if not bool(torch.isfinite(rows).all()):
        raise PackFormatError(f"{prefix} decodes to NaN or Inf")
    return rows


def _read_quantized(prefix: str, parts: Mapping[str, torch.Tensor]) -> GroupQuantized:
    meta = parts["qmeta"]
    if meta.shape != (4,):
        raise PackFormatError(f"{prefix}_qmeta must be int32 [rows, length, bits, group_size]")
    rows, length, bits, group_size = (int(x) for x in meta)
    if rows < 1 or length < 1 or group_size < 1 or bits not in STORAGE_BITS or bits == 16:
        raise PackFormatError(f"{prefix}_qmeta holds invalid values {meta.tolist()}")
    groups = num_groups(length, group_size)
    scales = parts["scales"]
    if tuple(scales.shape) != (rows, groups):
        raise PackFormatError(f"{prefix}_scales should have shape {(rows, groups)}, got {tuple(scales.shape)}")
    if not bool(torch.isfinite(scales).all()):
        raise PackFormatError(f"{prefix}_scales holds NaN or Inf")
    try:
        codes = unpack_codes(parts["codes"], bits, rows * length).view(rows, length)
        zeros = unpack_codes(parts["zeros"], bits, rows * groups).view(rows, groups)
    except ValueError as error:
        raise PackFormatError(f"{prefix}: {error}") from error
    return GroupQuantized(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size)


def _stored(key: str, tensor: torch.Tensor, kind: str | None = None) -> torch.Tensor:
    """`tensor` if it has the dtype the format stores `key` in, else a PackFormatError."""
    expected = _STORED_DTYPES[kind or key]
    if tensor.dtype != expected:
        raise PackFormatError(f"{key} must be stored as {expected}, got {tensor.dtype}")
    return tensor


def encode_sparse(
    values: torch.Tensor,
    indices: torch.Tensor | None,
    shape: tuple[int, ...],
    density: float,
    dense_rows_from: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode a sparse delta given as dense `values` (of `shape`) or as flat `indices` + `values`.

    Keeps at most ``ceil(density · numel)`` entries by magnitude (rows from `dense_rows_from` on are kept whole, as a
    dense block), then picks the smaller of sparse (index + fp16 value) and dense fp16 storage.
    """
    numel = math.prod(shape)
    cols = shape[-1]
    head_end = numel if dense_rows_from is None else dense_rows_from * cols
    keep = math.ceil(density * head_end)
    values = values.detach()
    if indices is None:  # dense input: select in place, never materialize an index per entry
        flat = values.reshape(-1)
        head_indices = top_magnitude_positions(flat[:head_end], keep)
        head_values = flat[head_indices]
        tail_indices, tail_values = None, flat[head_end:]
    else:
        in_head = indices < head_end
        kept = top_magnitude_positions(values[in_head], keep)
        head_indices, head_values = indices[in_head][kept], values[in_head][kept]
        tail_indices, tail_values = indices[~in_head], values[~in_head]
    block = None
    if dense_rows_from is not None:
        block = (
            tail_values
            if tail_indices is None
            else scatter_dense(tail_indices - head_end, tail_values, (numel - head_end,))
        )
        block = block.reshape(-1, cols)
    tensors = sparse_tensors(head_indices, head_values, shape, dense_rows_from, block)
    if tensors is None:
        dense = scatter_dense(head_indices, head_values, shape).reshape(-1)
        if block is not None:
            dense[head_end:] = block.reshape(-1)
        return {"graft_values": dense.reshape(shape).to(torch.float16).contiguous()}
    return tensors


def sparse_tensors(
    indices: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, ...],
    dense_rows_from: int | None = None,
    block: torch.Tensor | None = None,
) -> dict[str, torch.Tensor] | None:
    """Pack tensors of a sparse delta (sorted flat `indices` + `values`, and the dense `block` of rows from
    `dense_rows_from` on), or None when dense fp16 storage of the whole delta would be smaller."""
    numel = math.prod(shape)
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    index_bytes = torch.empty((), dtype=index_dtype).element_size()
    block_numel = 0 if block is None else block.numel()
    if indices.numel() * (index_bytes + 2) + block_numel * 2 >= numel * 2:
        return None
    tensors = {
        "graft_indices": indices.to(index_dtype).contiguous(),
        "graft_values": values.to(torch.float16).contiguous(),
    }
    if block is not None:
        tensors["graft_rows"] = block.to(torch.float16).contiguous()
        tensors["graft_rows_start"] = torch.tensor([dense_rows_from], dtype=torch.int64)
    return tensors


@dataclass(frozen=True)
class DecodedModule:
    """Float tensors named like a layer's containers (``graft_indices`` stays int64), plus sparse metadata."""

    tensors: dict[str, torch.Tensor]
    dense_rows_from: int | None = None


def encode_module(
    floats: Mapping[str, torch.Tensor],
    shape: tuple[int, ...],
    policy: PackingPolicy,
    prune: bool,
    dense_rows_from: int | None = None,
) -> dict[str, torch.Tensor]:
    """Encode one module's adapter tensors (named like the layer's containers) for the pack file.

    `prune` applies the policy's ``embed_density`` to a values delta; otherwise values are stored in full.
    """
    tensors: dict[str, torch.Tensor] = {}
    if "graft_S" in floats:
        tensors.update(
            encode_lowrank(
                floats["graft_U"], floats["graft_S"], floats["graft_V"], policy.precision_bands, policy.group_size
            )
        )
    elif "graft_values" in floats:
        if prune or "graft_indices" in floats:
            density = policy.embed_density if prune else 1.0
            tensors.update(
                encode_sparse(floats["graft_values"], floats.get("graft_indices"), shape, density, dense_rows_from)
            )
        else:
            tensors["graft_values"] = floats["graft_values"].detach().to(torch.float16).contiguous()
    if "graft_bias" in floats:
        tensors["graft_bias"] = floats["graft_bias"].detach().to(torch.float16).contiguous()
    return tensors


def decode_module(
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    rows_before_growth: int | None = None,
) -> DecodedModule:
    """Decode :func:`encode_module` output for a layer whose weight has logical `shape` (see :func:`decode_values`
    for `rows_before_growth`)."""
    lowrank = {k: t for k, t in tensors.items() if k == "graft_S" or k.startswith(LOWRANK_FACTORS)}
    quantized = {k: t for k, t in tensors.items() if k.startswith(f"{QUANTIZED_PREFIX}_")}
    values_keys = {"graft_values", "graft_indices", "graft_rows", "graft_rows_start"}
    values = {k: t for k, t in tensors.items() if k in values_keys}
    unexpected = set(tensors) - set(lowrank) - set(quantized) - set(values) - {"graft_bias"}
    if unexpected:
        raise PackFormatError(f"unexpected tensors {sorted(unexpected)}")
    if sum(map(bool, (lowrank, quantized, values))) > 1:
        raise PackFormatError("a module holds more than one form of delta (low-rank, quantized dense, values)")
    decoded: dict[str, torch.Tensor] = {}
    dense_rows_from = None
    if lowrank:
        u, s, v = decode_lowrank(lowrank, dtype)
        decoded.update(graft_U=u, graft_S=s, graft_V=v)
    elif quantized:
        decoded["graft_values"] = decode_quantized_dense(quantized, shape).to(dtype)
    elif values:
        delta_values, indices, dense_rows_from = decode_values(values, shape, dtype, rows_before_growth)
        decoded["graft_values"] = delta_values
        if indices is not None:
            decoded["graft_indices"] = indices
    if "graft_bias" in tensors:
        bias = _stored("graft_bias", tensors["graft_bias"])
        if tuple(bias.shape) != tuple(shape[:1]) or not bool(torch.isfinite(bias).all()):
            raise PackFormatError(
                f"graft_bias must be a finite vector of the module's {shape[0]} outputs, got shape {tuple(bias.shape)}"
            )
        decoded["graft_bias"] = bias.to(dtype)
    if not decoded:
        raise PackFormatError("the module holds no delta tensors")
    return DecodedModule(decoded, dense_rows_from)


def decode_values(
    tensors: Mapping[str, torch.Tensor],
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    rows_before_growth: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Decode a values delta into ``(values, indices, dense_rows_from)``; indices is None for a dense delta.

    A dense delta must have exactly `shape`, with one exception: an embedding (or head) whose vocabulary was grown
    (by another pack's added tokens) from `rows_before_growth` rows takes a pack made on any vocabulary from that one
    up, its missing rows zero. Flat row-major indices need no change for that.
    """
    if "graft_values" not in tensors:
        raise PackFormatError(f"a values delta needs graft_values; got {sorted(tensors)}")
    values = _stored("graft_values", tensors["graft_values"])
    if not bool(torch.isfinite(values).all()):
        raise PackFormatError("graft_values holds NaN or Inf")
    numel = math.prod(shape)
    if "graft_indices" not in tensors:
        if set(tensors) != {"graft_values"}:
            raise PackFormatError(f"a dense delta is graft_values alone; got {sorted(tensors)}")
        grown = (
            rows_before_growth is not None
            and values.dim() == len(shape) == 2
            and values.shape[1] == shape[1]
            and rows_before_growth <= values.shape[0] < shape[0]
        )
        if grown:
            values = torch.cat([values, values.new_zeros(shape[0] - values.shape[0], shape[1])])
        if tuple(values.shape) != tuple(shape):
            raise PackFormatError(f"dense graft_values has shape {tuple(values.shape)}, expected {tuple(shape)}")
        return values.to(dtype), None, None
    indices = tensors["graft_indices"]
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 1 or values.shape != indices.shape:
        raise PackFormatError(
            f"graft_indices must be 1-D int32/int64 matching graft_values; got {indices.dtype} "
            f"{tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.numel() == 0 and "graft_rows" not in tensors:
        # never written (a module whose delta keeps no entry is left out of the pack): emptied tensors mean damage
        raise PackFormatError("a sparse delta with no entries (graft_indices and graft_values are empty)")
    indices = indices.long()
    dense_rows_from = None
    if "graft_rows" in tensors or "graft_rows_start" in tensors:
        block = _stored("graft_rows", tensors.get("graft_rows", torch.empty(0, dtype=torch.float16)))
        start = _stored("graft_rows_start", tensors.get("graft_rows_start", torch.empty(0, dtype=torch.int64)))
        cols = shape[-1]
        if start.numel() != 1 or block.dim() != 2 or block.shape[1] != cols:
            raise PackFormatError("graft_rows must be (rows, cols) with a one-element graft_rows_start")
        if not bool(torch.isfinite(block).all()):
            raise PackFormatError("graft_rows (the rows of added tokens) holds NaN or Inf")
        dense_rows_from = int(start)
        if dense_rows_from < 0 or dense_rows_from + block.shape[0] > shape[0]:
            raise PackFormatError(
                f"graft_rows covers rows {dense_rows_from}..{dense_rows_from + block.shape[0]} of {shape[0]}"
            )
        if indices.numel() and int(indices[-1]) >= dense_rows_from * cols:
            raise PackFormatError("graft_indices reach into the rows stored in graft_rows")
        indices = torch.cat([indices, dense_rows_from * cols + torch.arange(block.numel())])
        values = torch.cat([values.float(), block.float().reshape(-1)])
    if indices.numel() and (
        int(indices[0]) < 0 or int(indices[-1]) >= numel or not bool((indices[1:] > indices[:-1]).all())
    ):
        raise PackFormatError(f"graft_indices must be strictly increasing and lie in [0, {numel})")
    return values.to(dtype), indices, dense_rows_from


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of tensor data (what a safetensors file stores besides its header)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
