"""Compress one module's delta by its role (sparse, low-rank with precision bands, or dense), within a budget plan."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..compress import LargestEntries, band_slices
from ..compress.factors import quantize_factors
from ..compress.gptq import output_error
from ..compress.lowrank import BandSlice
from ..compress.svd import Spectrum, factorize
from ..config import GraftConfig
from ..errors import CheckpointMismatchError
from ..pack import layout
from ..pack.codec import decode_lowrank, decode_values, encode_factors, sparse_tensors, tensors_nbytes
from ..pack.cost import dense_bytes, direction_bytes, lowrank_overhead_bytes
from .budget import BudgetPlan
from .delta import DeltaReader
from .report import ModuleReport
from .roles import ModuleSpec


@dataclass
class Compressed:
    """One module's pack tensors (relative keys), its report, and its decoded delta (to update an in-memory model).

    The decoded delta is kept in its compact form: ``("lowrank", (u, s, v))``, ``("sparse", (flat indices, values))``
    or ``("dense", values)``, all in the logical (out, in) layout.
    """

    tensors: dict[str, torch.Tensor]
    report: ModuleReport
    decoded: tuple[str, Any] | None
    bias_delta: torch.Tensor | None = None

    def apply_to(self, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> None:
        """Add the decoded deltas to a module's parameters (in place; `weight` in its stored layout)."""
        if self.decoded is not None:
            kind, data = self.decoded
            target = weight.T if transposed else weight
            if kind == layout.LOWRANK:
                u, s, v = data
                target.add_(((u * s) @ v.T).to(weight.dtype))
            elif kind == layout.SPARSE:
                indices, values = data
                target.reshape(-1).index_add_(0, indices, values.to(weight.dtype))
            else:
                target.add_(data.reshape(target.shape).to(weight.dtype))
        if self.bias_delta is not None and bias is not None:
            bias.add_(self.bias_delta.to(bias.dtype))


