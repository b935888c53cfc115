"""GraftConfig: the PEFT config of a SkillPack, i.e. which modules carry a delta and how it is compressed.

It also owns the schema of a pack's adapter config file: the format version, the storage bit widths, the module
roles, the base-fingerprint format and the weights' content hash. It imports nothing else of peft-graft but its errors
and utils.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType
from peft.utils.other import get_pattern_key

from .errors import GraftConfigError
from .utils.digest import SHA256_PATTERN, file_sha256
from .utils.patterns import check_pattern

FORMAT_VERSION = 1
"""Version of the packed tensor layout (peft_graft.pack.codec); a pack from a newer format is refused."""
STORAGE_BITS = (2, 3, 4, 8, 16)
"""Bit widths a precision band may use (16 = fp16)."""
FINGERPRINT_PREFIX = "graft-fp1:"
"""Prefix of a base-model fingerprint (peft_graft.pack.provenance)."""
MODULE_ROLES = ("embed", "attn", "mlp", "dense", "skip")
DEFAULT_PRECISION_BANDS: tuple[tuple[int | None, int], ...] = ((16, 8), (112, 4), (None, 2))


@dataclass
class GraftConfig(PeftConfig):
    """Configuration of a GRAFT adapter (a SkillPack).

    Linear and Conv1D modules carry a low-rank delta ``U·diag(S)·Vᵀ``; embeddings and the output embedding
    (``lm_head``) carry a sparse delta. On ``save_pretrained`` the low-rank factors are quantized per
    ``precision_bands`` and bit-packed, and sparse deltas are magnitude-pruned to ``embed_density``.
    """

    r: int = field(
        default=16,
        metadata={"help": "Rank of the low-rank delta of each targeted Linear/Conv1D module, capped at min(in, out)."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Module names (or a regex over full module names) that receive a delta, e.g. ['q_proj', 'v_proj']. "
            "Embeddings and lm_head get a sparse delta. None uses the architecture's default attention projections."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (or a regex) to leave untouched even when they match target_modules."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": "Per-module ranks overriding r, keyed by module-name suffix or regex, "
            "e.g. {'model.layers.0.mlp.down_proj': 7}. Extraction writes one entry per module."
        },
    )
    precision_bands: list[tuple[int | None, int]] = field(
        default_factory=lambda: list(DEFAULT_PRECISION_BANDS),
        metadata={
            "help": "Ordered (n_directions, bits) bands over the singular directions, most important first. "
            "n_directions=None means 'the rest' and may only close the list; bits is one of 2, 3, 4, 8 or 16 "
            "(16 = stored as fp16). Default: 8 bits for the first 16 directions, 4 for the next 112, 2 for the rest."
        },
    )
    group_size: int = field(
        default=128,
        metadata={
            "help": "Entries per quantization group along each singular vector; every group has its own fp16 "
            "scale and integer zero point."
        },
    )
    embed_density: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of entries of an embedding / lm_head delta kept by magnitude pruning when saving, "
            "in (0, 1]."
        },
    )
    mlp_energy: float = field(
        default=0.9,
        metadata={
            "help": "Extraction: an MLP projection keeps the smallest rank whose singular values hold this fraction "
            "of its delta's energy (sum of squared singular values), in (0, 1]."
        },
    )
    module_roles: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "Extraction: role overrides keyed by module-name suffix or regex. Roles: 'embed' (magnitude "
            "pruning), 'attn' (rank r), 'mlp' (energy rank), 'dense' (fp16 delta), 'skip' (left out)."
        },
    )
    density_pattern: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module embed_density overrides, keyed by module-name suffix or regex."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the low-rank delta (training)."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: the delta starts at zero and trains like LoRA (U = 0, V random). "
            "False: a random non-zero delta, useful for tests."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the GRAFT layers to train and save in full, e.g. a classifier head."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None,
        metadata={"help": "Only adapt the layers with these indices (as in LoRA)."},
    )
    layers_pattern: list[str] | str | None = field(
        default=None,
        metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layers'."},
    )
    target_modules_to_tie: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules whose weight is tied to the input embedding (e.g. lm_head). Filled in by peft-graft: "
            "they share the embedding's delta, stored once."
        },
    )
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Vocabulary size of a fine-tune that added tokens. Attaching grows the base's embeddings to it "
            "first (new rows start at zero; the pack stores them)."
        },
    )
    base_model_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "Fingerprint of the base model the pack was made for (parameter names, shapes and a few sampled "
            "values; see peft_graft.pack.provenance). Filled in by extraction and save_pretrained; checked on attach."
        },
    )
    weights_sha256: str | None = field(
        default=None,
        metadata={
            "help": "SHA-256 of the pack's weight file, recorded by save_pretrained and checked before "
            "the weights are loaded (a mismatch is a PackFormatError; peft_graft.allow_unverified_weights() skips "
            "the check). None for a config saved without weights, or a pack from before peft-graft recorded it."
        },
    )
    pack_info: dict = field(
        default_factory=dict,
        metadata={
            "help": "Facts about the pack for its model card: skill, finetuned (source fine-tune), "
            "finetuned_revision, calibrated, budget, fp16_delta_bytes, license and eval_results. Filled in by "
            "extraction; yours to extend."
        },
    )
    format_version: int = field(
        default=FORMAT_VERSION,
        metadata={"help": "Version of the packed tensor layout of the saved pack; written by peft-graft."},
    )

    def __post_init__(self) -> None:
        self._check_types()
        super().__post_init__()
        self.peft_type = PeftType.GRAFT
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.precision_bands = _normalize_bands(self.precision_bands)
        self._check_patterns()
        _check_positive_int("r", self.r)
        if not isinstance(self.rank_pattern, dict):
            raise GraftConfigError(
                f"rank_pattern must be a dict of module pattern -> rank, got {self.rank_pattern!r}",
                field="rank_pattern",
            )
        for pattern, rank in self.rank_pattern.items():
            _check_positive_int(f"rank_pattern[{pattern!r}]", rank)
        _check_positive_int("group_size", self.group_size)
        _check_fraction("embed_density", self.embed_density)
        _check_fraction("mlp_energy", self.mlp_energy)
        for pattern, density in self.density_pattern.items():
            _check_fraction(f"density_pattern[{pattern!r}]", density)
        for pattern, role in self.module_roles.items():
            if role not in MODULE_ROLES:
                raise GraftConfigError(
                    f"module_roles[{pattern!r}] must be one of {MODULE_ROLES}, got {role!r}", field="module_roles"
                )
        if self.vocab_size is not None:
            _check_positive_int("vocab_size", self.vocab_size)
        if not 0.0 <= self.dropout < 1.0:
            raise GraftConfigError(f"dropout must be in [0, 1), got {self.dropout}", field="dropout")
        if self.base_model_fingerprint is not None and not (
            isinstance(self.base_model_fingerprint, str)
            and all(part.startswith(FINGERPRINT_PREFIX) for part in self.base_model_fingerprint.split(","))
        ):
            raise GraftConfigError(
                f"base_model_fingerprint must be a string starting with {FINGERPRINT_PREFIX!r}, "
                f"got {self.base_model_fingerprint!r}",
                field="base_model_fingerprint",
            )
        if self.weights_sha256 is not None and not (
            isinstance(self.weights_sha256, str) and SHA256_PATTERN.fullmatch(self.weights_sha256)
        ):
            raise GraftConfigError(
                f"weights_sha256 must be 64 lowercase hex digits, got {self.weights_sha256!r}", field="weights_sha256"
            )
        if not isinstance(self.pack_info, dict):
            raise GraftConfigError(f"pack_info must be a dict, got {type(self.pack_info).__name__}", field="pack_info")
        _check_positive_int("format_version", self.format_version)
        if self.format_version > FORMAT_VERSION:
            raise GraftConfigError(
                f"this pack uses format version {self.format_version}, but this peft-graft reads up to "
                f"{FORMAT_VERSION}; upgrade peft-graft to load it",
                field="format_version",
            )
        if self.precision_bands[-1][0] is not None:
            covered = sum(n for n, _ in self.precision_bands)
            largest = max([self.r, *self.rank_pattern.values()])
            if largest > covered:
                raise GraftConfigError(
                    f"precision_bands cover {covered} directions but ranks go up to {largest}; "
                    "end the bands with (None, bits) to cover the rest",
                    field="precision_bands",
                )

    def _check_types(self) -> None:
        """Every field's JSON type, before anything uses it: a pack's config file is untrusted input."""
        for name, (kinds, items) in _FIELD_TYPES.items():
            value = getattr(self, name, None)
            if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
                raise GraftConfigError(f"{name} has the wrong type ({type(value).__name__})", field=name)
            entries = value if items is not None and isinstance(value, (list, set, tuple, dict)) else ()
            if not all(isinstance(item, items) and not isinstance(item, bool) for item in entries):
                raise GraftConfigError(f"{name} must hold {items.__name__} entries only", field=name)
        for name in ("embed_density", "mlp_energy", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise GraftConfigError(f"{name} must be a number, got {value!r}", field=name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """PEFT's loader, with whatever a malformed config file makes PEFT's generic code raise (a
        TypeError, a ValueError, a KeyError) reported as a GraftConfigError that names the folder."""
        where = Path(pretrained_model_name_or_path, subfolder or "")
        try:
            config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (GraftConfigError, OSError):
            raise
        except (TypeError, ValueError, KeyError, AttributeError, RecursionError) as error:
            raise GraftConfigError(f"{where}: invalid pack config ({type(error).__name__}: {error})") from None
        if config.modules_to_save:
            raise GraftConfigError(
                f"{where}: the pack config lists modules_to_save {config.modules_to_save}, but a SkillPack holds "
                "only GRAFT deltas, never whole modules; remove the field",
                field="modules_to_save",
            )
        return config

    def _check_patterns(self) -> None:
        """Every string PEFT or GRAFT matches as a regular expression against module names: one from an untrusted
        pack config must not be able to hang loading (utils/patterns.py says what is allowed)."""
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                check_pattern(getattr(self, name), name)
        for name in ("rank_pattern", "density_pattern", "module_roles"):
            mapping = getattr(self, name)
            if not isinstance(mapping, dict):
                raise GraftConfigError(f"{name} must be a dict of module pattern -> value, got {mapping!r}", field=name)
            for pattern in mapping:
                check_pattern(pattern, f"a {name} key")
        for name in ("modules_to_save", "layers_pattern"):
            value = getattr(self, name, None)
            for pattern in [value] if isinstance(value, str) else value or []:
                check_pattern(pattern, name)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Write the config file, recording the SHA-256 of the weight file already saved beside it (PEFT and
        extraction both write the weights first)."""
        weights = Path(save_directory) / SAFETENSORS_WEIGHTS_NAME
        self.weights_sha256 = file_sha256(weights) if weights.is_file() else None
        super().save_pretrained(save_directory, **kwargs)

    def to_dict(self) -> dict:
        # Sets are written in sorted order so that saving the same pack twice gives the same config file.
        return {key: sorted(value) if isinstance(value, set) else value for key, value in super().to_dict().items()}

    def rank_for(self, module_name: str) -> int:
        """The configured rank of a module: its rank_pattern entry, else r."""
        pattern = get_pattern_key(self.rank_pattern.keys(), module_name)
        return self.rank_pattern.get(pattern, self.r)

    def density_for(self, module_name: str) -> float:
        """The kept fraction of a sparse (embedding / lm_head) delta: its density_pattern entry, else embed_density."""
        pattern = get_pattern_key(self.density_pattern.keys(), module_name)
        return self.density_pattern.get(pattern, self.embed_density)

    def role_override(self, module_name: str) -> str | None:
        """The module_roles entry matching a module, if any."""
        pattern = get_pattern_key(self.module_roles.keys(), module_name)
        return self.module_roles.get(pattern)


