"""Typed errors. Each subclasses ValueError where a bad value is the cause, so plain `except ValueError` still works."""

from __future__ import annotations


class GraftError(Exception):
    """Base class of every error raised by peft-graft."""


class GraftConfigError(GraftError, ValueError):
    """A GraftConfig field holds an invalid value."""


class PackFormatError(GraftError, ValueError):
    """The tensors of a SkillPack do not form a valid packed delta (corrupt, truncated or from a newer format)."""
