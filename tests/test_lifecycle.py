"""The PEFT lifecycle with GRAFT packs: save, load (fresh process too), AutoPeftModel, several adapters, merges."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig, GraftLayer, PackFormatError, allow_unverified_weights
from peft_graft.errors import BaseModelMismatchError
from peft_graft.pack.provenance import allow_base_mismatch

from compat import needs_transformers_adapter_api
from tiny_models import BUILDERS, EMBED_TARGETS, LINEAR_TARGETS, tiny_gpt2, tiny_llama, tiny_qwen2, token_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*embedding layers found in:UserWarning")

ADAPTER_FILE = "adapter_model.safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _save_base(builder, path: Path, **overrides) -> Path:
    builder(**overrides).save_pretrained(path)
    return path


def _pack(base, path: Path, targets, seed: int = 0, **config) -> tuple[Path, torch.Tensor]:
    """Save a random GRAFT pack for `base`; return its folder and the in-memory model's logits."""
    torch.manual_seed(seed)
    model = get_peft_model(base, GraftConfig(target_modules=targets, init_weights=False, **config)).eval()
    model.save_pretrained(path)
    logits = _logits(model, token_batch())
    model.unload()
    return path, logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_pack_loads_in_a_fresh_process_within_1_percent_and_resaves_bit_identically(arch, tmp_path):
    base_dir = _save_base(BUILDERS[arch], tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = token_batch()
    base_logits = _logits(base, ids)
    targets = LINEAR_TARGETS[arch] + EMBED_TARGETS[arch]
    pack_dir, in_memory = _pack(base, tmp_path / "pack", targets, precision_bands=[(None, 8)], r=8)

    script = textwrap.dedent(
        f"""
        import torch, peft_graft
        from peft import PeftModel
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r}).eval()
        model = PeftModel.from_pretrained(base, {str(pack_dir)!r})
        ids = torch.tensor({ids.tolist()})
        with torch.no_grad():
            save_file({{"logits": model(ids).logits}}, {str(tmp_path / "logits.safetensors")!r})
        model.save_pretrained({str(tmp_path / "resaved")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    reloaded = load_file(tmp_path / "logits.safetensors")["logits"]

    # 8-bit bands: error relative to the adapter's own effect on the logits, not just to the logits.
    assert float((reloaded - in_memory).norm() / (in_memory - base_logits).norm()) < 0.01
    assert float((reloaded - in_memory).norm() / in_memory.norm()) < 0.01
    assert _sha256(pack_dir / ADAPTER_FILE) == _sha256(tmp_path / "resaved" / ADAPTER_FILE)
    assert json.loads((pack_dir / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "resaved" / "adapter_config.json").read_text()
    )


def test_pack_file_holds_packed_integers_and_4_bit_bands_are_under_0_3x_fp16(tmp_path):
    base = tiny_llama(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4)
    pack_dir, _ = _pack(base, tmp_path / "pack", LINEAR_TARGETS["llama"], r=64, precision_bands=[(None, 4)])
    tensors = load_file(pack_dir / ADAPTER_FILE)
    codes = {name: t for name, t in tensors.items() if name.endswith("_codes")}
    assert codes and all(t.dtype == torch.uint8 for t in codes.values())
    assert not any(name.endswith(("graft_U", "graft_V")) for name in tensors), "float factors must not be stored"
    fp16_factor_bytes = 0
    for module in base.modules():
        if isinstance(module, GraftLayer):  # unloaded above, so none should remain
            raise AssertionError("unload() left GRAFT layers behind")
    for name in {n.rsplit(".graft_", 1)[0] for n in tensors}:
        rank = tensors[f"{name}.graft_S"].numel()
        linear = base.get_submodule(name.removeprefix("base_model.model."))
        fp16_factor_bytes += 2 * rank * (linear.in_features + linear.out_features + 1)
    ratio = (pack_dir / ADAPTER_FILE).stat().st_size / fp16_factor_bytes
    assert ratio <= 0.3, f"4-bit pack is {ratio:.3f}x the fp16 factors"


def test_base_embedding_weights_are_never_copied_into_a_pack(tmp_path):
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj", "embed_tokens", "lm_head"], embed_density=0.02)
    names = load_file(pack_dir / ADAPTER_FILE).keys()
    assert names and all(".graft_" in name for name in names), sorted(names)
    assert (pack_dir / ADAPTER_FILE).stat().st_size < 64 * 128 * 2  # smaller than one fp16 embedding matrix


def test_auto_peft_model_for_causal_lm(tmp_path):
    base_dir = _save_base(tiny_llama, tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(
        base, GraftConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_weights=False)
    )
    model.save_pretrained(tmp_path / "pack")
    auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "pack").eval()
    explicit = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack").eval()
    assert isinstance(auto, PeftModel)
    assert torch.equal(_logits(auto, token_batch()), _logits(explicit, token_batch()))


def test_several_adapters_load_set_disable_and_delete(tmp_path):
    ids = token_batch()
    pack_a, _ = _pack(tiny_llama(), tmp_path / "a", ["q_proj", "v_proj"], seed=1)
    pack_b, _ = _pack(tiny_llama(), tmp_path / "b", ["q_proj", "down_proj", "embed_tokens"], seed=2)
    alone_a = _logits(PeftModel.from_pretrained(tiny_llama(), pack_a), ids)
    alone_b = _logits(PeftModel.from_pretrained(tiny_llama(), pack_b), ids)
    base_logits = _logits(tiny_llama(), ids)

    model = PeftModel.from_pretrained(tiny_llama(), pack_a, adapter_name="a")
    model.load_adapter(pack_b, adapter_name="b")
    assert torch.equal(_logits(model, ids), alone_a)
    model.set_adapter("b")
    assert torch.equal(_logits(model, ids), alone_b)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base_logits)
    assert torch.equal(_logits(model, ids), alone_b)

    model.delete_adapter("b")
    assert "b" not in model.peft_config
    assert not any(
        "b" in layer.graft_S or "b" in layer.graft_values for layer in model.modules() if isinstance(layer, GraftLayer)
    )
    model.set_adapter("a")
    assert torch.equal(_logits(model, ids), alone_a)


def test_merge_unmerge_merge_and_unload_and_unload_of_a_loaded_pack(tmp_path):
    ids = token_batch()
    pristine = _logits(tiny_llama(), ids)
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", LINEAR_TARGETS["llama"] + EMBED_TARGETS["llama"])
    model = PeftModel.from_pretrained(tiny_llama(), pack_dir)
    unmerged = _logits(model, ids)
    model.merge_adapter()
    assert torch.allclose(_logits(model, ids), unmerged, atol=1e-4)
    model.unmerge_adapter()
    assert torch.equal(_logits(model, ids), unmerged)
    merged = PeftModel.from_pretrained(tiny_llama(), pack_dir).merge_and_unload()
    assert not any(isinstance(m, GraftLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged, ids), unmerged, atol=1e-4)
    plain = PeftModel.from_pretrained(tiny_llama(), pack_dir).unload()
    assert torch.equal(_logits(plain, ids), pristine)


@needs_transformers_adapter_api
def test_transformers_load_adapter_matches_peft_model(tmp_path):
    ids = token_batch()
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj", "v_proj", "embed_tokens"])
    expected = _logits(PeftModel.from_pretrained(tiny_llama(), pack_dir), ids)
    model = tiny_llama()
    model.load_adapter(str(pack_dir), adapter_name="skill")
    assert torch.equal(_logits(model, ids), expected)
    model.disable_adapters()
    assert torch.equal(_logits(model, ids), _logits(tiny_llama(), ids))


def test_low_cpu_mem_usage_loading_gives_the_same_model(tmp_path):
    ids = token_batch()
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj", "v_proj", "embed_tokens", "lm_head"])
    expected = _logits(PeftModel.from_pretrained(tiny_llama(), pack_dir), ids)
    lazy = PeftModel.from_pretrained(tiny_llama(), pack_dir, low_cpu_mem_usage=True)
    assert torch.equal(_logits(lazy, ids), expected)


def test_decoding_targets_the_adapter_dtype_once(tmp_path):
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj"])
    bf16_base = tiny_llama().to(torch.bfloat16)
    upcast = PeftModel.from_pretrained(bf16_base, pack_dir)
    layer = upcast.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.graft_U["default"].dtype == torch.float32
    native = PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), pack_dir, autocast_adapter_dtype=False)
    layer = native.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.graft_U["default"].dtype == torch.bfloat16
    assert _logits(native, token_batch()).dtype == torch.bfloat16


def test_the_pack_file_decides_each_modules_form_and_rank(tmp_path):
    pack_dir, in_memory = _pack(tiny_llama(), tmp_path / "pack", ["q_proj"], r=8)
    config_path = pack_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = 4  # the weights say 8: the file wins
    config_path.write_text(json.dumps(config))
    model = PeftModel.from_pretrained(tiny_llama(), pack_dir)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.rank("default") == 8
    assert torch.allclose(_logits(model, token_batch()), in_memory, atol=1e-2)


def test_tied_embedding_deltas_are_stored_once_and_reload_tied(tmp_path):
    pack_dir, in_memory = _pack(tiny_qwen2(), tmp_path / "pack", ["q_proj", "embed_tokens", "lm_head"])
    names = load_file(pack_dir / ADAPTER_FILE).keys()
    assert any(".embed_tokens.graft_" in n for n in names) and not any("lm_head" in n for n in names)
    assert json.loads((pack_dir / "adapter_config.json").read_text())["target_modules_to_tie"] == ["lm_head"]
    model = PeftModel.from_pretrained(tiny_qwen2(), pack_dir)
    assert "default" in model.get_output_embeddings().graft_tied
    assert float((_logits(model, token_batch()) - in_memory).abs().max()) < 0.05


def test_norm_and_bias_deltas_round_trip(tmp_path):
    pack_dir, in_memory = _pack(tiny_gpt2(), tmp_path / "pack", ["ln_1", "ln_2", "ln_f"], precision_bands=[(None, 8)])
    names = load_file(pack_dir / ADAPTER_FILE).keys()
    assert any(n.endswith("ln_f.graft_values") for n in names) and any(n.endswith("ln_f.graft_bias") for n in names)
    model = PeftModel.from_pretrained(tiny_gpt2(), pack_dir)
    assert torch.allclose(_logits(model, token_batch()), in_memory, atol=1e-3)


def test_a_pack_for_a_different_shape_is_a_clear_error(tmp_path):
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj"], r=8)
    with pytest.raises(BaseModelMismatchError, match="was made for base"):  # the base fingerprint catches it first
        PeftModel.from_pretrained(tiny_llama(hidden_size=32, intermediate_size=64), pack_dir)
    with allow_base_mismatch(), pytest.raises(PackFormatError, match="must belong to this base model"):
        PeftModel.from_pretrained(tiny_llama(hidden_size=32, intermediate_size=64), pack_dir)


def test_a_corrupted_pack_file_is_a_clear_error(tmp_path):
    pack_dir, _ = _pack(tiny_llama(), tmp_path / "pack", ["q_proj"], precision_bands=[(None, 4)])
    tensors = load_file(pack_dir / ADAPTER_FILE)
    key = next(name for name in tensors if name.endswith("_codes"))
    tensors[key] = tensors[key][:-3]
    save_file(tensors, pack_dir / ADAPTER_FILE, metadata={"format": "pt"})
    with pytest.raises(PackFormatError, match=r"does not match the SHA-256"):  # the hash sees it first
        PeftModel.from_pretrained(tiny_llama(), pack_dir)
    with allow_unverified_weights(), pytest.raises(PackFormatError, match=r"module .*q_proj.*cannot hold exactly"):
        PeftModel.from_pretrained(tiny_llama(), pack_dir)  # and the format check behind it


def test_transformers_from_pretrained_on_a_pack_folder_loads_base_and_pack(tmp_path):
    base_dir = _save_base(tiny_llama, tmp_path / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir), GraftConfig(target_modules=["q_proj"], init_weights=False)
    )
    model.save_pretrained(tmp_path / "pack")
    expected = _logits(
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack"), token_batch()
    )
    direct = AutoModelForCausalLM.from_pretrained(tmp_path / "pack").eval()
    assert torch.equal(_logits(direct, token_batch()), expected)


def test_transformers_load_adapter_leaves_other_adapter_types_to_transformers(tmp_path):
    from peft import LoraConfig

    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    expected = _logits(lora, token_batch())
    model = tiny_llama()
    model.load_adapter(str(tmp_path / "lora"))
    assert torch.allclose(_logits(model, token_batch()), expected, atol=1e-6)
