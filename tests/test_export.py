"""Export of a SkillPack as a standard PEFT LoRA adapter: logits match the pack for the parts exported."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig
from peft_graft.errors import ExportError
from peft_graft.ops import export_gguf, export_lora, export_vllm
from peft_graft_cli import main as cli

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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_lora_holds_every_pairs_exact_delta_under_llama_cpps_names_and_scaling(arch, tmp_path):
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    targets = ["q_proj", "k_proj", "v_proj", "down_proj"]
    _pack(arch, tmp_path / "pack", targets, r=6, rank_pattern={"v_proj": 3, "k_proj": 4})
    base_dir = tmp_path / "base"
    base = BUILDERS[arch]()
    base.save_pretrained(base_dir)
    lora = export_lora(tmp_path / "pack", tmp_path / "lora")
    expected = {  # the pack's delta per module, as its (exact) PEFT LoRA export computes it
        module: lora_b @ lora_a
        for module in lora.lora_modules
        for lora_a, lora_b in [
            (
                load_file(tmp_path / "lora" / "adapter_model.safetensors")[f"base_model.model.{module}.lora_A.weight"],
                load_file(tmp_path / "lora" / "adapter_model.safetensors")[f"base_model.model.{module}.lora_B.weight"],
            )
        ]
    }

    report = export_gguf(tmp_path / "pack", tmp_path / "pack.gguf", base=base_dir)

    reader = gguf.GGUFReader(tmp_path / "pack.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    assert fields["general.architecture"] == arch and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 6.0
    stored = {tensor.name: torch.from_numpy(tensor.data.copy()) for tensor in reader.tensors}
    assert len(stored) == 2 * len(expected) == 2 * len(report.lora_modules)
    config = {"num_attention_heads": base.config.num_attention_heads, "num_key_value_heads": 2}
    for module, delta in expected.items():
        layer, kind = module.split(".")[2], module.rsplit(".", 1)[1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "down_proj": "ffn_down"}[kind]
        a, b = stored[f"blk.{layer}.{name}.weight.lora_a"], stored[f"blk.{layer}.{name}.weight.lora_b"]
        rank = a.shape[0]
        assert a.shape == (rank, delta.shape[1]) and b.shape == (delta.shape[0], rank)
        product = (6.0 / rank) * (b @ a)  # llama.cpp's scale: alpha / rank
        if arch == "llama" and name in ("attn_q", "attn_k"):  # undo the rotary row order as transformers does
            processed = LlamaTensorProcessor(config=config).process(product.numpy(), f"blk.{layer}.{name}.weight")
            product = torch.from_numpy(processed.weights)
        torch.testing.assert_close(product, delta, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError):
        export_gguf(tmp_path / "pack", tmp_path / "pack.gguf", base=base_dir)
    with pytest.raises(ExportError, match=r"config\.json"):
        export_gguf(tmp_path / "pack", tmp_path / "other.gguf", base=tmp_path)


def test_vllm_export_writes_a_lora_per_pack_and_the_exact_launch_commands(tmp_path, capsys):
    import shutil

    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens", "input_layernorm"]
    base_dir = tmp_path / "base"
    BUILDERS["llama"]().save_pretrained(base_dir)
    for name, seed, options in (("math", 3, {"r": 6, "rank_pattern": {"v_proj": 3}}), ("code", 11, {"r": 4})):
        base = AutoModelForCausalLM.from_pretrained(base_dir)  # so that the packs record their base folder
        torch.manual_seed(seed)
        config = GraftConfig(target_modules=targets, init_weights=False, **options)
        get_peft_model(base, config).save_pretrained(tmp_path / name)
    first = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "math").eval()

    report = export_vllm({"math": tmp_path / "math", "code": tmp_path / "code"}, tmp_path / "vllm")

    single = export_lora(tmp_path / "math", tmp_path / "math-lora")
    assert (
        load_file(tmp_path / "vllm" / "math" / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "math-lora" / "adapter_model.safetensors").keys()
    )
    assert report.packs["math"].dropped == single.dropped and "model.embed_tokens" in single.dropped
    launch = json.loads((tmp_path / "vllm" / "launch.json").read_text())
    assert launch["vllm"][:4] == ["vllm", "serve", report.base, "--enable-lora"]
    modules = launch["vllm"][launch["vllm"].index("--lora-modules") + 1 : launch["vllm"].index("--max-lora-rank")]
    assert modules == [f"math={tmp_path / 'vllm' / 'math'}", f"code={tmp_path / 'vllm' / 'code'}"]
    assert launch["max_lora_rank"] == 8 and launch["vllm"][launch["vllm"].index("--max-lora-rank") + 1] == "8"
    assert launch["gateway"][:3] == ["peft-graft", "serve", "ROUTER_FOLDER"] and "--upstream" in launch["gateway"]
    for name in ("math", "code"):  # plain LoRA folders PEFT loads
        assert LoraConfig.from_pretrained(tmp_path / "vllm" / name).peft_type == "LORA"

    with pytest.raises(ExportError, match="carry different"):  # one merged base cannot serve both packs
        export_vllm({"math": tmp_path / "math", "code": tmp_path / "code"}, tmp_path / "merged", base=base_dir)
    assert not (tmp_path / "merged").exists()

    shutil.copytree(tmp_path / "math", tmp_path / "math-again")  # packs that agree on the non-LoRA parts
    shared = export_vllm({"a": tmp_path / "math", "b": tmp_path / "math-again"}, tmp_path / "shared", base=base_dir)
    assert shared.base == str(tmp_path / "shared" / "base") and sorted(shared.packs["a"].merged) == sorted(
        single.dropped
    )
    merged_base = AutoModelForCausalLM.from_pretrained(tmp_path / "shared" / "base", dtype=torch.float32)
    served = PeftModel.from_pretrained(merged_base, tmp_path / "shared" / "a").eval()
    torch.testing.assert_close(_logits(served), _logits(first), rtol=2e-2, atol=2e-2)  # bf16 merged base

    assert cli(["export", "--to", "vllm", str(tmp_path / "math"), str(tmp_path / "code"), str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "2 LoRA adapters" in out and "vllm serve" in out and "--engine vllm" in out
    assert cli(["export", "--to", "gguf", str(tmp_path / "math"), str(tmp_path / "code"), str(tmp_path / "x")]) == 2
    assert "exports one pack" in capsys.readouterr().err

    from peft_graft import RoutedGraftModel

    from tiny_models import tiny_tokenizer

    routed = RoutedGraftModel.from_packs(
        AutoModelForCausalLM.from_pretrained(base_dir),
        {"math": tmp_path / "math", "code": tmp_path / "code"},
        tiny_tokenizer(),
    )
    routed.save_pretrained(tmp_path / "router")  # copies the packs into router/packs/<name>
    assert cli(["export", "--to", "vllm", str(tmp_path / "router"), str(tmp_path / "from-router")]) == 0
    launch = json.loads((tmp_path / "from-router" / "launch.json").read_text())
    assert launch["gateway"][2] == str(tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "from-router").iterdir() if p.is_dir()) == ["code", "math"]
