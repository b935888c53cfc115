"""Print uv's pinned, hashed requirement line from uv.lock, for bootstrapping uv with `pip --require-hashes`.

uv installs everything else from the lock; this keeps the one package installed before uv exists pinned by the same
file, so `make lock` is the only place versions change.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def uv_requirement(lock_path: Path) -> str:
    lock = tomllib.loads(lock_path.read_text())
    for package in lock.get("package", []):
        if package["name"] == "uv":
            hashes = [wheel["hash"] for wheel in package.get("wheels", [])]
            if not hashes:
                break
            return " ".join([f"uv=={package['version']}", *(f"--hash={digest}" for digest in hashes)])
    raise SystemExit(f"{lock_path} pins no uv wheel: add uv to the dev dependency group and run `make lock`")


if __name__ == "__main__":
    print(uv_requirement(Path(sys.argv[1] if len(sys.argv) > 1 else "uv.lock")))
