"""The direct dependencies of pyproject.toml: their floors as constraints, and what is installed against them.

`make test-lowest` first installs with `--floor-constraints` (each direct dependency pinned to its declared lower
bound, so the resolution either holds every floor together or fails naming the conflict), then runs `--at-floors` to
check what was installed, so the suite that follows proves the bounds in pyproject.toml. `make test-latest` prints
the report without the check, as the record of the newest resolution.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def direct_requirements(pyproject: Path, extras: list[str], core: bool = True) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"]) if core else []
    for extra in extras:
        lines += project["optional-dependencies"][extra]
    unique: dict[str, Requirement] = {}
    for line in lines:
        requirement = Requirement(line)
        unique.setdefault(requirement.name, requirement)
    return list(unique.values())


def floor(requirement: Requirement) -> Version | None:
    bounds = [Version(spec.version) for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
    return max(bounds) if bounds else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="", help="comma-separated extras whose requirements count as direct")
    parser.add_argument("--at-floors", action="store_true", help="fail unless every package sits at its lower bound")
    parser.add_argument("--floor-constraints", action="store_true", help="print name==floor lines and exit")
    parser.add_argument(
        "--extras-only", action="store_true", help="leave out [project] dependencies (an extra may need newer ones)"
    )
    parser.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    args = parser.parse_args()
    extras = [extra for extra in args.extras.split(",") if extra]
    requirements = direct_requirements(args.pyproject, extras, core=not args.extras_only)
    if args.floor_constraints:
        for requirement in requirements:
            lowest = floor(requirement)
            if lowest is not None:
                print(f"{requirement.name}=={lowest}")
        return 0
    off_floor = []
    print(f"{'package':<20} {'declared':<22} installed")
    for requirement in requirements:
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            installed = "missing"
        print(f"{requirement.name:<20} {requirement.specifier!s:<22} {installed}")
        lowest = floor(requirement)
        if installed == "missing" or (lowest is not None and Version(Version(installed).public) != lowest):
            off_floor.append(f"{requirement.name} {installed} (declared floor {lowest})")
    if args.at_floors and off_floor:
        print(
            "not at the declared floor: " + "; ".join(off_floor) + ". Raise each bound in pyproject.toml to a version "
            "that installs with the others, then run `make lock` and this target again.",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
