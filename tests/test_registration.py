from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys

import pytest
from peft import PeftType
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import peft_graft
from peft_graft import GraftConfig, GraftModel
from peft_graft.integrations import register as register_graft_method


def test_graft_is_a_real_peft_type_member():
    member = PeftType.GRAFT
    assert member is PeftType("GRAFT") is PeftType["GRAFT"]
    assert member == "GRAFT" and member.value == "GRAFT" and member.name == "GRAFT"
    assert member in list(PeftType)
    assert pickle.loads(pickle.dumps(member)) is member
    assert json.dumps({"peft_type": member}) == '{"peft_type": "GRAFT"}'


def test_graft_is_registered_with_peft():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GRAFT] is GraftConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GRAFT] is GraftModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GRAFT] == "graft_"


def test_registering_again_and_reloading_are_harmless():
    members_before = list(PeftType)
    register_graft_method()
    register_graft_method()
    importlib.reload(peft_graft)
    assert list(PeftType) == members_before
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GRAFT] is peft_graft.GraftConfig


def test_a_foreign_registration_of_the_same_name_is_a_clear_error(monkeypatch):
    class OtherConfig:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_CONFIG_MAPPING, PeftType.GRAFT, OtherConfig)
    with pytest.raises(RuntimeError, match=r"already registered by .*OtherConfig"):
        register_graft_method()


def test_fresh_process_import_registers_and_needs_nothing_else():
    code = (
        "import peft_graft, peft_graft\n"
        "from peft import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.GRAFT].__name__ == 'GraftModel'\n"
        "print(len([m for m in PeftType if m.value == 'GRAFT']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "1"


def test_patches_outside_the_versions_they_were_written_for_are_not_applied_and_say_so(monkeypatch):
    import peft_graft.integrations as integrations

    applied = []
    patch = integrations.Patch("peft.something", "peft", ">=0.21,<0.22", lambda: applied.append(1), "X is missing")
    monkeypatch.setattr(integrations, "PATCHES", (patch,))
    monkeypatch.setattr(integrations, "version", lambda package: "0.22.0")
    with pytest.warns(
        RuntimeWarning, match=r"peft.something was not patched: .*peft>=0.21,<0.22.*0.22.0.*X is missing"
    ):
        integrations.register()
    assert applied == []
    monkeypatch.setattr(integrations, "version", lambda package: "0.21.2")
    integrations.register()
    assert applied == [1]
