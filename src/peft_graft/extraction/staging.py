"""The work folder of one extraction: what is finished, on disk, so memory does not grow and a stopped run resumes.

``.<output name>.extracting`` sits next to the output folder. It holds a manifest (a fingerprint of the inputs and
every setting that changes the pack's bytes), the budget plan once made, cached singular vectors from planning, the
calibration inputs of the next layer (calibrated mode), and one safetensors file plus one report file per finished
unit (a decoder layer, or a module outside the layers). The report is written last, so a unit counts as finished only
when both exist. Nothing here looks like a pack: the pack folder is assembled from the units at the very end, written
atomically, and the work folder is then removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import GraftConfigError
from ..pack import layout
from ..utils.atomic import write_file
from ..utils.safetensors_io import TensorEntry, read_safetensors_header
from .budget import BudgetPlan
from .report import ModuleReport

logger = logging.getLogger(__name__)

STAGING_FORMAT = 1
_MANIFEST = "manifest.json"
_PLAN = "plan.json"


def fingerprint_of(settings: dict[str, Any]) -> str:
    """A stable hash of JSON-able settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class Staging:
    """The work folder for extracting into `output_dir`. With `resume`, a folder left by a stopped run with the same
    fingerprint is continued; a folder with another fingerprint is refused. Without it, a leftover folder is cleared."""

    def __init__(self, output_dir: Path, fingerprint: str, *, resume: bool) -> None:
        self.path = output_dir.parent / f".{output_dir.name}.extracting"
        manifest = {"format": STAGING_FORMAT, "fingerprint": fingerprint}
        found = _read(self.path / _MANIFEST)
        if found is not None and resume and found != manifest:
            raise GraftConfigError(
                f"cannot resume into {output_dir}: the stopped run in {self.path} used other inputs or settings. "
                "Run without --resume to start over (it clears that folder), or repeat the stopped run's settings.",
                field="resume",
            )
        if found is not None and not resume and self.path.exists():
            logger.warning(
                "clearing %s, left by an extraction that did not finish (pass --resume to continue)", self.path
            )
        if self.path.exists() and not (resume and found == manifest):
            shutil.rmtree(self.path)
        (self.path / "units").mkdir(parents=True, exist_ok=True)
        (self.path / "spectra").mkdir(exist_ok=True)
        if found != manifest:
            write_file(self.path / _MANIFEST, json.dumps(manifest, indent=2) + "\n")
        self.resumed = found == manifest and resume

    # ----- units -----------------------------------------------------------------------------------------------

    def _unit(self, position: int) -> tuple[Path, Path]:
        return self.path / "units" / f"{position:05d}.safetensors", self.path / "units" / f"{position:05d}.json"

    def finished(self, position: int) -> list[ModuleReport] | None:
        """The module reports of a finished unit, or None if it is not finished."""
        tensors, reports = self._unit(position)
        data = _read(reports)
        if data is None or not tensors.is_file():
            return None
        return [ModuleReport(**report) for report in data]

    def any_finished(self) -> bool:
        return any((self.path / "units").glob("*.json"))

    def write_unit(
        self, position: int, modules: dict[str, dict[str, torch.Tensor]], reports: list[ModuleReport]
    ) -> None:
        """Store a finished unit: its modules' pack tensors (relative keys) and reports."""
        tensors_file, reports_file = self._unit(position)
        tensors = {
            layout.pack_key(name, key): tensor.detach().cpu().contiguous()
            for name, module in modules.items()
            for key, tensor in module.items()
        }
        partial = tensors_file.with_suffix(".partial")
        # no metadata: safetensors 0.4 writes a malformed header for metadata without tensors (a unit that kept none)
        save_file(tensors, partial)
        os.replace(partial, tensors_file)
        write_file(reports_file, json.dumps([asdict(report) for report in reports]) + "\n")

    def unit_tensors(self, position: int) -> dict[str, dict[str, torch.Tensor]]:
        """A finished unit's pack tensors, by module (relative keys)."""
        tensors_file, _ = self._unit(position)
        return layout.modules_of(load_file(tensors_file)) if tensors_file.is_file() else {}

    def entries(self, positions: range) -> dict[str, TensorEntry]:
        """Where every staged tensor is, over the given units (for assembling the pack file)."""
        entries: dict[str, TensorEntry] = {}
        for position in positions:
            entries.update(read_safetensors_header(self._unit(position)[0]))
        return entries

    # ----- the budget plan and cached singular vectors ------------------------------------------------------

    def plan(self) -> BudgetPlan | None:
        data = _read(self.path / _PLAN)
        if data is None:
            return None
        return BudgetPlan(
            lowrank={name: list(bits) for name, bits in data["lowrank"].items()},
            dense=set(data["dense"]),
            sparse=dict(data["sparse"]),
            quantized=dict(data.get("quantized", {})),
            directions={name: list(order) for name, order in data.get("directions", {}).items()},
            planned_bytes=data["planned_bytes"],
            forms=data.get("forms", "any"),
        )

    def save_plan(self, plan: BudgetPlan) -> None:
        data = {
            "lowrank": plan.lowrank,
            "dense": sorted(plan.dense),
            "sparse": plan.sparse,
            "quantized": plan.quantized,
            "directions": plan.directions,
            "planned_bytes": plan.planned_bytes,
            "forms": plan.forms,
        }
        write_file(self.path / _PLAN, json.dumps(data) + "\n")

    def _spectrum_file(self, name: str) -> Path:
        return self.path / "spectra" / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.safetensors"

    def save_vectors(self, name: str, vectors: torch.Tensor, values: torch.Tensor) -> None:
        """Cache a module's singular vectors (of its short side) and values, from planning, for its compression."""
        file = self._spectrum_file(name)
        partial = file.with_suffix(".partial")
        save_file(
            {"vectors": vectors.detach().cpu().contiguous(), "values": values.detach().cpu().contiguous()}, partial
        )
        os.replace(partial, file)

    def vectors(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        file = self._spectrum_file(name)
        if not file.is_file():
            return None
        cached = load_file(file)
        return cached["vectors"], cached["values"]

    def spectrum_cached(self, name: str) -> bool:
        return self._spectrum_file(name).is_file()

    # ----- calibration inputs (calibrated mode) ---------------------------------------------------------------

    def _inputs(self, position: int) -> Path:
        return self.path / "inputs" / f"{position:05d}"

    def write_input(self, position: int, batch: int, hidden: torch.Tensor) -> None:
        """One calibration batch's input to unit `position`, stored as bfloat16."""
        folder = self._inputs(position)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {"hidden": hidden.detach().to("cpu", torch.bfloat16).contiguous()}, folder / f"{batch:05d}.safetensors"
        )

    def read_input(self, position: int, batch: int) -> torch.Tensor:
        return load_file(self._inputs(position) / f"{batch:05d}.safetensors")["hidden"]

    def inputs_complete(self, position: int, batches: int) -> None:
        """Mark unit `position`'s inputs as all written (a stopped run may have left some)."""
        write_file(self._inputs(position) / "complete.json", json.dumps({"batches": batches}) + "\n")

    def has_inputs(self, position: int, batches: int) -> bool:
        return _read(self._inputs(position) / "complete.json") == {"batches": batches}

    def drop_inputs(self, position: int) -> None:
        shutil.rmtree(self._inputs(position), ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _read(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
