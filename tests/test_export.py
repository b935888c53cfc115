"""Export of a SkillPack as a standard PEFT LoRA adapter: logits match the pack for the parts exported."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig
from peft_graft.cli import main as cli
from peft_graft.errors import ExportError
from peft_graft.ops import export_lora

from tiny_models import BUILDERS, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LOWRANK_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def _pack(arch: str, folder, targets, **options):
    base = BUILDERS[arch]()
    torch.manual_seed(3)
    model = get_peft_model(base, GraftConfig(target_modules=targets, init_weights=False, **options))
    model.save_pretrained(folder)
    return PeftModel.from_pretrained(BUILDERS[arch](), folder).eval()  # the pack as loaded: dequantized factors


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_lora_reproduces_a_low_rank_pack(arch, tmp_path):
    pack = _pack(arch, tmp_path / "pack", LOWRANK_TARGETS[arch], r=6, rank_pattern={"v_proj": 3, "c_fc": 3})
    report = export_lora(tmp_path / "pack", tmp_path / "lora")
    assert not report.dropped
    config = LoraConfig.from_pretrained(tmp_path / "lora")  # a plain LoRA adapter, loaded by PEFT itself
    assert config.peft_type == "LORA" and config.r == 6 and config.lora_alpha == 6
    lora = PeftModel.from_pretrained(BUILDERS[arch](), tmp_path / "lora").eval()
    expected, actual, base = _logits(pack), _logits(lora), _logits(BUILDERS[arch]())
    assert (expected - base).abs().max() > 1e-2  # the pack does change the model
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    ranks = {name: module.r["default"] for name, module in lora.named_modules() if hasattr(module, "lora_A")}
    assert sorted(set(ranks.values())) == [3, 6]


def test_parts_lora_cannot_hold_are_dropped_with_a_warning_or_merged_into_the_base(tmp_path, caplog):
    targets = ["q_proj", "v_proj", "embed_tokens", "lm_head", "input_layernorm"]
    pack = _pack("llama", tmp_path / "pack", targets, r=4)
    with caplog.at_level(logging.WARNING, logger="peft_graft.ops.export"):
        dropped = export_lora(tmp_path / "pack", tmp_path / "lora-only")
    assert "embed_tokens" in caplog.text and "lm_head" in caplog.text and "--merged-base" in caplog.text
    assert sorted(dropped.dropped) == sorted(
        ["model.embed_tokens", "lm_head", "model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    )
    weights = json.loads((tmp_path / "lora-only" / "adapter_config.json").read_text())
    assert sorted(weights["target_modules"]) == sorted(dropped.lora_modules)

    base_dir = tmp_path / "base"
    BUILDERS["llama"]().save_pretrained(base_dir)
    merged = export_lora(tmp_path / "pack", tmp_path / "lora", base=base_dir, merged_base_dir=tmp_path / "merged")
    assert sorted(merged.merged) == sorted(dropped.dropped) and not merged.dropped
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tmp_path / "lora")
    torch.testing.assert_close(_logits(served.eval()), _logits(pack), rtol=1e-5, atol=1e-5)
    # the LoRA alone on the untouched base lacks exactly the merged parts
    alone = PeftModel.from_pretrained(BUILDERS["llama"](), tmp_path / "lora-only").eval()
    assert (_logits(alone) - _logits(pack)).abs().max() > 1e-3


def test_cli_export_and_clear_errors(tmp_path, capsys):
    _pack("llama", tmp_path / "pack", ["q_proj"], r=4)
    assert cli(["export", "--to", "lora", str(tmp_path / "pack"), str(tmp_path / "lora")]) == 0
    assert "LoRA adapter: 2 modules" in capsys.readouterr().out
    assert cli(["export", str(tmp_path / "pack"), str(tmp_path / "lora")]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "pack"), str(tmp_path / "other"), "--base", str(tmp_path)]) == 2
    assert "go together" in capsys.readouterr().err
    _pack("llama", tmp_path / "sparse-only", ["embed_tokens"])
    with pytest.raises(ExportError, match="no low-rank deltas"):
        export_lora(tmp_path / "sparse-only", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_peft_convert_to_lora_takes_a_pack_of_linear_deltas(arch, tmp_path):
    """GraftLinear implements PEFT's supports_lora_conversion hook, so PEFT's own convert_to_lora works on packs."""
    from peft import convert_to_lora, set_peft_model_state_dict

    pack = _pack(arch, tmp_path / "pack", LOWRANK_TARGETS[arch], r=6)
    lora_config, state_dict = convert_to_lora(pack, rank=6)
    assert lora_config.peft_type == "LORA" and state_dict
    lora = get_peft_model(BUILDERS[arch](), lora_config).eval()
    set_peft_model_state_dict(lora, state_dict)
    expected, base = _logits(pack), _logits(BUILDERS[arch]())
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(_logits(lora), expected, rtol=1e-4, atol=1e-4)


def test_peft_convert_to_lora_refuses_a_pack_with_deltas_lora_cannot_hold(tmp_path):
    from peft import convert_to_lora

    pack = _pack("llama", tmp_path / "pack", ["q_proj", "embed_tokens", "input_layernorm"], r=4)
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        convert_to_lora(pack, rank=4)
