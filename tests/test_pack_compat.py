"""Packs written by earlier peft-graft code (tests/fixtures/v1_packs, see make_v1_packs.py) load to the same model and
re-save to the same bytes: the pack format is a contract, whatever the code around it becomes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tiny_models import token_batch

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v1_packs"

pytestmark = pytest.mark.filterwarnings("ignore:.*embedding layers found in:UserWarning")


@pytest.mark.parametrize("pack", ["extracted", "trained"])
def test_v1_pack_loads_identically_and_resaves_byte_for_byte(pack, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(FIXTURES / "base", dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, FIXTURES / pack).eval()
    with torch.no_grad():
        logits = model(token_batch()).logits
    expected = load_file(FIXTURES / "expected_logits.safetensors")[pack]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    written = (FIXTURES / pack / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == written
    resaved_configs = json.loads((FIXTURES / "resaved_configs.json").read_text())
    resaved = json.loads((tmp_path / "adapter_config.json").read_text())
    # a v1 pack carries no content hash; re-saving records the hash of the (byte-identical) weights, nothing else
    assert resaved.pop("weights_sha256") == hashlib.sha256(written).hexdigest()
    assert resaved == json.loads(resaved_configs[pack])
