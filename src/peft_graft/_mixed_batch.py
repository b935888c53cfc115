"""Mixed batches (one adapter per row): the per-call row adapters, row-to-slot maps, and the per-layer stack cache.

PEFT passes ``adapter_names`` to layers through forward pre-hooks registered on the shared modules, so two threads
would overwrite each other's names; a context variable is private to each thread (or task), so concurrent calls
with different packs stay independent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

BASE_ADAPTER = "__base__"
"""Name to put in ``adapter_names`` for rows that should run on the base model alone."""

ROW_ADAPTERS: ContextVar[list[str] | None] = ContextVar("peft_graft_row_adapters", default=None)
"""Per-row adapter names of the forward / generate call running in this thread (or task)."""

# How many calls with row adapters are running, in any thread. Layers look the context variable up only when some
# are: torch.compile cannot trace a ContextVar lookup (a graph break in every layer), but it can read this int.
_row_calls = 0
_row_calls_lock = threading.Lock()


@contextmanager
def rows_named(adapter_names: list[str]) -> Iterator[None]:
    """Give every GRAFT layer these per-row adapter names for the calls made inside the block (this thread only)."""
    global _row_calls
    with _row_calls_lock:
        _row_calls += 1
    token = ROW_ADAPTERS.set(list(adapter_names))
    try:
        yield
    finally:
        ROW_ADAPTERS.reset(token)
        with _row_calls_lock:
            _row_calls -= 1


def current_row_adapters() -> list[str] | None:
    """The per-row adapter names of the call running in this thread, if any."""
    return ROW_ADAPTERS.get() if _row_calls else None


def row_adapters(adapter_names: list[str], owns) -> list[str]:
    """The distinct adapters of a mixed batch for which `owns(adapter)` holds, in order of first appearance."""
    return list(dict.fromkeys(a for a in adapter_names if a != BASE_ADAPTER and owns(a)))


def row_slots(adapter_names: list[str], names: list[str], device: torch.device) -> torch.Tensor:
    """Per row, its adapter's slot in a per-adapter table whose slot 0 is "no delta here" (base rows, adapters the
    layer does not hold) and slot i + 1 is ``names[i]``; indexing the table with this gives per-row rows."""
    slot = {name: index + 1 for index, name in enumerate(names)}
    return torch.tensor([slot.get(a, 0) for a in adapter_names], device=device)


def fingerprint(tensor: torch.Tensor) -> tuple[int, int]:
    """Changes when the tensor's storage is swapped (``.to()``, ``.data =``) or written in place."""
    return tensor.data_ptr(), tensor._version


class StackCache:
    """Tensors stacked for one row layout, valid while the adapter tensors they came from are unchanged.

    Every decoding step of a generate call repeats its layout, so one entry per layer suffices.
    """

    __slots__ = ("_entry",)

    def __init__(self) -> None:
        self._entry: tuple[tuple, list[tuple[torch.Tensor, tuple[int, int]]], tuple] | None = None

    @property
    def stacked(self) -> tuple | None:
        """The last stacked tensors, whatever their layout (None before the first one-token mixed batch)."""
        return None if self._entry is None else self._entry[2]

    def get(self, layout: tuple) -> tuple | None:
        entry = self._entry
        if entry is not None and entry[0] == layout and all(fingerprint(t) == f for t, f in entry[1]):
            return entry[2]
        return None

    def put(self, layout: tuple, sources: list[torch.Tensor], stacked: tuple) -> None:
        self._entry = (layout, [(t, fingerprint(t)) for t in sources], stacked)

    def clear(self) -> None:
        self._entry = None
