"""Atomic writes: build a file or folder next to its target, then rename it into place."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def write_folder(
    target: Path,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], bool] | None = None,
    kind: str = "folder",
) -> None:
    """Call ``write(staging)`` on a hidden sibling of `target`, then rename it to `target`.

    No partial folder ever looks valid: on any error the staging folder is removed and `target` is untouched. An
    existing `target` is replaced only with `overwrite`, and only if `replaceable(target)` says it is a `kind` (so an
    unrelated folder is never deleted); the two are swapped in one atomic rename where the OS has one (Linux), so a
    kill at any point leaves either the old or the new folder at `target`. Writers of one target take turns (a lock
    file beside it), and the leftovers of writers that were killed are removed first.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    check_replaceable(target, overwrite, replaceable, kind)
    with folder_lock(target):
        _remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
        try:
            write(staging)
            follow_umask(staging)
            if target.exists():
                check_replaceable(target, overwrite, replaceable, kind)
                _swap(staging, target)
            else:
                os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # the new folder's staging, or the old folder after a swap


def check_replaceable(
    target: Path, overwrite: bool, replaceable: Callable[[Path], bool] | None = None, kind: str = "folder"
) -> None:
    """Refuse (FileExistsError) to write where something exists, unless `overwrite` and it is a `kind` (or empty)."""
    if not target.exists() and not target.is_symlink():
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; choose another path or pass overwrite=True (--overwrite)")
    empty = target.is_dir() and not target.is_symlink() and not any(target.iterdir())
    if not empty and (target.is_symlink() or not target.is_dir() or (replaceable and not replaceable(target))):
        raise FileExistsError(
            f"{target} exists and is not a {kind}; overwrite only replaces a {kind}, never another folder or file "
            "(move it away or choose another path)"
        )


def is_model_folder(path: Path) -> bool:
    """A transformers model folder (what a merge may replace)."""
    return (Path(path) / "config.json").is_file()


@contextlib.contextmanager
def folder_lock(target: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `target` among writers in any process (``fcntl.flock`` on a hidden sibling file; where
    there is no fcntl, no lock)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Staging folders of writers that were killed (only called under the target's lock, so none is in use), and a
    folder moved aside by a non-atomic swap that was interrupted: put back if nothing replaced it."""
    retired = target.with_name(f".{target.name}.replaced")
    if retired.is_dir() and not target.exists():
        os.replace(retired, target)
    shutil.rmtree(retired, ignore_errors=True)
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.partial"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def _swap(staging: Path, target: Path) -> None:
    """Put `staging` at `target` and the old `target` at `staging`: one renameat2(RENAME_EXCHANGE) on Linux, else two
    renames through a hidden name that the next writer restores if a kill comes between them."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        done = renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
        if done == 0:
            return
    retired = target.with_name(f".{target.name}.replaced")
    os.replace(target, retired)
    os.replace(staging, target)
    os.replace(retired, staging)


@functools.cache
def _renameat2():
    """libc's renameat2, looked up once (None where there is none)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).renameat2
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        function.restype = ctypes.c_int
        return function
    return None


def write_file(target: Path, content: str | bytes) -> Path:
    """Write `content` to a hidden sibling of `target`, flush it to disk, then rename it to `target`."""
    target = Path(target)
    handle, staging = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes it 0600
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


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each path (a folder: with everything under it) the mode a plain ``mkdir`` / ``open`` would, 0777 / 0666
    less the umask: temporary folders and files start at 0700 / 0600 (safetensors' files too), and a team's shared
    cache must be able to read what is saved."""
    umask = _umask()
    for path in paths:
        if not os.path.isdir(path):
            os.chmod(path, 0o666 & ~umask)
            continue
        os.chmod(path, 0o777 & ~umask)
        for folder, folders, files in os.walk(path):
            for name in folders:
                os.chmod(os.path.join(folder, name), 0o777 & ~umask)
            for name in files:
                os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current
