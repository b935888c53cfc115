"""The devices an extraction computes on: resolving their names, and spreading independent modules across them.

Every module's math (spectrum, factorization, GPTQ) runs whole on one device, so modules are independent work items.
With several devices, one thread per device takes the next item as soon as its device is free: torch releases the GIL
in its kernels, so the devices compute side by side. Each item's result depends only on the item and the device type,
never on which device or thread ran it, so a pack is byte-identical whatever the number of devices.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from ..errors import GraftConfigError

Worker = TypeVar("Worker")
Item = TypeVar("Item")
Result = TypeVar("Result")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps``, or ``auto`` (CUDA if available, else MPS, else the CPU)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise GraftConfigError(
            f"device must be cpu, cuda, cuda:N, mps or auto; got {name!r} ({error})", field="device"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GraftConfigError(f"device {name!r} asked for, but CUDA is not available here", field="device")
    mps = getattr(torch.backends, "mps", None)
    if device.type == "mps" and not (mps is not None and mps.is_available()):
        raise GraftConfigError(f"device {name!r} asked for, but MPS is not available here", field="device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GraftConfigError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices", field="device")
    return device


def resolve_devices(device: str, devices: str | Sequence[str] | None) -> list[torch.device]:
    """The devices of a run: `devices` (comma-separated, or a list) when given, else `device` alone. They must all be
    of one type, so that every module is computed the same way wherever it runs."""
    if devices is None:
        return [resolve_device(device)]
    names = [name.strip() for name in (devices.split(",") if isinstance(devices, str) else devices)]
    if not names or not all(names):
        raise GraftConfigError(f"devices must name at least one device, e.g. cuda:0,cuda:1; got {devices!r}")
    resolved = [resolve_device(name) for name in names]
    if len({device.type for device in resolved}) > 1:
        raise GraftConfigError(
            f"devices must all be of one type (results differ slightly between CPU and GPU kernels); got {devices!r}",
            field="devices",
        )
    return resolved


class DevicePool:
    """One worker per device (e.g. a Compressor reading deltas onto that device); `map` runs a function over items
    on the free workers and returns the results in the items' order."""

    def __init__(self, workers: Sequence[Worker]) -> None:
        if not workers:
            raise ValueError("a DevicePool needs at least one worker")
        self.workers = list(workers)

    @property
    def primary(self) -> Worker:
        """The first device's worker: the one sequential work (planning's sparse modules, the layer walk) uses."""
        return self.workers[0]

    def map(self, function: Callable[[Worker, Item], Result], items: Iterable[Item]) -> list[Result]:
        items = list(items)
        if len(self.workers) == 1 or len(items) <= 1:
            return [function(self.primary, item) for item in items]
        free: queue.SimpleQueue = queue.SimpleQueue()
        for worker in self.workers:
            free.put(worker)

        def run(item: Item) -> Result:
            worker = free.get()
            try:
                return function(worker, item)
            finally:
                free.put(worker)

        executor = ThreadPoolExecutor(max_workers=len(self.workers), thread_name_prefix="peft-graft-device")
        try:
            futures = [executor.submit(run, item) for item in items]
            return [future.result() for future in futures]
        finally:
            executor.shutdown(wait=True, cancel_futures=True)  # after a failure, the items not started never start
