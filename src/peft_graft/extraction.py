"""SkillPack extraction: compress ``Δθ = θ_finetuned − θ_base`` module by module into a GRAFT pack.

Checkpoints are read tensor by tensor; the fine-tune is never loaded as a model. Data-free extraction holds two
tensors at a time. Calibrated extraction holds the base model (one model) and walks it decoder layer by decoder
layer, as sequential GPTQ does: a layer's module inputs are captured with hooks (accumulating ``H = XᵀX``, not
activations) while the layer runs with its fine-tuned weights, its deltas are compressed with GPTQ on those
Hessians, and the next layer's inputs come from the layer running with ``base + compressed delta``.

Everything is checked and computed before anything is written; the pack is written to a temporary folder next to
the output and renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .atomic import write_folder
from .cards import write_pack_card
from .checkpoint import CheckpointReader
from .compress import BandSlice, LargestEntries, band_slices
from .compress.budget import (
    BudgetPlan,
    LowRankCandidate,
    SparseCandidate,
    dense_bytes,
    direction_bytes,
    header_bytes,
    lowrank_overhead_bytes,
    plan_budget,
)
from .compress.gptq import output_error
from .compress.svd import factorize, singular_values
from .config import GraftConfig
from .errors import BudgetError, CheckpointMismatchError, MissingTensorError, NonFiniteDeltaError
from .pack_format import decode_lowrank, decode_values, encode_lowrank, sparse_tensors, tensors_nbytes
from .provenance import base_parameters, fingerprint_checkpoint
from .roles import ModuleSpec, decoder_layers, meta_model, module_specs, tied_output_embedding

REPORT_FILE = "graft_report.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


@dataclass
class ModuleReport:
    name: str
    role: str
    form: str  # "lowrank", "sparse", "dense" or "bias"
    shape: list[int]
    rank: int | None = None
    bands: list[list[int]] | None = None  # [[n_directions, bits], ...]
    density: float | None = None
    bytes: int = 0
    frobenius_error: float = 0.0  # ‖Δ − Δ̂‖ / ‖Δ‖
    output_error: float | None = None  # ‖(Δ − Δ̂)X‖ / ‖ΔX‖ on the calibration inputs
    svd: str | None = None  # "full" or "randomized"


@dataclass
class ExtractionReport:
    """What an extraction did, module by module; written into the pack as graft_report.json."""

    base: str
    finetuned: str
    calibrated: bool
    budget: float | None
    modules: list[ModuleReport] = field(default_factory=list)
    pack_bytes: int = 0
    fp16_delta_bytes: int = 0
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.pack_bytes / self.fp16_delta_bytes if self.fp16_delta_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ratio"] = self.ratio
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionReport:
        data = {k: v for k, v in data.items() if k != "ratio"}
        data["modules"] = [ModuleReport(**module) for module in data.get("modules", [])]
        return cls(**data)

    @classmethod
    def load(cls, pack_dir: str | os.PathLike) -> ExtractionReport:
        with open(Path(pack_dir) / REPORT_FILE, encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))

    def table(self) -> str:
        """A human-readable per-module table with totals."""
        header = f"{'module':<48} {'role':<6} {'form':<7} {'shape':<13} {'rank':>5} {'bits per band':<18} "
        header += f"{'bytes':>10} {'frob err':>9} {'out err':>8}"
        lines = [header, "-" * len(header)]
        for m in self.modules:
            bands = (
                ",".join(f"{n}x{b}" for n, b in m.bands)
                if m.bands
                else (f"{m.density:.3f} kept" if m.density else "fp16")
            )
            output = f"{m.output_error:.4f}" if m.output_error is not None else "-"
            rank = m.rank if m.rank is not None else "-"
            lines.append(
                f"{m.name[-48:]:<48} {m.role:<6} {m.form:<7} {'x'.join(map(str, m.shape)):<13} {rank:>5} "
                f"{bands:<18} {m.bytes:>10} {m.frobenius_error:>9.4f} {output:>8}"
            )
        lines.append("-" * len(header))
        lines.append(
            f"pack {self.pack_bytes / 2**20:.2f} MiB  vs fp16 delta {self.fp16_delta_bytes / 2**20:.2f} MiB  "
            f"(ratio {self.ratio:.4f})  modules {len(self.modules)}  calibrated {self.calibrated}  "
            f"wall {self.wall_seconds:.1f} s  peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB"
        )
        return "\n".join(lines)


@dataclass
class _Compressed:
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
            if kind == "lowrank":
                u, s, v = data
                target.add_(((u * s) @ v.T).to(weight.dtype))
            elif kind == "sparse":
                indices, values = data
                target.reshape(-1).index_add_(0, indices, values.to(weight.dtype))
            else:
                target.add_(data.reshape(target.shape).to(weight.dtype))
        if self.bias_delta is not None and bias is not None:
            bias.add_(self.bias_delta.to(bias.dtype))


def extract_skillpack(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: GraftConfig | None = None,
    *,
    calibration: Iterable[str] | Any | None = None,
    budget: float | None = None,
    base_revision: str | None = None,
    finetuned_revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
    act_order: bool = True,
    damp: float = 0.01,
    calibration_samples: int = 128,
    calibration_length: int = 256,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    skill: str | None = None,
) -> ExtractionReport:
    """Compress a fine-tune's delta against its base into a SkillPack folder that loads with ``PeftModel``.

    Args:
        base, finetuned: local folders or Hub repo ids (safetensors checkpoints, sharded or not).
        output_dir: the pack folder to create (refused if it exists, unless `overwrite`).
        config: the compression policy (roles, ranks, energy, density, precision bands); ``GraftConfig()`` if None.
        calibration: texts (a list of strings, a ``datasets.Dataset`` with a ``text`` column, or a path to a
            ``.jsonl``/``.txt`` file) for GPTQ; None gives round-to-nearest (data-free).
        budget: if given, the pack is at most ``budget`` × the fp16 bytes of the full delta; ranks, bands and
            densities are then chosen greedily by error reduction per byte, with `config`'s operators ignored.
        allow_pickle: read ``.bin`` checkpoints (pickle can run code; only for sources you trust).
        act_order, damp: GPTQ options.
        calibration_samples, calibration_length, batch_size: how much calibration text is used, and how.
        skill: a short description of what the fine-tune learned, for the pack's model card.
    """
    started = time.perf_counter()
    config = config if config is not None else GraftConfig()
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} already exists; choose another folder or pass overwrite=True")
    if budget is not None and not 0.0 < budget <= 1.0:
        raise BudgetError(f"budget must be a fraction in (0, 1] of the fp16 delta, got {budget}")
    base_reader = CheckpointReader(base, revision=base_revision, token=token, allow_pickle=allow_pickle)
    finetuned_reader = CheckpointReader(finetuned, revision=finetuned_revision, token=token, allow_pickle=allow_pickle)
    architecture = meta_model(str(base_reader.folder))
    specs, tied_head = _validated_specs(architecture, base_reader, finetuned_reader, config)
    grown_rows = _grown_rows(specs, base_reader, finetuned_reader)
    fp16_delta_bytes = 2 * sum(
        finetuned_reader.numel(name) for name in finetuned_reader.names() if _is_float(finetuned_reader.dtype(name))
    )

    plan = None
    if budget is not None:
        plan = _plan(
            specs, base_reader, finetuned_reader, config, math.floor(budget * fp16_delta_bytes), grown_rows, progress
        )

    texts = load_texts(calibration, calibration_samples) if calibration is not None else None
    compressor = _Compressor(base_reader, finetuned_reader, config, plan, grown_rows, act_order, damp)
    if texts:
        compressed = _extract_calibrated(
            compressor,
            specs,
            str(base_reader.folder),
            finetuned_reader,
            texts,
            calibration_length,
            batch_size,
            progress,
        )
    else:
        modules = tqdm(specs, desc="extracting", unit="module", disable=not progress)
        compressed = {spec.name: compressor.compress(spec) for spec in modules}
    compressed = {name: item for name, item in compressed.items() if item is not None}
    if not compressed:
        raise CheckpointMismatchError("the fine-tune is identical to the base: there is no delta to pack")

    tensors = {
        f"{_PEFT_PREFIX}{name}.{key}": tensor.contiguous()
        for name, item in compressed.items()
        for key, tensor in item.tensors.items()
    }
    pack_config = _pack_config(config, compressed, base_reader, grown_rows, tied_head)
    pack_config.base_model_fingerprint = fingerprint_checkpoint(base_reader, base_parameters(architecture))
    pack_config.pack_info = {
        **config.pack_info,
        "skill": skill or config.pack_info.get("skill"),
        "finetuned": finetuned_reader.source,
        "finetuned_revision": finetuned_reader.commit or finetuned_revision,
        "calibrated": bool(texts),
        "budget": budget,
        "fp16_delta_bytes": fp16_delta_bytes,
    }
    report = ExtractionReport(
        base=str(base),
        finetuned=str(finetuned),
        calibrated=bool(texts),
        budget=budget,
        modules=[item.report for item in compressed.values()],
        fp16_delta_bytes=fp16_delta_bytes,
        settings={
            "act_order": act_order,
            "damp": damp,
            "calibration_samples": len(texts) if texts else 0,
            "calibration_length": calibration_length,
            "precision_bands": [list(band) for band in config.precision_bands],
            "group_size": config.group_size,
        },
    )
    report.wall_seconds = time.perf_counter() - started
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    files = finetuned_reader.tokenizer_files() if grown_rows else []
    max_bytes = math.floor(budget * fp16_delta_bytes) if budget is not None else None
    _write_pack(output_dir, tensors, pack_config, report, files, overwrite, max_bytes)
    return report


def _validated_specs(
    model: nn.Module, base: CheckpointReader, finetuned: CheckpointReader, config: GraftConfig
) -> tuple[list[ModuleSpec], str | None]:
    """Module specs of the checkpoints, after checking that they match; nothing is read but headers."""
    for key in ("model_type", "architectures"):
        if base.config.get(key) != finetuned.config.get(key):
            raise CheckpointMismatchError(
                f"base and fine-tune differ in {key}: {base.config.get(key)!r} vs {finetuned.config.get(key)!r}; "
                "a SkillPack needs the fine-tune of this very base architecture"
            )
    tied_head = tied_output_embedding(model)
    specs = []
    covered = set()
    for spec in module_specs(model, config.role_override):
        if spec.role == "embed" and spec.transposed:
            raise CheckpointMismatchError(
                f"{spec.name} is a Conv1D; the 'embed' role (magnitude pruning) needs an Embedding or Linear module"
            )
        if spec.name == tied_head and spec.weight not in base:
            if spec.weight in finetuned:
                raise CheckpointMismatchError(
                    f"the base ties {spec.name} to the input embedding but the fine-tune stores its own {spec.weight}: "
                    "untied fine-tunes of tied bases are not supported"
                )
            continue  # the tied weight is the embedding's: its delta travels with the embedding
        for key in (spec.weight, spec.bias):
            if key is None:
                continue
            covered.add(key)
            for reader, other in ((base, "base"), (finetuned, "fine-tune")):
                if key not in reader:
                    raise MissingTensorError(f"{key} is missing from the {other} checkpoint ({reader.source})")
            base_shape, tuned_shape = base.shape(key), finetuned.shape(key)
            grows = spec.kind in ("embedding", "linear") and spec.role == "embed" and key == spec.weight
            if base_shape != tuned_shape and not (
                grows and tuned_shape[1:] == base_shape[1:] and tuned_shape[0] > base_shape[0]
            ):
                raise CheckpointMismatchError(
                    f"{key} has shape {base_shape} in the base but {tuned_shape} in the fine-tune; only embedding "
                    "rows may grow (added tokens)"
                )
        specs.append(spec)
    for name in finetuned.names():
        if name not in covered and _is_float(finetuned.dtype(name)):
            if name not in base:
                raise MissingTensorError(f"the fine-tune has {name}, which the base checkpoint lacks")
            if base.shape(name) != finetuned.shape(name):
                raise CheckpointMismatchError(f"{name} changed shape: {base.shape(name)} vs {finetuned.shape(name)}")
            specs.append(
                ModuleSpec(name=name, kind="parameter", role="dense", weight=name, bias=None, layer_index=None)
            )
    return specs, tied_head


def _grown_rows(specs: list[ModuleSpec], base: CheckpointReader, finetuned: CheckpointReader) -> dict[str, int]:
    """Base row counts of the embedding matrices the fine-tune grew (added tokens)."""
    return {
        spec.name: base.shape(spec.weight)[0]
        for spec in specs
        if spec.role == "embed" and base.shape(spec.weight)[0] != finetuned.shape(spec.weight)[0]
    }


class _Compressor:
    """Compress one module's delta according to its role, the config, and an optional budget plan."""

    # Embedding matrices are streamed in blocks of rows, so the largest delta is never held whole.
    ROW_BLOCK = 4096

    def __init__(self, base, finetuned, config, plan, grown_rows, act_order, damp) -> None:
        self.base, self.finetuned, self.config = base, finetuned, config
        self.plan: BudgetPlan | None = plan
        self.grown_rows = grown_rows
        self.act_order, self.damp = act_order, damp

    def delta(self, key: str) -> torch.Tensor:
        return self.delta_rows(key, 0, self.finetuned.shape(key)[0] if self.finetuned.shape(key) else 1)

    def delta_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a delta; rows a fine-tune added to an embedding are relative to zero."""
        tuned = self.finetuned.get_rows(key, start, stop).float()
        base_rows = self.base.shape(key)[0] if self.base.shape(key) else 1
        base = self.base.get_rows(key, min(start, base_rows), min(stop, base_rows)).float()
        if base.shape != tuned.shape:
            base = torch.cat([base, base.new_zeros(tuned.shape[0] - base.shape[0], *tuned.shape[1:])])
        delta = tuned - base
        if not bool(torch.isfinite(delta).all()):
            raise NonFiniteDeltaError(f"the delta of {key} holds NaN or Inf; check the fine-tune's weights")
        return delta

    def row_blocks(self, key: str) -> Iterable[tuple[int, torch.Tensor]]:
        rows = self.finetuned.shape(key)[0]
        for start in range(0, rows, self.ROW_BLOCK):
            yield start, self.delta_rows(key, start, min(start + self.ROW_BLOCK, rows))

    def compress(self, spec: ModuleSpec, hessian: torch.Tensor | None = None) -> _Compressed | None:
        if spec.role == "skip":
            return None
        bias_delta = self.delta(spec.bias) if spec.bias is not None else None
        if bias_delta is not None and not bias_delta.any():
            bias_delta = None
        if spec.role == "embed":
            item = self._sparse(spec)
        else:
            weight_delta = self.delta(spec.weight)
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
            report = ModuleReport(spec.name, spec.role, "bias", list(bias_delta.shape))
            item = _Compressed({}, report, None)
        if bias_delta is not None:
            item.tensors["graft_bias"] = bias_delta.to(torch.float16)
            item.bias_delta = bias_delta.to(torch.float16).float()
            item.report.bytes += 2 * bias_delta.numel()
        return item

    def _dense(self, spec, logical) -> _Compressed:
        stored = logical.to(torch.float16)
        report = ModuleReport(
            spec.name,
            spec.role,
            "dense",
            list(logical.shape),
            bytes=2 * logical.numel(),
            frobenius_error=_relative(logical, stored.float()),
        )
        return _Compressed({"graft_values": stored}, report, ("dense", stored.float()))

    def _sparse(self, spec) -> _Compressed | None:
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
        for start, delta in self.row_blocks(spec.weight):
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
            dense = torch.cat([delta for _, delta in self.row_blocks(spec.weight)]).to(torch.float16)
            if keep < head_rows * cols:
                mask = torch.zeros(rows * cols, dtype=torch.bool)
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
        form = "sparse" if "graft_indices" in tensors else "dense"
        report = ModuleReport(
            spec.name,
            spec.role,
            form,
            list(shape),
            density=kept_indices.numel() / (head_rows * cols),
            bytes=tensors_nbytes(tensors),
            frobenius_error=math.sqrt(max(0.0, total - kept_energy) + rounding) / math.sqrt(total),
        )
        return _Compressed(tensors, report, ("sparse", (indices, values)))

    def _lowrank(self, spec, logical, hessian) -> _Compressed | None:
        out_features, in_features = logical.shape
        if self.plan is not None:
            if spec.name in self.plan.dense:
                return self._dense(spec, logical)
            bits = self.plan.lowrank.get(spec.name, [])
            if not bits:
                return None
            factors = factorize(logical, rank=len(bits))
            slices = _runs(bits)
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
        tensors = encode_lowrank(
            factors.u,
            factors.s,
            factors.v,
            slices,
            self.config.group_size,
            hessian=hessian,
            act_order=self.act_order,
            damp=self.damp,
        )
        u, s, v = decode_lowrank(tensors)
        restored = (u * s) @ v.T
        report = ModuleReport(
            spec.name,
            spec.role,
            "lowrank",
            [out_features, in_features],
            rank=factors.rank,
            bands=[[b.stop - b.start, b.bits] for b in slices],
            bytes=tensors_nbytes(tensors),
            frobenius_error=_relative(logical, restored),
            svd=factors.method,
            output_error=output_error(logical, restored, hessian) if hessian is not None else None,
        )
        return _Compressed(tensors, report, ("lowrank", (u, s, v)))


def _plan(specs, base, finetuned, config, budget_bytes, grown_rows, progress) -> BudgetPlan:
    """First pass of budget mode: spectra and magnitudes of every delta, then the greedy allocation."""
    compressor = _Compressor(base, finetuned, config, None, grown_rows, True, 0.01)
    affordable_entries = budget_bytes // 6  # no sparse module can keep more entries than the whole budget buys
    mandatory = 0
    lowrank, sparse = [], []
    for spec in tqdm(specs, desc="planning budget", unit="module", disable=not progress):
        if spec.role == "skip":
            continue
        if spec.bias is not None and compressor.delta(spec.bias).any():
            mandatory += 2 * base.numel(spec.bias) + header_bytes(spec.name, 1)
        if spec.role == "embed":
            rows, cols = finetuned.shape(spec.weight)
            head_rows = grown_rows.get(spec.name, rows)
            if head_rows < rows:
                mandatory += 2 * (rows - head_rows) * cols + header_bytes(spec.name, 2)
            largest = LargestEntries(affordable_entries, positions=False)
            for start, delta in compressor.row_blocks(spec.weight):
                largest.add(delta[: max(0, head_rows - start)].reshape(-1).pow(2))
            squared = largest.result()[1]
            if squared.numel():
                sparse.append(SparseCandidate(spec.name, head_rows * cols, squared.sort(descending=True).values))
            continue
        delta = compressor.delta(spec.weight)
        if not delta.any():
            continue
        logical = delta.T if spec.transposed else delta
        if spec.role == "dense" or logical.dim() != 2:
            mandatory += dense_bytes(spec.name, logical.numel())
        else:
            lowrank.append(LowRankCandidate(spec.name, logical.shape[0], logical.shape[1], singular_values(logical)))
    try:
        return plan_budget(budget_bytes, mandatory, lowrank, sparse, config.group_size)
    except ValueError as error:
        raise BudgetError(str(error)) from error


def _runs(bits: Sequence[int]) -> list[BandSlice]:
    """Contiguous runs of equal bit widths as band slices."""
    slices, start = [], 0
    for index in range(1, len(bits) + 1):
        if index == len(bits) or bits[index] != bits[start]:
            slices.append(BandSlice(start, index, bits[start]))
            start = index
    return slices


def _extract_calibrated(compressor, specs, base_folder, finetuned, texts, length, batch_size, progress) -> dict:
    """Sequential, layer-by-layer extraction with GPTQ (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from .model import grow_vocabulary

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    model.config.use_cache = False
    if compressor.grown_rows:
        grow_vocabulary(model, max(finetuned.shape(s.weight)[0] for s in specs if s.name in compressor.grown_rows))
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    batches = _tokenized_batches(base_folder, finetuned, texts, length, batch_size)
    _, layers = decoder_layers(model)
    compressed: dict[str, _Compressed | None] = {}

    def apply(spec: ModuleSpec, item: _Compressed | None) -> None:
        """Set the in-memory module to base + compressed delta (the base stays readable from disk)."""
        weight = parameters[spec.weight].data
        bias = parameters[spec.bias].data if spec.bias is not None else None
        for key, target in ((spec.weight, weight), (spec.bias, bias)):
            if key is None:
                continue
            stored = compressor.base.get(key).float()
            target.zero_()  # rows a fine-tune added (grown vocabulary) start from zero
            target[: stored.shape[0]] = stored
        if item is not None:
            item.apply_to(weight, bias, spec.transposed)

    for spec in (s for s in specs if s.layer_index is None):  # embeddings, final norm, lm_head: data-free
        compressed[spec.name] = compressor.compress(spec)
        if spec.kind != "parameter":
            apply(spec, compressed[spec.name])

    masks = [mask for _, mask in batches]
    inputs = _first_layer_inputs(model, layers[0], batches)
    for index, layer in enumerate(tqdm(layers, desc="extracting (calibrated)", unit="layer", disable=not progress)):
        layer_specs = [s for s in specs if s.layer_index == index]
        for spec in layer_specs:  # capture with the fine-tuned layer: the pack should reproduce its activations
            for key in (spec.weight, spec.bias):
                if key is not None:
                    parameters[key].data.copy_(compressor.finetuned.get(key).float())
        collector = _HessianCollector(
            {
                s.name: modules[s.name]
                for s in layer_specs
                if s.role in ("attn", "mlp") and s.kind in ("linear", "conv1d")
            }
        )
        with torch.no_grad(), collector:
            for (args, kwargs), mask in zip(inputs, masks, strict=True):
                collector.mask = mask
                layer(*args, **kwargs)
        for spec in layer_specs:
            compressed[spec.name] = compressor.compress(spec, collector.hessians.get(spec.name))
            apply(spec, compressed[spec.name])
        with torch.no_grad():
            inputs = [_with_hidden(args, kwargs, _hidden(layer(*args, **kwargs))) for args, kwargs in inputs]
    return compressed


class _HessianCollector:
    """Forward hooks accumulating ``H = XᵀX`` of each module's inputs over the non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.hessians: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> _HessianCollector:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().float()
            x = x[self.mask] if self.mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1])
            contribution = x.T @ x
            self.hessians[name] = self.hessians[name] + contribution if name in self.hessians else contribution

        return hook


class _StopForward(Exception):
    pass


def _first_layer_inputs(model, first_layer, batches) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments the first decoder layer receives for each calibration batch."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for input_ids, mask in batches:
                with contextlib.suppress(_StopForward):
                    model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same layer call with new hidden states (passed positionally or as ``hidden_states=``)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _tokenized_batches(base_folder, finetuned, texts, length, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer

    source = base_folder if any(Path(base_folder).glob("tokenizer*")) else str(finetuned.folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=length
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"].bool()))
    return batches


def load_texts(source, limit: int | None = None, what: str = "calibration") -> list[str]:
    """Non-empty texts from a list, a datasets.Dataset (``text`` column) or a .jsonl (``{"text": ...}`` per line) /
    .txt (one text per line) path; at most `limit`."""
    calibration = source
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
            texts = [row["text"] if isinstance(row, dict) else str(row) for row in rows]
        else:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif hasattr(calibration, "column_names"):
        if "text" not in calibration.column_names:
            raise ValueError(f"the {what} dataset needs a 'text' column; it has {calibration.column_names}")
        texts = list(calibration["text"])
    else:
        texts = [str(text) for text in calibration]
    texts = [text for text in texts if text.strip()][:limit]
    if not texts:
        raise ValueError(f"the {what} data holds no text")
    return texts


def _pack_config(config, compressed, base_reader, grown_rows, tied_head) -> GraftConfig:
    lowrank = {name: item.report.rank for name, item in compressed.items() if item.report.form == "lowrank"}
    sparse = {name: item.report.density for name, item in compressed.items() if item.report.form == "sparse"}
    vocab = max((item.report.shape[0] for name, item in compressed.items() if name in grown_rows), default=None)
    return dataclasses.replace(
        config,
        target_modules=sorted(name for name in compressed if tied_head is None or name != tied_head),
        rank_pattern=dict(sorted(lowrank.items())),
        density_pattern={name: float(density) for name, density in sorted(sparse.items())},
        base_model_name_or_path=base_reader.source,
        revision=base_reader.commit or base_reader.revision,
        task_type=config.task_type or "CAUSAL_LM",
        inference_mode=True,
        vocab_size=vocab,
        target_modules_to_tie=None,
    )


def _write_pack(
    output_dir: Path, tensors, config: GraftConfig, report: ExtractionReport, files, overwrite, max_bytes
) -> None:
    """Write the pack atomically, so no partial pack ever looks valid."""

    def write(staging: Path) -> None:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        report.pack_bytes = (staging / ADAPTER_WEIGHTS).stat().st_size
        if max_bytes is not None and report.pack_bytes > max_bytes:
            raise BudgetError(
                f"the planned pack is {report.pack_bytes} bytes, over the budget of {max_bytes} bytes "
                "(a planner bug: please report it)"
            )
        config.save_pretrained(str(staging))
        for file in files:
            shutil.copy2(file, staging / file.name)
        (staging / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        write_pack_card(staging, repo_id=output_dir.name)

    write_folder(output_dir, write, overwrite=overwrite)


def _relative(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    norm = float(reference.double().norm())
    return float((reference.double() - approximation.double()).norm()) / norm if norm else 0.0


def _is_float(dtype: str) -> bool:
    return dtype.upper() in ("F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64")


__all__ = ["ExtractionReport", "ModuleReport", "extract_skillpack"]
