"""SkillPack extraction: compress ``Δθ = θ_finetuned − θ_base`` module by module into a GRAFT pack.

Checkpoints are read tensor by tensor; the fine-tune is never loaded as a model. Data-free extraction holds one
module's delta at a time. Calibrated extraction (see calibration.py) holds the base model and walks it layer by layer.

Everything is checked and computed before anything is written; the pack is written to a temporary folder next to
the output and renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..config import GraftConfig
from ..errors import CheckpointMismatchError, MissingTensorError
from ..pack import layout
from ..pack.folder import write_pack
from ..pack.provenance import base_parameters, fingerprint_checkpoint
from .calibration import extract_calibrated, load_texts
from .checkpoint import CheckpointReader
from .compressor import Compressor
from .delta import DeltaReader
from .options import ExtractionOptions
from .plan import plan_extraction
from .report import ExtractionReport
from .roles import ModuleSpec, meta_model, module_specs, tied_output_embedding


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
        options: how to run (budget, GPTQ settings, revisions, overwrite, ...): an :class:`ExtractionOptions`, or its
            fields as keywords (``budget=1/16, progress=False``), which override the object's.
        calibration: texts (a list of strings, a ``datasets.Dataset`` with a ``text`` column, or a path to a
            ``.jsonl``/``.txt`` file) for GPTQ; None gives round-to-nearest (data-free).
    """
    started = time.perf_counter()
    options = ExtractionOptions.from_keywords(options, option_keywords)
    config = config if config is not None else GraftConfig()
    output_dir = Path(output_dir)
    if output_dir.exists() and not options.overwrite:
        raise FileExistsError(f"{output_dir} already exists; choose another folder or pass overwrite=True")
    base_reader = CheckpointReader(
        base, revision=options.base_revision, token=options.token, allow_pickle=options.allow_pickle
    )
    finetuned_reader = CheckpointReader(
        finetuned, revision=options.finetuned_revision, token=options.token, allow_pickle=options.allow_pickle
    )
    deltas = DeltaReader(base_reader, finetuned_reader)
    architecture = meta_model(str(base_reader.folder))
    specs, tied_head = _validated_specs(architecture, base_reader, finetuned_reader, config)
    grown_rows = _grown_rows(specs, base_reader, finetuned_reader)
    fp16_delta_bytes = 2 * sum(
        finetuned_reader.numel(name) for name in finetuned_reader.names() if _is_float(finetuned_reader.dtype(name))
    )
    budget_bytes = math.floor(options.budget * fp16_delta_bytes) if options.budget is not None else None

    plan = None
    if budget_bytes is not None:
        plan = plan_extraction(specs, deltas, config, budget_bytes, grown_rows, options.progress)

    texts = load_texts(calibration, options.calibration_samples) if calibration is not None else None
    compressor = Compressor(deltas, config, plan, grown_rows, options.act_order, options.damp)
    if texts:
        compressed = extract_calibrated(
            compressor,
            specs,
            str(base_reader.folder),
            finetuned_reader,
            texts,
            options.calibration_length,
            options.batch_size,
            options.progress,
        )
    else:
        modules = tqdm(specs, desc="extracting", unit="module", disable=not options.progress)
        compressed = {spec.name: compressor.compress(spec) for spec in modules}
    compressed = {name: item for name, item in compressed.items() if item is not None}
    if not compressed:
        raise CheckpointMismatchError("the fine-tune is identical to the base: there is no delta to pack")

    pack_config = _pack_config(config, compressed, base_reader, grown_rows, tied_head)
    pack_config.base_model_fingerprint = fingerprint_checkpoint(base_reader, base_parameters(architecture))
    pack_config.pack_info = {
        **config.pack_info,
        "skill": options.skill or config.pack_info.get("skill"),
        "finetuned": finetuned_reader.source,
        "finetuned_revision": finetuned_reader.commit or options.finetuned_revision,
        "calibrated": bool(texts),
        "budget": options.budget,
        "fp16_delta_bytes": fp16_delta_bytes,
    }
    report = ExtractionReport(
        base=str(base),
        finetuned=str(finetuned),
        calibrated=bool(texts),
        budget=options.budget,
        modules=[item.report for item in compressed.values()],
        fp16_delta_bytes=fp16_delta_bytes,
        settings={
            "act_order": options.act_order,
            "damp": options.damp,
            "calibration_samples": len(texts) if texts else 0,
            "calibration_length": options.calibration_length,
            "precision_bands": [list(band) for band in config.precision_bands],
            "group_size": config.group_size,
        },
    )
    report.wall_seconds = time.perf_counter() - started
    report.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def report_for(pack_bytes: int) -> dict[str, Any]:
        report.pack_bytes = pack_bytes
        return report.to_dict()

    write_pack(
        output_dir,
        {name: item.tensors for name, item in compressed.items()},
        pack_config,
        report=report_for,
        files=finetuned_reader.tokenizer_files() if grown_rows else [],
        overwrite=options.overwrite,
        max_bytes=budget_bytes,
    )
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


def _grown_rows(specs: list[ModuleSpec], base: CheckpointReader, finetuned: CheckpointReader) -> dict[str, int]:
    """Base row counts of the embedding matrices the fine-tune grew (added tokens)."""
    return {
        spec.name: base.shape(spec.weight)[0]
        for spec in specs
        if spec.role == "embed" and base.shape(spec.weight)[0] != finetuned.shape(spec.weight)[0]
    }


def _pack_config(config, compressed, base_reader, grown_rows, tied_head) -> GraftConfig:
    """The pack's GraftConfig: the policy, plus what extraction decided per module and where the base came from."""
    lowrank = {name: item.report.rank for name, item in compressed.items() if item.report.form == layout.LOWRANK}
    sparse = {name: item.report.density for name, item in compressed.items() if item.report.form == layout.SPARSE}
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


def _is_float(dtype: str) -> bool:
    return dtype.upper() in ("F16", "BF16", "F32", "F64", "FLOAT16", "BFLOAT16", "FLOAT32", "FLOAT64")
