"""peft-graft: GraftLLM SkillPacks as a Hugging Face PEFT method.

``import peft_graft`` registers ``PeftType.GRAFT`` with PEFT, after which GRAFT adapters work with the usual PEFT
calls: ``get_peft_model``, ``save_pretrained``, ``PeftModel.from_pretrained``, ``load_adapter`` and friends.
"""

from ._registration import register_graft_method
from .config import DEFAULT_PRECISION_BANDS, GraftConfig
from .errors import (
    BudgetError,
    CheckpointError,
    CheckpointMismatchError,
    GraftConfigError,
    GraftError,
    MissingTensorError,
    NonFiniteDeltaError,
    PackFormatError,
    PickleCheckpointError,
)
from .extraction import ExtractionReport, ModuleReport, extract_skillpack
from .layer import BASE_ADAPTER, GraftEmbedding, GraftLayer, GraftLinear, GraftNorm
from .model import GraftModel, grow_vocabulary
from .router import BaseModelEmbedder, GraftRouter, ManualRouter, RoutingError
from .routing import PackSource, RoutedGraftModel

register_graft_method()

__version__ = "0.1.0.dev0"

__all__ = [
    "BASE_ADAPTER",
    "DEFAULT_PRECISION_BANDS",
    "BaseModelEmbedder",
    "BudgetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ExtractionReport",
    "GraftConfig",
    "GraftConfigError",
    "GraftEmbedding",
    "GraftError",
    "GraftLayer",
    "GraftLinear",
    "GraftModel",
    "GraftNorm",
    "GraftRouter",
    "ManualRouter",
    "MissingTensorError",
    "ModuleReport",
    "NonFiniteDeltaError",
    "PackFormatError",
    "PackSource",
    "PickleCheckpointError",
    "RoutedGraftModel",
    "RoutingError",
    "__version__",
    "extract_skillpack",
    "grow_vocabulary",
]
