"""Compress one module's delta by its role (sparse, low-rank with precision bands, or dense), or in the form a budget
plan chose for it (low-rank, group-quantized dense, fp16 dense or sparse)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..compress import MagnitudeHistogram, band_slices
from ..compress.dense import quantize_dense
from ..compress.factors import quantize_factors
from ..compress.gptq import output_error
from ..compress.lowrank import BandSlice
from ..compress.quantize import GroupQuantized, dequantize_groupwise, quantize_groupwise
from ..compress.svd import Spectrum, factorize, project_rows, squared_norm
from ..config import GraftConfig
from ..errors import CheckpointMismatchError
from ..pack import layout
from ..pack.codec import (
    decode_lowrank,
    encode_factors,
    encode_quantized_dense,
    sparse_tensors,
    tensors_nbytes,
)
from ..pack.cost import dense_bytes, direction_bytes, lowrank_overhead_bytes
from .budget import BudgetPlan
from .delta import DeltaReader
from .devices import DevicePool
from .plan import replan_layer, row_weights
from .report import ModuleReport
from .roles import ModuleSpec
from .staging import Staging


@dataclass
class Compressed:
    """One module's pack tensors (keys relative to the module) and its report."""

    tensors: dict[str, torch.Tensor]
    report: ModuleReport


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
        layer_replan: bool = False,
        frequencies: torch.Tensor | None = None,
    ) -> None:
        self.deltas, self.config, self.plan = deltas, config, plan
        self.spectra = spectra  # the spectra planning computed, by module name
        self.layer_replan = layer_replan  # calibrated: re-plan each layer on output error (plan.replan_layer)
        self.frequencies = frequencies  # calibrated: token frequencies, which weight embedding rows (plan.row_weights)
        self.base, self.finetuned = deltas.base, deltas.finetuned
        self.grown_rows = grown_rows
        self.act_order, self.damp = act_order, damp

    def compress(self, spec: ModuleSpec, hessian: torch.Tensor | None = None) -> Compressed | None:
        if spec.role == "skip":
            return None
        if hessian is not None:
            hessian = hessian.to(self.deltas.device)  # collected on the layer walk's device
        bias_delta = self.deltas.delta(spec.bias) if spec.bias is not None else None
        if bias_delta is not None and not bias_delta.any():
            bias_delta = None
        form = self.plan.form(spec.name) if self.plan is not None else None
        if spec.role == "embed":
            if form == "lowrank":
                item = self._lowrank_rows(spec, self.plan.lowrank[spec.name])
            elif form == "dense":
                item = self._dense(spec, self.deltas.delta(spec.weight))
            elif form == "quantized":
                item = self._quantized_rows(spec, self.plan.quantized[spec.name])
            else:
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
                elif form == "quantized":
                    item = self._quantized(spec, logical, self.plan.quantized[spec.name], hessian)
                else:
                    item = self._lowrank(spec, logical, hessian)
        if item is None:
            if bias_delta is None:
                return None
            report = ModuleReport(spec.name, spec.role, layout.BIAS, list(bias_delta.shape))
            item = Compressed({}, report)
        if bias_delta is not None:
            item.tensors["graft_bias"] = bias_delta.to(torch.float16)
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
        return Compressed({"graft_values": stored}, report)

    def _sparse(self, spec) -> Compressed | None:
        """Magnitude pruning, in three streaming passes over row blocks, holding only what the pack will store:

        1. the total energy and a magnitude histogram, which settle every kept entry but those of one bin;
        2. that bin's magnitudes, which give the exact cut (ties at the cut: the first entries, by position);
        3. the kept entries themselves, collected in ascending position as int32/int64 indices and fp16 values.

        Calibrated, a token embedding's magnitudes are ranked after scaling each row by the square root of its weight,
        as planned.
        """
        shape = self.finetuned.shape(spec.weight)
        rows, cols = shape
        rows_from = self.grown_rows.get(spec.name)
        head_rows = rows if rows_from is None else rows_from
        if self.plan is not None:
            keep = self.plan.sparse.get(spec.name, 0)
        else:
            keep = math.ceil(self.config.density_for(spec.name) * head_rows * cols)

        frequencies = self.frequencies if spec.tokens else None

        def ranked(start: int, head: torch.Tensor) -> torch.Tensor:  # what selection compares, flattened
            weights = row_weights(frequencies, start, head.shape[0], head_rows)
            scaled = head if weights is None else head * weights.sqrt().to(head.device, head.dtype)[:, None]
            return scaled.reshape(-1)

        histogram = MagnitudeHistogram()
        total = 0.0
        for start, delta in self.deltas.row_blocks(spec.weight):
            total += float(delta.double().pow(2).sum())
            histogram.add(ranked(start, delta[: max(0, head_rows - start)]).pow(2))
        if total == 0.0:
            return None
        if keep > 0:
            cut_bin, above = histogram.cut(keep)
            cut_value, at_cut = _cut_within(
                self.deltas, spec.weight, head_rows, histogram, cut_bin, keep - above, ranked
            )
        else:  # the plan buys none of this module's entries (rows a fine-tune added are kept all the same)
            cut_bin, cut_value, at_cut = -1, math.inf, 0

        index_dtype = torch.int32 if rows * cols < 2**31 else torch.int64
        kept_indices, kept_values, block = [], [], []
        kept_energy = rounding = 0.0
        for start, delta in self.deltas.row_blocks(spec.weight):
            head = delta[: max(0, head_rows - start)]
            if head.numel():
                magnitude = ranked(start, head).abs()
                head = head.reshape(-1)
                take = magnitude > cut_value if cut_bin else magnitude > 0
                if at_cut:  # the first entries tied at the cut, by position
                    tied = (magnitude == cut_value).nonzero().squeeze(1)[:at_cut]
                    take[tied] = True
                    at_cut -= tied.numel()
                positions = take.nonzero().squeeze(1)
                values = head[positions]
                stored = values.to(torch.float16)
                kept_energy += float(values.double().pow(2).sum())
                rounding += float((stored.double() - values.double()).pow(2).sum())
                kept_indices.append((positions + start * cols).to(index_dtype))
                kept_values.append(stored)
            if start + delta.shape[0] > head_rows:  # rows a fine-tune added: kept whole, as a dense block
                tail = delta[max(0, head_rows - start) :]
                rounding += float((tail.to(torch.float16).double() - tail.double()).pow(2).sum())
                kept_energy += float(tail.double().pow(2).sum())
                block.append(tail)
        indices = torch.cat(kept_indices) if kept_indices else torch.empty(0, dtype=index_dtype)
        values = torch.cat(kept_values) if kept_values else torch.empty(0, dtype=torch.float16)
        block_rows = torch.cat(block) if block else None
        if indices.numel() == 0 and block_rows is None:
            return None  # the budget spends nothing here
        tensors = sparse_tensors(indices, values, tuple(shape), rows_from, block_rows)
        if tensors is None:  # dense storage is smaller: the kept entries (and added rows) in a dense fp16 matrix
            dense = torch.zeros(rows * cols, dtype=torch.float16, device=values.device)
            dense[indices.long()] = values
            if block_rows is not None:
                dense[head_rows * cols :] = block_rows.reshape(-1).to(torch.float16)
            tensors = {"graft_values": dense.reshape(shape)}
        form = layout.SPARSE if "graft_indices" in tensors else layout.DENSE
        report = ModuleReport(
            spec.name,
            spec.role,
            form,
            list(shape),
            density=indices.numel() / (head_rows * cols),
            bytes=tensors_nbytes(tensors),
            frobenius_error=math.sqrt(max(0.0, total - kept_energy) + rounding) / math.sqrt(total),
        )
        return Compressed(tensors, report)

    def _quantized(self, spec, logical, bits: int, hessian) -> Compressed:
        """The whole delta group-quantized at `bits`: GPTQ on the module's Hessian when calibrated, else RTN."""
        quantized = quantize_dense(
            logical, bits, self.config.group_size, hessian=hessian, act_order=self.act_order, damp=self.damp
        )
        restored = dequantize_groupwise(quantized)
        return _quantized_item(
            spec,
            quantized,
            relative_error(logical, restored),
            output_error(logical, restored, hessian) if hessian is not None else None,
        )

    def _quantized_rows(self, spec, bits: int) -> Compressed:
        """An embedding's delta group-quantized at `bits` by round-to-nearest, a block of rows at a time (groups lie
        within rows), so the float delta is never held whole."""
        parts, error, total = [], 0.0, 0.0
        for _, delta in self.deltas.row_blocks(spec.weight):
            part = quantize_groupwise(delta.float(), bits, self.config.group_size)
            error += squared_norm(delta.float(), dequantize_groupwise(part))
            total += squared_norm(delta)
            parts.append(part)
        quantized = GroupQuantized(
            codes=torch.cat([part.codes for part in parts]),
            scales=torch.cat([part.scales for part in parts]),
            zeros=torch.cat([part.zeros for part in parts]),
            bits=bits,
            group_size=self.config.group_size,
        )
        return _quantized_item(spec, quantized, math.sqrt(error / total) if total else 0.0)

    def _lowrank_rows(self, spec, bits: list[int]) -> Compressed:
        """An embedding's low-rank delta from its complete planning spectrum (right singular vectors), the left ones
        computed a block of rows at a time, so the delta is never held whole."""
        known = self.spectra(spec.name)
        rank = len(bits)
        u = torch.cat([project_rows(delta, known, rank) for _, delta in self.deltas.row_blocks(spec.weight)])
        s = known.values[:rank].float().to(u.device)
        v = known.vectors[:, :rank].float().to(u.device)
        slices = bit_runs(bits)
        tensors = encode_factors(quantize_factors(u, s, v, slices, self.config.group_size))
        u_hat, s_hat, v_hat = decode_lowrank(tensors)
        error = total = 0.0
        for start, delta in self.deltas.row_blocks(spec.weight):
            restored = (u_hat[start : start + delta.shape[0]].to(delta.device) * s_hat.to(delta.device)) @ v_hat.T.to(
                delta.device
            )
            error += squared_norm(delta.float(), restored)
            total += squared_norm(delta)
        rows, cols = self.finetuned.shape(spec.weight)
        report = ModuleReport(
            spec.name,
            spec.role,
            layout.LOWRANK,
            [rows, cols],
            rank=rank,
            bands=[[b.stop - b.start, b.bits] for b in slices],
            bytes=tensors_nbytes(tensors),
            frobenius_error=math.sqrt(error / total) if total else 0.0,
            svd="full",
        )
        return Compressed(tensors, report)

    def _lowrank(self, spec, logical, hessian) -> Compressed | None:
        out_features, in_features = logical.shape
        if self.plan is not None:
            if spec.name in self.plan.dense:
                return self._dense(spec, logical)
            bits = self.plan.lowrank.get(spec.name, [])
            if not bits:
                return None
            known = self.spectra(spec.name) if self.spectra is not None else None
            chosen = self.plan.directions.get(spec.name)
            if known is not None and chosen is not None:  # the directions worth most under H, not the leading ones
                index = torch.tensor(chosen)
                known = Spectrum(known.values[index], known.vectors[:, index])
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
        return Compressed(tensors, report)


