"""Base-model fingerprints: which base a SkillPack was made for, checked cheaply when it is attached.

A fingerprint hashes the name and shape of every floating-point parameter of the base model, plus a few values
of each at positions derived from its name. It never reads a whole tensor: from a checkpoint it is the
safetensors headers and a handful of 2-byte reads per tensor, so an 8B base costs milliseconds.

Values are compared at bfloat16 precision, with magnitudes under 2⁻¹⁴ counted as zero, so the same bf16 or fp16
checkpoint gives the same fingerprint whether it is loaded in bf16, fp16 or fp32. An fp32 checkpoint loaded in fp16
is rounded twice (to fp16, then to bf16 precision), which can differ from rounding it once; so where values are finer
than fp16, a fingerprint also records that twice-rounded variant: ``"graft-fp1:<direct>,graft-fp1:<through fp16>"``.
Two fingerprints match when they share a variant. The storage dtype is therefore not part of the hash: a pack works
on its base in any float dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import FINGERPRINT_PREFIX
from ..errors import BaseModelMismatchError

if TYPE_CHECKING:
    from ..extraction.checkpoint import CheckpointReader

logger = logging.getLogger(__name__)

SAMPLES_PER_TENSOR = 4
ALLOW_MISMATCH_ENV = "PEFT_GRAFT_ALLOW_BASE_MISMATCH"
_SMALLEST_NORMAL_FP16 = 2.0**-14
_ALLOW_MISMATCH: contextvars.ContextVar[bool] = contextvars.ContextVar("graft_allow_base_mismatch", default=False)
# Attribute set on an embedding weight that peft-graft grew for added tokens: its row count before growing.
BASE_ROWS_ATTRIBUTE = "_graft_base_rows"


def sample_positions(name: str, numel: int) -> list[int]:
    """The flat positions sampled from a tensor: derived from its name only, so every reader picks the same."""
    digest = hashlib.sha256(name.encode()).digest()
    return [int.from_bytes(digest[8 * i : 8 * i + 8], "little") % numel for i in range(SAMPLES_PER_TENSOR)]


def _canonical(values: torch.Tensor, through_float16: bool = False) -> bytes:
    values = values.detach().float()
    if through_float16:  # as an fp16 load would round them first
        values = values.half().float()
    values = values.bfloat16().float()
    values[values.abs() < _SMALLEST_NORMAL_FP16] = 0.0
    return values.bfloat16().view(torch.int16).numpy().tobytes()


def _fingerprint(tensors: Iterable[tuple[str, tuple[int, ...], Callable[[list[int]], torch.Tensor]]]) -> str:
    """The fingerprint: its direct variant, and the variant through fp16 where that differs (comma-separated)."""
    digests = [hashlib.sha256(), hashlib.sha256()]
    for name, shape, read in sorted(tensors, key=lambda item: item[0]):
        header = f"{name}|{','.join(map(str, shape))}|".encode()
        numel = math.prod(shape)
        values = read(sample_positions(name, numel)) if numel else None
        for through_float16, digest in enumerate(digests):
            digest.update(header)
            if values is not None:
                digest.update(_canonical(values, bool(through_float16)))
    variants = dict.fromkeys(FINGERPRINT_PREFIX + digest.hexdigest()[:32] for digest in digests)
    return ",".join(variants)


def fingerprint_variants(fingerprint: str) -> frozenset[str]:
    """The variants a recorded fingerprint accepts (one, or two for bases finer than fp16)."""
    return frozenset(part for part in fingerprint.split(",") if part)


def same_base(first: str, second: str) -> bool:
    """Whether two fingerprints name the same base weights (they share a variant)."""
    return bool(fingerprint_variants(first) & fingerprint_variants(second))


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's float parameters under their plain names, with PEFT wrappers and adapter weights removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    adapter_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            adapter_prefixes += [f"{name}.{attr}." for attr in module.adapter_layer_names]
    parameters = {}
    for name, parameter in model.named_parameters():
        if not parameter.is_floating_point() or ".modules_to_save." in name:
            continue
        if any(name.startswith(prefix) for prefix in adapter_prefixes):
            continue
        plain = name.replace(".original_module.", ".")
        while ".base_layer." in plain:
            plain = plain.replace(".base_layer.", ".")
        parameters[plain] = parameter
    return parameters


def fingerprint_model(model: nn.Module) -> str | None:
    """The fingerprint of a loaded base model (with or without adapters attached).

    None when it cannot be computed faithfully: an adapter is merged into the weights, or weights are offloaded
    to the meta device.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = model.get_base_model() if hasattr(model, "get_base_model") else model
    if any(isinstance(m, BaseTunerLayer) and m.merged for m in modules.modules()):
        return None
    items = []
    for name, parameter in base_parameters(model).items():
        if parameter.device.type == "meta":
            return None
        shape = tuple(parameter.shape)
        rows = getattr(parameter, BASE_ROWS_ATTRIBUTE, None)
        if rows is not None:
            shape = (rows, *shape[1:])
        flat = parameter.detach().reshape(-1)
        items.append((name, shape, lambda positions, flat=flat: flat[positions]))
    return _fingerprint(items)


def fingerprint_checkpoint(reader: CheckpointReader, names: Iterable[str]) -> str:
    """The fingerprint of a base checkpoint, over the given parameter names (those of its architecture)."""
    items = [
        (name, reader.shape(name), lambda positions, name=name: reader.get_values(name, positions))
        for name in names
        if name in reader
    ]
    return _fingerprint(items)


@contextlib.contextmanager
def allow_base_mismatch() -> Iterator[None]:
    """Attach packs to a base other than the one they were made for (a warning instead of an error)."""
    token = _ALLOW_MISMATCH.set(True)
    try:
        yield
    finally:
        _ALLOW_MISMATCH.reset(token)


def mismatch_allowed() -> bool:
    return _ALLOW_MISMATCH.get() or os.environ.get(ALLOW_MISMATCH_ENV, "").lower() in ("1", "true", "yes")


def verify_base(model: nn.Module, recorded: str | None, recorded_name: str | None, pack: str = "this pack") -> None:
    """Raise BaseModelMismatchError when `model` is not the base whose fingerprint a pack recorded."""
    if not recorded:
        return
    actual = fingerprint_model(model)
    if actual is None:
        logger.warning(
            "cannot verify the base model of %s: an adapter is merged or weights are offloaded; attaching unchecked",
            pack,
        )
        return
    if same_base(actual, recorded):
        return
    loaded_name = _model_name(model)
    message = (
        f"{pack} was made for base {recorded_name or 'unknown'} ({recorded}), but the model it is being attached to "
        f"is {loaded_name} ({actual}). Its delta only means something on its own base: load that base. If you are "
        f"sure (e.g. the same weights re-saved in another dtype), pass force=True or set {ALLOW_MISMATCH_ENV}=1."
    )
    if mismatch_allowed():
        logger.warning("%s Attaching anyway, as asked.", message)
        return
    raise BaseModelMismatchError(message, expected=recorded, found=actual)


def _model_name(model: nn.Module) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None) or type(base).__name__


def recorded_fingerprints(configs: Mapping[str, object]) -> dict[str, str]:
    """{pack name: recorded base fingerprint} for the configs that carry one."""
    return {
        name: fingerprint
        for name, config in configs.items()
        if (fingerprint := getattr(config, "base_model_fingerprint", None))
    }


__all__ = [
    "ALLOW_MISMATCH_ENV",
    "allow_base_mismatch",
    "base_parameters",
    "fingerprint_checkpoint",
    "fingerprint_model",
    "fingerprint_variants",
    "same_base",
    "verify_base",
]
