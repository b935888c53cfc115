"""ExtractionOptions: how an extraction runs (budget, calibration, sources, output), apart from the compression policy.

The compression policy (roles, ranks, energy, densities, precision bands) is the GraftConfig the pack records. These
options are the rest; ``extract_skillpack`` takes them as keywords or as one object, and ``peft-graft extract``
generates one flag per field from the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from ..errors import BudgetError, GraftConfigError

# Forms a budget plan may give projections (see the field's help).
FORMS = ("any", "lowrank")


@dataclass
class ExtractionOptions:
    """Settings of one extraction run."""

    budget: float | None = field(
        default=None,
        metadata={
            "help": "Pack size as a fraction of the fp16 bytes of the whole delta, in (0, 1], e.g. 0.0625. Ranks, "
            "bits per band and embedding densities are then planned by error reduction per byte, and the "
            "GraftConfig's rank, energy and bands are not used."
        },
    )
    forms: str = field(
        default="any",
        metadata={
            "help": "Which forms a budget plan may give the projections: 'any' (low-rank, group-quantized dense or "
            "fp16, whichever loses least per byte: the best quality) or 'lowrank' (low-rank only: exportable to LoRA "
            "for vLLM and other LoRA servers, and stacked in one product per layer in mixed-batch decoding). "
            "Embeddings take low-rank or sparse forms under both, and group-quantized or fp16 dense ones too under "
            "'any'."
        },
    )
    layer_replan: bool = field(
        default=False,
        metadata={
            "help": "Calibrated budget extraction only: re-divide each decoder layer's bytes among its projections on "
            "output error through their Hessians (experimental: lower KL than data-free at 1/16 on one held-out set, "
            "higher on another; off until measured on the full benchmark)."
        },
    )
    row_weights: bool = field(
        default=True,
        metadata={
            "help": "Calibrated extraction only: weight embedding and lm_head rows by their token's frequency in the "
            "calibration text. Measured on SmolLM2 skills: 2-15x lower KL at 1/4 and 1/8, but 2.5-6x higher from "
            "1/16 to 1/64 where the skill's words are mostly absent from the calibration text (letter counting)."
        },
    )
    device: str = field(
        default="cpu",
        metadata={
            "help": "Where the math runs (SVD, GPTQ, planning, Hessians, the calibrated layer walk): cpu, cuda, "
            "cuda:N, mps, or auto (CUDA if available, else MPS, else the CPU)."
        },
    )
    devices: str | None = field(
        default=None,
        metadata={
            "help": "Several devices of one type, comma-separated (cuda:0,cuda:1,...), instead of device: independent "
            "modules (data-free, and planning) or the modules of one layer (calibrated) run on them side by side; the "
            "calibrated layer walk runs on the first. The pack is the same as on one of them."
        },
    )
    resume: bool = field(
        default=False,
        metadata={
            "help": "Continue a stopped extraction into the same output from its last finished layer (same inputs "
            "and settings); the pack is byte-identical to an uninterrupted run."
        },
    )
    calibration_samples: int = field(default=128, metadata={"help": "Calibration texts used at most (GPTQ)."})
    calibration_length: int = field(default=256, metadata={"help": "Tokens per calibration text."})
    batch_size: int = field(default=8, metadata={"help": "Calibration texts per forward pass."})
    act_order: bool = field(default=True, metadata={"help": "GPTQ in order of decreasing activation (act-order)."})
    damp: float = field(default=0.01, metadata={"help": "GPTQ damping, as a fraction of the mean Hessian diagonal."})
    base_revision: str | None = field(default=None, metadata={"help": "Hub revision of the base (branch/tag/commit)."})
    finetuned_revision: str | None = field(default=None, metadata={"help": "Hub revision of the fine-tune."})
    token: str | bool | None = field(default=None, metadata={"help": "Hub token, for private repos."})
    allow_pickle: bool = field(
        default=False, metadata={"help": "Read .bin checkpoints: pickle can run code, so only for sources you trust."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace an existing SkillPack folder at the output (never another folder)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    skill: str | None = field(default=None, metadata={"help": "What the fine-tune learned, for the model card."})

    def __post_init__(self) -> None:
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not 0.0 < self.budget <= 1.0
        ):
            raise BudgetError(
                f"budget must be a fraction in (0, 1] of the fp16 delta, got {self.budget}", budget=self.budget
            )
        if self.forms not in FORMS:
            raise GraftConfigError(f"forms must be one of {', '.join(FORMS)}, got {self.forms!r}", field="forms")
        for name in ("calibration_samples", "calibration_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise GraftConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if not 0.0 <= self.damp < 1.0:
            raise GraftConfigError(f"damp must be in [0, 1), got {self.damp!r}", field="damp")

    @classmethod
    def from_keywords(cls, options: ExtractionOptions | None, keywords: dict) -> ExtractionOptions:
        """`options` (or the defaults) with the given fields replaced; an unknown keyword is a TypeError."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise TypeError(
                f"extract_skillpack() got unexpected keyword(s) {', '.join(unknown)}; the options are "
                f"{', '.join(sorted(known))}"
            )
        values = {item.name: getattr(options, item.name) for item in fields(cls)} if options else {}
        return cls(**{**values, **keywords})
