"""Atomic writes: build a file or folder next to its target, then rename it into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder(target: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> None:
    """Call ``write(staging)`` on a hidden sibling of `target`, then rename it to `target`.

    No partial folder ever looks valid: on any error the staging folder is removed and `target` is untouched. An
    existing `target` is replaced only with `overwrite` (it is moved aside first, so the swap is two renames).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        write(staging)
        if target.exists():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while writing it; nothing was overwritten")
            retired = target.with_name(f".{target.name}.replaced")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(target, retired)
            os.replace(staging, target)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_file(target: Path, content: str | bytes) -> Path:
    """Write `content` to a hidden sibling of `target`, flush it to disk, then rename it to `target`."""
    target = Path(target)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content.encode("utf-8") if isinstance(content, str) else content)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(staging, target)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return target