# Field -> (accepted types, type of each entry of a list/set/dict (its keys), or None). Numbers are checked apart.
_STRINGS = (type(None), str, list, set, tuple)
_FIELD_TYPES: dict[str, tuple[tuple[type, ...], type | None]] = {
    "task_type": ((type(None), str), None),
    "base_model_name_or_path": ((type(None), str), None),
    "revision": ((type(None), str), None),
    "peft_version": ((type(None), str), None),
    "auto_mapping": ((type(None), dict), str),
    "inference_mode": ((bool,), None),
    "init_weights": ((bool,), None),
    "target_modules": (_STRINGS, str),
    "exclude_modules": (_STRINGS, str),
    "modules_to_save": ((type(None), list, tuple), str),
    "layers_to_transform": ((type(None), int, list, tuple), int),
    "layers_pattern": (_STRINGS, str),
    "target_modules_to_tie": ((type(None), list, tuple, set), str),
    "rank_pattern": ((dict,), str),
    "density_pattern": ((dict,), str),
    "module_roles": ((dict,), str),
    "pack_info": ((dict,), str),
}


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise GraftConfigError(f"{name} must be a number in (0, 1], got {value!r}", field=name)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GraftConfigError(f"{name} must be a positive integer, got {value!r}", field=name)


def _normalize_bands(bands: object) -> list[tuple[int | None, int]]:
    """Validate precision bands and turn JSON lists back into tuples."""
    if not isinstance(bands, (list, tuple)) or not bands:
        raise GraftConfigError(
            f"precision_bands must be a non-empty list of (n_directions, bits), got {bands!r}", field="precision_bands"
        )
    normalized: list[tuple[int | None, int]] = []
    for position, band in enumerate(bands):
        if not isinstance(band, (list, tuple)) or len(band) != 2:
            raise GraftConfigError(
                f"precision_bands[{position}] must be a pair (n_directions, bits), got {band!r}",
                field="precision_bands",
            )
        n_directions, bits = band
        if n_directions is not None:
            _check_positive_int(f"precision_bands[{position}] n_directions", n_directions)
        if isinstance(bits, bool) or bits not in STORAGE_BITS:
            raise GraftConfigError(
                f"precision_bands[{position}] bits must be one of {STORAGE_BITS}, got {bits!r}", field="precision_bands"
            )
        if n_directions is None and position != len(bands) - 1:
            raise GraftConfigError(
                "only the last precision band may use n_directions=None ('the rest')", field="precision_bands"
            )
        normalized.append((n_directions, bits))
    return normalized
