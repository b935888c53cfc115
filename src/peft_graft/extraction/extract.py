"""SkillPack extraction: compress ``Δθ = θ_finetuned − θ_base`` module by module into a GRAFT pack.

Checkpoints are read tensor by tensor; the fine-tune is never loaded as a model. The work goes unit by unit (a module
outside the decoder layers, or one decoder layer), and each finished unit is written to the work folder (see
staging.py), so memory holds one unit, not the pack, and a stopped run can resume. Data-free extraction holds one
module's delta at a time; calibrated extraction (calibration.py) holds one decoder layer of the base at a time.

Everything is checked before anything is written; the pack folder is assembled from the finished units at the end,
written to a temporary folder next to the output and renamed into place.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import GraftConfig
from ..errors import BudgetError, CheckpointMismatchError, GraftError, MissingTensorError
from ..pack import layout
from ..pack.folder import is_pack_folder, write_pack
from ..pack.provenance import base_parameters, fingerprint_checkpoint
from ..utils.atomic import check_replaceable
from .calibration import extract_calibrated, load_texts, token_frequencies, tokenized_batches
from .checkpoint import CheckpointReader
from .compressor import Compressor, compress_unit
from .delta import DeltaReader
from .devices import DevicePool, resolve_devices
from .options import ExtractionOptions
from .plan import cached_spectrum, plan_extraction
from .report import ExtractionReport, ModuleReport, peak_rss_bytes
from .roles import ModuleSpec, meta_model, module_specs, tied_output_embedding
from .staging import Staging, fingerprint_of

logger = logging.getLogger(__name__)


def extract_skillpack(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: GraftConfig | None = None,
    options: ExtractionOptions | None = None,
    *,
    calibration: Iterable[str] | Any | None = None,
    **option_keywords: Any,
) -> ExtractionReport:
    """Compress a fine-tune's delta against its base into a SkillPack folder that loads with ``PeftModel``.

    Args:
        base, finetuned: local folders or Hub repo ids (safetensors checkpoints, sharded or not).
        output_dir: the pack folder to create (refused if it exists, unless ``overwrite``).
        config: the compression policy (roles, ranks, energy, density, precision bands); ``GraftConfig()`` if None.
        options: how to run (budget, device, GPTQ settings, revisions, resume, ...): an :class:`ExtractionOptions`,
            or its fields as keywords (``budget=1/16, device="cuda"``), which override the object's.
        calibration: texts (a list of strings, a ``datasets.Dataset`` with a ``text`` column, or a path to a
            ``.jsonl``/``.txt`` file) for GPTQ; None gives round-to-nearest (data-free).
    """
    started = time.perf_counter()
    options = ExtractionOptions.from_keywords(options, option_keywords)
    devices = resolve_devices(options.device, options.devices)
    device = devices[0]
    config = config if config is not None else GraftConfig()
    output_dir = Path(output_dir)
    check_replaceable(output_dir, options.overwrite, is_pack_folder, "SkillPack folder")
    base_reader = CheckpointReader(
        base, revision=options.base_revision, token=options.token, allow_pickle=options.allow_pickle
    )
    finetuned_reader = CheckpointReader(
        finetuned, revision=options.finetuned_revision, token=options.token, allow_pickle=options.allow_pickle
    )
    deltas = DeltaReader(base_reader, finetuned_reader, device)
    device_deltas = [deltas] + [DeltaReader(base_reader, finetuned_reader, other) for other in devices[1:]]
    architecture = meta_model(str(base_reader.folder))
    specs, tied_head = _validated_specs(architecture, base_reader, finetuned_reader, config)
    grown_rows = _grown_rows(specs, base_reader, finetuned_reader)
    fp16_delta_bytes = 2 * sum(
        finetuned_reader.numel(name) for name in finetuned_reader.names() if _is_float(finetuned_reader.dtype(name))
    )
    budget_bytes = math.floor(options.budget * fp16_delta_bytes) if options.budget is not None else None
    texts = load_texts(calibration, options.calibration_samples) if calibration is not None else None
    staging = Staging(
        output_dir,
        _fingerprint(base_reader, finetuned_reader, config, options, device, texts),
        resume=options.resume,
    )

    run = _Run(
        staging, specs, device_deltas, config, options, device, texts, budget_bytes, grown_rows, tied_head,
        architecture, fp16_delta_bytes, output_dir, started, str(base), str(finetuned),
    )  # fmt: skip
    try:
        report = _extract(run)
    except GraftError:
        staging.remove()  # a bad input or setting: resuming would fail the same way
        raise
    except BaseException:
        if not staging.any_finished():
            staging.remove()
        else:
            logger.warning("extraction stopped; rerun with resume=True (--resume) to continue from %s", staging.path)
        raise
    staging.remove()
    return report


@dataclass
class _Run:
    """Everything one extraction works with, checked and resolved before any work is done."""

    staging: Staging
    specs: list[ModuleSpec]
    device_deltas: list[DeltaReader]  # one per device, the first device's first
    config: GraftConfig
    options: ExtractionOptions
    device: torch.device
    texts: list[str] | None
    budget_bytes: int | None
    grown_rows: dict[str, int]
    tied_head: str | None
    architecture: nn.Module
    fp16_delta_bytes: int
    output_dir: Path
    started: float
    base: str
    finetuned: str


def _extract(run: _Run) -> ExtractionReport:
    """Plan (budget mode), compress unit by unit into the work folder, then assemble the pack."""
    staging, options, config = run.staging, run.options, run.config
    base_reader, finetuned_reader = run.device_deltas[0].base, run.device_deltas[0].finetuned
    batches = (
        tokenized_batches(
            str(base_reader.folder), finetuned_reader, run.texts, options.calibration_length, options.batch_size
        )
        if run.texts
        else None
    )
    # calibrated: embedding rows count by their tokens' frequency (in planning and in what sparse forms keep)
    frequencies = token_frequencies(batches) if batches and options.row_weights else None
    stages = {"setup": time.perf_counter() - run.started}
    plan = staging.plan()
    if run.budget_bytes is not None and plan is None:
        try:
            plan = plan_extraction(
                run.specs, DevicePool(run.device_deltas), config, run.budget_bytes, run.grown_rows, staging,
                options.progress, options.forms, frequencies,
            )  # fmt: skip
        except BudgetError as error:  # in the caller's unit: a fraction of the fp16 delta
            smallest = error.needed_bytes / run.fp16_delta_bytes if error.needed_bytes else None
            advice = f"; the smallest budget that keeps any module is {smallest:.3g}" if smallest else ""
            raise BudgetError(
                f"a budget of {options.budget:.4g} of the fp16 delta is too small: {error}{advice}",
                budget=options.budget,
                smallest=smallest,
                needed_bytes=error.needed_bytes,
            ) from None
        staging.save_plan(plan)
    stages["planning"] = time.perf_counter() - run.started - sum(stages.values())

    spectra = (lambda name: cached_spectrum(staging, name)) if plan is not None else None
    compressors = DevicePool(
        [
            Compressor(
                deltas,
                config,
                plan,
                run.grown_rows,
                options.act_order,
                options.damp,
                spectra,
                options.layer_replan,
                frequencies,
            )
            for deltas in run.device_deltas
        ]
    )
    units = _units(run.specs)
    if batches:
        reports = extract_calibrated(
            compressors, units, staging, str(base_reader.folder), batches, run.device, options.progress
        )
    else:
        bar = tqdm(total=len(units), desc="extracting", unit="unit", disable=not options.progress)

        def unit_reports(compressor: Compressor, position: int) -> list[ModuleReport]:
            # a whole unit on one device: with several, layers compress side by side
            done = compress_unit(DevicePool([compressor]), staging, position, units[position], {})
            bar.update()
            return done

        with bar:
            reports = [report for done in compressors.map(unit_reports, range(len(units))) for report in done]
    if not reports:
        raise CheckpointMismatchError("the fine-tune is identical to the base: there is no delta to pack")
    stages["compression"] = time.perf_counter() - run.started - sum(stages.values())

    by_name = {report.name: report for report in reports}
    pack_config = _pack_config(config, by_name, base_reader, run.grown_rows, run.tied_head)
    pack_config.base_model_fingerprint = fingerprint_checkpoint(base_reader, base_parameters(run.architecture))
    pack_config.pack_info = {
        **config.pack_info,
        "skill": options.skill or config.pack_info.get("skill"),
        "finetuned": finetuned_reader.source,
        "finetuned_revision": finetuned_reader.commit or options.finetuned_revision,
        "calibrated": bool(run.texts),
        "budget": options.budget,
        **({"forms": options.forms} if options.budget is not None else {}),
        "fp16_delta_bytes": run.fp16_delta_bytes,
    }
    report = ExtractionReport(
        base=run.base,
        finetuned=run.finetuned,
        calibrated=bool(run.texts),
        budget=options.budget,
        modules=reports,
        fp16_delta_bytes=run.fp16_delta_bytes,
        settings={
            "act_order": options.act_order,
            "damp": options.damp,
            "calibration_samples": len(run.texts) if run.texts else 0,
            "calibration_length": options.calibration_length,
            "precision_bands": [list(band) for band in config.precision_bands],
            "group_size": config.group_size,
            "device": str(run.device),
            **({"devices": [str(deltas.device) for deltas in run.device_deltas]} if len(run.device_deltas) > 1 else {}),
        },
    )
    layers = len({spec.layer_index for spec in run.specs if spec.layer_index is not None})

    def report_for(pack_bytes: int) -> dict[str, Any]:
        report.pack_bytes = pack_bytes
        report.wall_seconds = time.perf_counter() - run.started
        report.stage_seconds = {
            **stages,
            "writing": report.wall_seconds - sum(stages.values()),
            "per_layer": stages["compression"] / max(layers, 1),
        }
        report.peak_rss_bytes = peak_rss_bytes()
        return report.to_dict()

    write_pack(
        run.output_dir,
        staging.entries(range(len(units))),
        pack_config,
        report=report_for,
        files=finetuned_reader.tokenizer_files() if run.grown_rows else [],
        overwrite=options.overwrite,
        max_bytes=run.budget_bytes,
    )
    return report


def _units(specs: list[ModuleSpec]) -> list[list[ModuleSpec]]:
    """The order of work: each module outside the decoder layers on its own, then each decoder layer whole."""
    outside = [[spec] for spec in specs if spec.layer_index is None]
    layers: dict[int, list[ModuleSpec]] = {}
    for spec in specs:
        if spec.layer_index is not None:
            layers.setdefault(spec.layer_index, []).append(spec)
    return outside + [layers[index] for index in sorted(layers)]


# The options that change a pack's bytes, which a resumed run must share with the stopped one.
_RESUME_OPTIONS = (
    "budget",
    "forms",
    "layer_replan",
    "row_weights",
    "act_order",
    "damp",
    "calibration_samples",
    "calibration_length",
    "batch_size",
)


def _fingerprint(base, finetuned, config: GraftConfig, options: ExtractionOptions, device, texts) -> str:
    """What a resumed run must share with the stopped one: inputs, policy, and every setting that changes bytes."""
    return fingerprint_of(
        {
            "base": [base.source, base.commit or base.revision],
            "finetuned": [finetuned.source, finetuned.commit or finetuned.revision],
            "config": config.to_dict(),
            "options": {key: getattr(options, key) for key in _RESUME_OPTIONS},
            "device": device.type,
            "calibration": fingerprint_of({"texts": texts}) if texts else None,
        }
    )


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


def _pack_config(config, reports: dict[str, ModuleReport], base_reader, grown_rows, tied_head) -> GraftConfig:
    """The pack's GraftConfig: the policy, plus what extraction decided per module and where the base came from."""
    lowrank = {name: report.rank for name, report in reports.items() if report.form == layout.LOWRANK}
    sparse = {name: report.density for name, report in reports.items() if report.form == layout.SPARSE}
    vocab = max((report.shape[0] for name, report in reports.items() if name in grown_rows), default=None)
    return dataclasses.replace(
        config,
        target_modules=sorted(name for name in reports if tied_head is None or name != tied_head),
        rank_pattern=dict(sorted(lowrank.items())),
        density_pattern={name: float(density) for name, density in sorted(sparse.items())},
        base_model_name_or_path=base_reader.source,
        revision=base_reader.commit or base_reader.revision,
        task_type=config.task_type or "CAUSAL_LM",
        inference_mode=True,
        vocab_size=vocab,
        target_modules_to_tie=None,
    )


def _is_float(dtype: str) -> bool:
    return dtype.upper() in ("F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64")
