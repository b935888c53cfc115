"""peft-graft: GraftLLM SkillPacks as a Hugging Face PEFT method.

``import peft_graft`` registers ``PeftType.GRAFT`` with PEFT, after which GRAFT adapters work with the usual PEFT
calls: ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter`` and friends. The
rest of the public API (extraction, routing, the Hub, export and fusion) is imported on first use, so the import
itself costs only the tuner.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    BaseModelMismatchError,
    BudgetError,
    CheckpointError,
    CheckpointMismatchError,
    ExportError,
    FusionError,
    GenerationParameterError,
    GraftConfigError,
    GraftError,
    HubError,
    MissingExtraError,
    MissingTensorError,
    NonFiniteDeltaError,
    PackFormatError,
    PickleCheckpointError,
    RoutingError,
    ServerBusyError,
    TransferError,
    UnknownModelError,
    UnsafePackError,
)
from .integrations import register as _register

_register()

# name -> module that defines it, imported when the name is first used
_LAZY = {
    # the tuner
    "GraftConfig": "config",
    "DEFAULT_PRECISION_BANDS": "config",
    "GraftModel": "model",
    "grow_vocabulary": "model",
    "GraftLayer": "layer",
    "GraftLinear": "layer",
    "GraftEmbedding": "layer",
    "GraftNorm": "layer",
    "BASE_ADAPTER": "_mixed_batch",
    # extraction
    "extract_skillpack": "extraction",
    "ExtractionOptions": "extraction",
    "ExtractionReport": "extraction",
    "ModuleReport": "extraction",
    # routing
    "RoutedGraftModel": "routing",
    "GraftRouter": "routing",
    "ManualRouter": "routing",
    "BaseModelEmbedder": "routing",
    "PackSource": "routing",
    "RouterConfig": "routing",
    # the Hub and provenance
    "push_pack": "hub",
    "pull_pack": "hub",
    "allow_base_mismatch": "pack.provenance",
    "allow_unverified_weights": "pack.folder",
    # operations on packs
    "export_lora": "ops",
    "export_vllm": "ops",
    "export_gguf": "ops",
    "merge_packs": "ops",
    # serving
    "GenerationEngine": "serving",
    "SamplingParams": "serving",
    "ServerProcess": "serving",
}

if TYPE_CHECKING:
    from ._mixed_batch import BASE_ADAPTER
    from .config import DEFAULT_PRECISION_BANDS, GraftConfig
    from .extraction import ExtractionOptions, ExtractionReport, ModuleReport, extract_skillpack
    from .hub import pull_pack, push_pack
    from .layer import GraftEmbedding, GraftLayer, GraftLinear, GraftNorm
    from .model import GraftModel, grow_vocabulary
    from .ops import export_gguf, export_lora, export_vllm, merge_packs
    from .pack.folder import allow_unverified_weights
    from .pack.provenance import allow_base_mismatch
    from .routing import BaseModelEmbedder, GraftRouter, ManualRouter, PackSource, RoutedGraftModel, RouterConfig
    from .serving import GenerationEngine, SamplingParams, ServerProcess


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'peft_graft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_PRECISION_BANDS",
    "BaseModelEmbedder",
    "BaseModelMismatchError",
    "BudgetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ExportError",
    "ExtractionOptions",
    "ExtractionReport",
    "FusionError",
    "GenerationEngine",
    "GenerationParameterError",
    "GraftConfig",
    "GraftConfigError",
    "GraftEmbedding",
    "GraftError",
    "GraftLayer",
    "GraftLinear",
    "GraftModel",
    "GraftNorm",
    "GraftRouter",
    "HubError",
    "ManualRouter",
    "MissingExtraError",
    "MissingTensorError",
    "ModuleReport",
    "NonFiniteDeltaError",
    "PackFormatError",
    "PackSource",
    "PickleCheckpointError",
    "RoutedGraftModel",
    "RouterConfig",
    "RoutingError",
    "SamplingParams",
    "ServerBusyError",
    "ServerProcess",
    "TransferError",
    "UnknownModelError",
    "UnsafePackError",
    "__version__",
    "allow_base_mismatch",
    "allow_unverified_weights",
    "export_gguf",
    "export_lora",
    "export_vllm",
    "extract_skillpack",
    "grow_vocabulary",
    "merge_packs",
    "pull_pack",
    "push_pack",
]
