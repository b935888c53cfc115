"""The package's shape, as ARCHITECTURE.md states it: one owner of the pack format, pure tensor math, imports that
only go down, a cheap ``import peft_graft``, and the public API it promises."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "peft_graft"
sys.path.insert(0, str(ROOT / "tools"))

import import_graph  # noqa: E402  (tools/import_graph.py)

# What only peft_graft/pack may spell out: the pack's file names and PEFT's key prefix.
PACK_LITERALS = ("adapter_config.json", "adapter_model.safetensors", "graft_report.json", "base_model.model.")


def _sources(folder: Path = PACKAGE) -> list[Path]:
    return sorted(folder.rglob("*.py"))


def test_only_the_pack_folder_knows_pack_file_names_and_keys():
    offenders = [
        f"{path.relative_to(PACKAGE)}: {literal}"
        for path in _sources()
        if PACKAGE / "pack" not in path.parents
        for literal in PACK_LITERALS
        if literal in path.read_text()
    ]
    assert not offenders, offenders
    # and the pack folder really is where they live
    assert all(literal in (PACKAGE / "pack" / "layout.py").read_text() for literal in PACK_LITERALS)


def test_compress_imports_nothing_from_the_rest_of_the_package():
    for path in _sources(PACKAGE / "compress"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, f"{path.name} imports {'.' * node.level}{node.module}"
                assert not (node.module or "").startswith("peft_graft"), f"{path.name} imports {node.module}"
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("peft_graft") for alias in node.names), path.name


def test_imports_only_go_down_the_layers():
    graph = import_graph.measure(PACKAGE)
    assert graph.modules > 40 and graph.edges > 100  # the graph was read, not an empty walk
    assert graph.upward == [], graph.upward


def test_importing_the_package_loads_only_the_tuner():
    code = (
        "import sys, peft_graft\n"
        "heavy = ('peft_graft.extraction', 'peft_graft.routing', 'peft_graft.hub', 'peft_graft.ops',\n"
        "         'peft_graft.evaluation', 'peft_graft.transfer', 'trl', 'datasets', 'evaluate')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trl', 'datasets', 'evaluate')\n"
        "             or m.startswith(heavy)))\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "print(PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GRAFT].__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded, tuner = result.stdout.strip().splitlines()
    assert loaded == "[]", loaded
    assert tuner == "GraftModel"


def test_the_public_api_resolves_lazily_and_completely():
    import peft_graft

    for name in peft_graft.__all__:
        assert getattr(peft_graft, name) is not None, name
    assert set(peft_graft.__all__) <= set(dir(peft_graft))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        peft_graft.nothing_here  # noqa: B018


def test_errors_subclass_the_standard_exception_they_stand_for_and_carry_their_subject():
    from peft_graft import errors

    hub = errors.HubError("cannot reach", repo_id="org/pack", revision="v1")
    assert isinstance(hub, OSError) and (hub.repo_id, hub.revision) == ("org/pack", "v1")
    mismatch = errors.BaseModelMismatchError("wrong base", expected="graft-fp1:a", found="graft-fp1:b")
    assert isinstance(mismatch, ValueError) and (mismatch.expected, mismatch.found) == ("graft-fp1:a", "graft-fp1:b")
    assert errors.CheckpointError("x", source="base", tensor="w").tensor == "w"
    defined = {
        name
        for path in _sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name.endswith("Error")
        for name in [f"{path.relative_to(PACKAGE)}:{node.name}"]
    }
    assert all(name.startswith("errors.py:") for name in defined), defined
    for name in dir(errors):
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, errors.GraftError) and value is not errors.GraftError:
            assert issubclass(value, (ValueError, OSError, ImportError)), name
