"""Reading JSON files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path) -> Any | None:
    """The parsed contents of a JSON file, or None when there is no such file (invalid JSON raises ValueError)."""
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
