"""Typed errors. Each subclasses ValueError where a bad value is the cause, so plain `except ValueError` still works."""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error raised by peft-graft."""


class GraftConfigError(GraftError, ValueError):
    """A GraftConfig field holds an invalid value."""


class PackFormatError(GraftError, ValueError):
    """The tensors of a SkillPack do not form a valid packed delta (corrupt, truncated or from a newer format)."""


class CheckpointError(GraftError, ValueError):
    """A checkpoint given to extraction cannot be used as it is."""


class PickleCheckpointError(CheckpointError):
    """The checkpoint is only available as pickle (.bin / .pt), which can run code when loaded."""


class MissingTensorError(CheckpointError):
    """A tensor of one checkpoint is missing from the other."""


class CheckpointMismatchError(CheckpointError):
    """The base and the fine-tune differ in architecture or shapes in a way a SkillPack cannot express."""


class NonFiniteDeltaError(CheckpointError):
    """A delta holds NaN or Inf."""


class BudgetError(GraftError, ValueError):
    """The requested byte budget cannot be met."""


class BaseModelMismatchError(GraftError, ValueError):
    """A SkillPack is being attached to a base model other than the one it was made for."""


class HubError(GraftError):
    """A SkillPack or router could not be pushed to or pulled from the Hugging Face Hub."""


class UnsafePackError(GraftError, ValueError):
    """A SkillPack or router folder holds something peft-graft refuses to load (pickle, paths leaving the folder)."""


class ExportError(GraftError, ValueError):
    """A SkillPack cannot be exported in the requested format as asked."""


class TransferError(GraftError, ValueError):
    """A transfer run cannot run, or cannot resume, as asked."""


class FusionError(GraftError, ValueError):
    """SkillPacks cannot be combined into one model as asked."""