def compress_unit(
    compressors: DevicePool,
    staging: Staging,
    position: int,
    unit: list[ModuleSpec],
    hessians: dict[str, torch.Tensor],
) -> list[ModuleReport]:
    """Compress one unit, its modules spread over the pool's devices, and store it in the work folder; or take it from
    there, when a resumed run finished it already. Each Hessian is dropped once its module is done."""
    done = staging.finished(position)
    if done is not None:
        return done
    primary = compressors.primary
    if hessians and primary.plan is not None and primary.layer_replan:
        replan_layer(primary.plan, unit, hessians, primary.deltas, staging, primary.config.group_size)
    items = compressors.map(lambda compressor, spec: compressor.compress(spec, hessians.pop(spec.name, None)), unit)
    kept = {spec.name: item for spec, item in zip(unit, items, strict=True) if item is not None}
    reports = [item.report for item in kept.values()]
    staging.write_unit(position, {name: item.tensors for name, item in kept.items()}, reports)
    return reports


def _quantized_item(
    spec: ModuleSpec, quantized: GroupQuantized, frobenius_error: float, output_error: float | None = None
) -> Compressed:
    """A group-quantized dense delta's pack tensors and report."""
    tensors = encode_quantized_dense(quantized)
    report = ModuleReport(
        spec.name,
        spec.role,
        layout.QUANTIZED,
        list(quantized.shape),
        bits=quantized.bits,
        bytes=tensors_nbytes(tensors),
        frobenius_error=frobenius_error,
        output_error=output_error,
    )
    return Compressed(tensors, report)


