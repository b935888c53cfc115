"""What an extraction did, module by module: written into the pack as its report, and printed by ``inspect``."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..pack.folder import PackFolder


@dataclass
class ModuleReport:
    name: str
    role: str
    form: str  # pack.layout.LOWRANK, SPARSE, DENSE, QUANTIZED or BIAS
    shape: list[int]
    rank: int | None = None
    bands: list[list[int]] | None = None  # [[n_directions, bits], ...]
    density: float | None = None
    bits: int | None = None  # the quantized form's bit width
    bytes: int = 0
    frobenius_error: float = 0.0  # ‖Δ − Δ̂‖ / ‖Δ‖
    output_error: float | None = None  # ‖(Δ − Δ̂)X‖ / ‖ΔX‖ on the calibration inputs
    svd: str | None = None  # "full" or "randomized"


@dataclass
class ExtractionReport:
    """What an extraction did, module by module; written into the pack as its report."""

    base: str
    finetuned: str
    calibrated: bool
    budget: float | None
    modules: list[ModuleReport] = field(default_factory=list)
    pack_bytes: int = 0
    fp16_delta_bytes: int = 0
    wall_seconds: float = 0.0
    # setup (reading headers, the meta model), planning (budget mode), compression, writing, and compression per
    # decoder layer (a resumed run counts only what it did itself)
    stage_seconds: dict[str, float] = field(default_factory=dict)
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
        """The report of an extracted pack (FileNotFoundError for a pack that was not extracted)."""
        report = PackFolder(pack_dir, require_weights=False).report
        if report is None:
            raise FileNotFoundError(f"{pack_dir} has no extraction report: it was not made by extract_skillpack")
        return cls.from_dict(report)

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
        if self.stage_seconds:
            stages = (f"{name.replace('_', ' ')} {seconds:.1f} s" for name, seconds in self.stage_seconds.items())
            lines.append("stages: " + "  ".join(stages))
        return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. On Linux, VmHWM: ``ru_maxrss`` also counts the memory of the parent
    process that spawned this one (vfork/exec carries its high-water mark over), so it overstates a CLI run."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, the others KiB
