"""Every error peft-graft raises.

Each subclasses the standard exception it stands for (``ValueError`` for a bad value, ``OSError`` for a failed
transfer), so plain ``except ValueError`` / ``except OSError`` keep working, and carries what it is about as
attributes (a path, a repo id, fingerprints), all ``None`` where unknown.
"""

from __future__ import annotations

from typing import Any


class GraftError(Exception):
    """Base class of every error raised by peft-graft."""


class MissingExtraError(GraftError, ImportError):
    """An optional dependency is not installed; `extra` names the peft-graft extra that installs it."""

    def __init__(self, message: str, *, extra: str | None = None) -> None:
        super().__init__(message)
        self.extra = extra


# ----- configs and packs --------------------------------------------------------------------------------------------


class GraftConfigError(GraftError, ValueError):
    """A GraftConfig (or another options object) field holds an invalid value; `field` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PackFormatError(GraftError, ValueError):
    """The files or tensors of a SkillPack do not form a valid pack (corrupt, truncated, or from a newer format)."""

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class UnsafePackError(GraftError, ValueError):
    """A SkillPack or router folder holds something peft-graft refuses to load (pickle, paths leaving the folder)."""

    def __init__(self, message: str, *, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


class BaseModelMismatchError(GraftError, ValueError):
    """A SkillPack is being attached to a base model other than the one it was made for."""

    def __init__(self, message: str, *, expected: str | None = None, found: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


# ----- extraction ---------------------------------------------------------------------------------------------------


class CheckpointError(GraftError, ValueError):
    """A checkpoint given to extraction cannot be used as it is; `source` is the checkpoint, `tensor` the name."""

    def __init__(self, message: str, *, source: Any = None, tensor: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.tensor = tensor


class PickleCheckpointError(CheckpointError):
    """The checkpoint is only available as pickle (.bin / .pt), which can run code when loaded."""


class MissingTensorError(CheckpointError):
    """A tensor of one checkpoint is missing from the other."""


class CheckpointMismatchError(CheckpointError):
    """The base and the fine-tune differ in architecture or shapes in a way a SkillPack cannot express."""


class NonFiniteDeltaError(CheckpointError):
    """A delta holds NaN or Inf."""


class BudgetError(GraftError, ValueError):
    """The requested byte budget cannot be met; `budget` is the fraction asked for, `smallest` (where known) the
    smallest fraction that keeps any module."""

    def __init__(
        self,
        message: str,
        *,
        budget: float | None = None,
        smallest: float | None = None,
        needed_bytes: int | None = None,
    ) -> None:
        super().__init__(message)
        self.budget = budget
        self.smallest = smallest
        self.needed_bytes = needed_bytes


# ----- Hub and routing ----------------------------------------------------------------------------------------------


class HubError(GraftError, OSError):
    """A SkillPack or router could not be pushed to or pulled from the Hugging Face Hub."""

    def __init__(self, message: str, *, repo_id: str | None = None, revision: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.revision = revision


class RoutingError(GraftError, ValueError):
    """A router or routed model is used inconsistently (unknown pack, labels that do not match, bad router folder)."""


# ----- operations on packs ------------------------------------------------------------------------------------------


class ExportError(GraftError, ValueError):
    """A SkillPack cannot be exported in the requested format as asked."""


class FusionError(GraftError, ValueError):
    """SkillPacks cannot be combined into one model as asked."""


class TransferError(GraftError, ValueError):
    """A transfer run cannot run, or cannot resume, as asked."""


# ----- serving ------------------------------------------------------------------------------------------------------


class UnknownModelError(RoutingError):
    """A request names a model the server does not serve (HTTP 404); `model` is the name it gave."""

    def __init__(self, message: str, *, model: str | None = None) -> None:
        super().__init__(message)
        self.model = model


class GenerationParameterError(GraftError, ValueError):
    """A generation request holds a value the engine cannot honour (HTTP 400); `field` names it."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ServerBusyError(GraftError, OSError):
    """The serving engine's queue is full (HTTP 429): retry later, or raise --max-queue."""
