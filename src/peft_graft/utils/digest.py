"""Content hashes of files: what a pack or router records of its weights at save, and checks at load."""

from __future__ import annotations

import hashlib
import os
import re

SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as 64 lowercase hex digits, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