class Compressor:
    """Compress one module's delta according to its role, the config, and an optional budget plan."""

    def __init__(
        self,
        deltas: DeltaReader,
        config: GraftConfig,
        plan: BudgetPlan | None,
        grown_rows: dict[str, int],
        act_order: bool,
        damp: float,
        spectra: Callable[[str], Spectrum | None] | None = None,
    ) -> None:
        self.deltas, self.config, self.plan = deltas, config, plan
        self.spectra = spectra  # the spectra planning computed, by module name
        self.base, self.finetuned = deltas.base, deltas.finetuned
        self.grown_rows = grown_rows
        self.act_order, self.damp = act_order, damp

    def compress(self, spec: ModuleSpec, hessian: torch.Tensor | None = None) -> Compressed | None:
        if spec.role == "skip":
            return None
        bias_delta = self.deltas.delta(spec.bias) if spec.bias is not None else None
        if bias_delta is not None and not bias_delta.any():
            bias_delta = None
        if spec.role == "embed":
            item = self._sparse(spec)
        else:
            weight_delta = self.deltas.delta(spec.weight)
            if spec.kind == "parameter":
                if weight_delta.any():
                    raise CheckpointMismatchError(
                        f"{spec.weight} changed, but it is not the weight or bias of a Linear, Conv1D, Embedding or "
                        "norm module, so a SkillPack cannot carry its delta"
                    )
                return None
            item = None
            if weight_delta.any():
                logical = weight_delta.T if spec.transposed else weight_delta
                if spec.role == "dense" or logical.dim() != 2:
                    item = self._dense(spec, logical)
                else:
                    item = self._lowrank(spec, logical, hessian)
        if item is None:
            if bias_delta is None:
                return None
            report = ModuleReport(spec.name, spec.role, layout.BIAS, list(bias_delta.shape))
            item = Compressed({}, report, None)
        if bias_delta is not None:
            item.tensors["graft_bias"] = bias_delta.to(torch.float16)
            item.bias_delta = bias_delta.to(torch.float16).float()
            item.report.bytes += 2 * bias_delta.numel()
        return item

    def _dense(self, spec, logical) -> Compressed:
        stored = logical.to(torch.float16)
        report = ModuleReport(
            spec.name,
            spec.role,
            layout.DENSE,
            list(logical.shape),
            bytes=2 * logical.numel(),
            frobenius_error=relative_error(logical, stored.float()),
        )
        return Compressed({"graft_values": stored}, report, (layout.DENSE, stored.float()))

    def _sparse(self, spec) -> Compressed | None:
        """Magnitude pruning, streamed over row blocks: only the running top entries are kept in memory."""
        shape = self.finetuned.shape(spec.weight)
        rows, cols = shape
        rows_from = self.grown_rows.get(spec.name)
        head_rows = rows if rows_from is None else rows_from
        if self.plan is not None:
            keep = self.plan.sparse.get(spec.name, 0)
        else:
            keep = math.ceil(self.config.density_for(spec.name) * head_rows * cols)
        largest = LargestEntries(keep)
        block = []
        total = 0.0
        for start, delta in self.deltas.row_blocks(spec.weight):
            total += float(delta.double().pow(2).sum())
            head = delta[: max(0, head_rows - start)].reshape(-1)
            if head.numel():
                largest.add(head, start * cols)
            if start + delta.shape[0] > head_rows:
                block.append(delta[max(0, head_rows - start) :])
        if total == 0.0:
            return None
        kept_indices, kept_values = largest.result()
        block_rows = torch.cat(block) if block else None
        if kept_indices.numel() == 0 and block_rows is None:
            return None  # the budget spends nothing here
        tensors = sparse_tensors(kept_indices, kept_values, tuple(shape), rows_from, block_rows)
        if tensors is None:  # dense storage is smaller: read the delta once more, into fp16
            dense = torch.cat([delta for _, delta in self.deltas.row_blocks(spec.weight)]).to(torch.float16)
            if keep < head_rows * cols:
                mask = torch.zeros(rows * cols, dtype=torch.bool, device=dense.device)
                mask[kept_indices] = True
                if block_rows is not None:
                    mask[head_rows * cols :] = True
                dense = dense.reshape(-1).masked_fill(~mask, 0).reshape(shape)
            tensors = {"graft_values": dense}
        values, indices, _ = decode_values(tensors, tuple(shape))
        if indices is None:
            indices = values.reshape(-1).nonzero().squeeze(1)
            values = values.reshape(-1)[indices]
        kept_energy = float(kept_values.double().pow(2).sum()) + (
            float(block_rows.double().pow(2).sum()) if block_rows is not None else 0.0
        )
        stored_values = torch.cat([kept_values, block_rows.reshape(-1)]) if block_rows is not None else kept_values
        rounding = float((values.double() - stored_values.double()).pow(2).sum())
        form = layout.SPARSE if "graft_indices" in tensors else layout.DENSE
        report = ModuleReport(
            spec.name,
            spec.role,
            form,
            list(shape),
            density=kept_indices.numel() / (head_rows * cols),
            bytes=tensors_nbytes(tensors),
            frobenius_error=math.sqrt(max(0.0, total - kept_energy) + rounding) / math.sqrt(total),
        )
        return Compressed(tensors, report, (layout.SPARSE, (indices, values)))

    def _lowrank(self, spec, logical, hessian) -> Compressed | None:
        out_features, in_features = logical.shape
        if self.plan is not None:
            if spec.name in self.plan.dense:
                return self._dense(spec, logical)
            bits = self.plan.lowrank.get(spec.name, [])
            if not bits:
                return None
            known = self.spectra(spec.name) if self.spectra is not None else None
            factors = factorize(logical, rank=len(bits), known=known)
            slices = bit_runs(bits)
        else:
            if spec.role == "attn":
                factors = factorize(logical, rank=self.config.rank_for(spec.name))
            else:
                factors = factorize(logical, energy=self.config.mlp_energy)
            slices = band_slices(factors.rank, self.config.precision_bands)
            planned = sum(
                direction_bytes(out_features, in_features, s.bits, self.config.group_size) * (s.stop - s.start)
                for s in slices
            )
            planned += lowrank_overhead_bytes(spec.name, len(slices))
            if planned >= dense_bytes(spec.name, logical.numel()):
                return self._dense(spec, logical)  # a factorization larger than the dense delta is never written
        quantized = quantize_factors(
            factors.u,
            factors.s,
            factors.v,
            slices,
            self.config.group_size,
            hessian=hessian,
            act_order=self.act_order,
            damp=self.damp,
        )
        tensors = encode_factors(quantized)
        u, s, v = decode_lowrank(tensors)
        restored = (u * s) @ v.T
        report = ModuleReport(
            spec.name,
            spec.role,
            layout.LOWRANK,
            [out_features, in_features],
            rank=factors.rank,
            bands=[[b.stop - b.start, b.bits] for b in slices],
            bytes=tensors_nbytes(tensors),
            frobenius_error=relative_error(logical, restored),
            svd=factors.method,
            output_error=output_error(logical, restored, hessian) if hessian is not None else None,
        )
        return Compressed(tensors, report, (layout.LOWRANK, (u, s, v)))


def bit_runs(bits: Sequence[int]) -> list[BandSlice]:
    """Contiguous runs of equal bit widths as band slices."""
    slices, start = [], 0
    for index in range(1, len(bits) + 1):
        if index == len(bits) or bits[index] != bits[start]:
            slices.append(BandSlice(start, index, bits[start]))
            start = index
    return slices


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    norm = float(reference.double().norm())
    return float((reference.double() - approximation.double()).norm()) / norm if norm else 0.0