def bit_runs(bits: Sequence[int]) -> list[BandSlice]:
    """Contiguous runs of equal bit widths as band slices."""
    slices, start = [], 0
    for index in range(1, len(bits) + 1):
        if index == len(bits) or bits[index] != bits[start]:
            slices.append(BandSlice(start, index, bits[start]))
            start = index
    return slices


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    norm = squared_norm(reference)
    return math.sqrt(squared_norm(reference, approximation) / norm) if norm else 0.0


def _cut_within(deltas: DeltaReader, key: str, head_rows: int, histogram, cut_bin: int, wanted: int, ranked):
    """``(cut, ties)``: the magnitude of the `wanted`-th largest entry of histogram bin `cut_bin` (every entry above
    it is kept) and how many entries equal to it are kept too; ``(0.0, 0)`` when there is no cut (keep all).
    `ranked(start, rows)` gives the magnitudes compared (flattened)."""
    if cut_bin == 0:
        return 0.0, 0
    in_bin = []
    for start, delta in deltas.row_blocks(key):
        head = ranked(start, delta[: max(0, head_rows - start)])
        in_bin.append(head.abs()[histogram.bins(head.pow(2)) == cut_bin])
    magnitudes = torch.cat(in_bin)
    cut = magnitudes.kthvalue(magnitudes.numel() - wanted + 1).values
    return float(cut), wanted - int((magnitudes > cut).sum())
