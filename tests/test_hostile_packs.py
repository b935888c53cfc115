"""Hostile or inconsistent pack files: each is refused with a typed error before it can change the model."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_graft import GraftConfig, GraftConfigError, PackFormatError, RoutedGraftModel, allow_unverified_weights

from tiny_models import tiny_llama, tiny_tokenizer, token_batch

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def _saved_pack(path, targets=("q_proj", "v_proj")):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=list(targets), init_weights=False))
    model.save_pretrained(path)
    return path


def _rewrite(pack, change) -> None:
    """A hostile author's pack: the tensors changed, and the recorded hash made to match them (the hash catches
    damage, not authors), so that the checks behind it are what is tested."""
    tensors = load_file(pack / ADAPTER_FILE)
    change(tensors)
    save_file(tensors, pack / ADAPTER_FILE, metadata={"format": "pt"})
    _edit_config(pack, weights_sha256=hashlib.sha256((pack / ADAPTER_FILE).read_bytes()).hexdigest())


def _edit_config(pack, **changes) -> None:
    config = json.loads((pack / CONFIG_FILE).read_text())
    config.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del config[key]
    (pack / CONFIG_FILE).write_text(json.dumps(config))


def _flip_a_data_byte(file) -> None:
    data = bytearray(file.read_bytes())
    data[-5] ^= 0x10  # tensor data (the header is at the front): the file stays a valid safetensors file
    file.write_bytes(bytes(data))


def test_a_saved_pack_records_the_sha256_of_its_weights(tmp_path):
    pack = _saved_pack(tmp_path / "pack")
    recorded = json.loads((pack / CONFIG_FILE).read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((pack / ADAPTER_FILE).read_bytes()).hexdigest()


def test_flipped_bytes_in_the_weights_are_caught_before_loading(tmp_path, caplog, monkeypatch):
    pack = _saved_pack(tmp_path / "pack")
    reference = _logits(PeftModel.from_pretrained(tiny_llama(), pack))
    _flip_a_data_byte(pack / ADAPTER_FILE)
    base = tiny_llama().eval()
    before = _logits(base)
    with pytest.raises(PackFormatError, match=r"adapter_model.safetensors does not match the SHA-256"):
        PeftModel.from_pretrained(base, pack)
    assert torch.equal(_logits(base), before)
    with caplog.at_level(logging.WARNING, logger="peft_graft"), allow_unverified_weights():  # the explicit opt-out
        changed = _logits(PeftModel.from_pretrained(tiny_llama(), pack))
    assert "does not match" in caplog.text and not torch.equal(changed, reference)
    monkeypatch.setenv("PEFT_GRAFT_ALLOW_UNVERIFIED", "1")
    assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), pack)), changed)


def test_a_pack_saved_before_hashes_loads_with_a_warning(tmp_path, caplog):
    pack = _saved_pack(tmp_path / "pack")
    reference = _logits(PeftModel.from_pretrained(tiny_llama(), pack))
    _edit_config(pack, weights_sha256=None)
    with caplog.at_level(logging.WARNING, logger="peft_graft"):
        assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), pack)), reference)
    assert "carries no content hash" in caplog.text
    _edit_config(pack, weights_sha256="not-a-hash")
    with pytest.raises(GraftConfigError, match="weights_sha256 must be 64 lowercase hex digits"):
        PeftModel.from_pretrained(tiny_llama(), pack)


def test_a_router_with_flipped_bytes_is_caught_before_loading(tmp_path):
    tokenizer = tiny_tokenizer()
    packs = {"a": _saved_pack(tmp_path / "a", ("q_proj",)), "b": _saved_pack(tmp_path / "b", ("v_proj",))}
    routed = RoutedGraftModel.from_packs(tiny_llama(), packs, tokenizer)
    routed.fit_router({"a": ["1+1", "2+2", "3+3"], "b": ["cat", "dog", "owl"]})
    routed.save_pretrained(tmp_path / "router")
    recorded = json.loads((tmp_path / "router" / "router_config.json").read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((tmp_path / "router" / "router.safetensors").read_bytes()).hexdigest()
    RoutedGraftModel.from_pretrained(tiny_llama(), tmp_path / "router", tokenizer)
    _flip_a_data_byte(tmp_path / "router" / "router.safetensors")
    with pytest.raises(PackFormatError, match=r"router.safetensors does not match the SHA-256"):
        RoutedGraftModel.from_pretrained(tiny_llama(), tmp_path / "router", tokenizer)


def test_a_pack_holding_a_base_weight_is_refused_and_the_base_is_untouched(tmp_path):
    pack = _saved_pack(tmp_path / "pack")
    key = "base_model.model.model.layers.0.self_attn.k_proj.weight"
    _rewrite(pack, lambda tensors: tensors.__setitem__(key, torch.full((32, 64), 7.0)))
    base = tiny_llama().eval()
    before = _logits(base)
    with pytest.raises(PackFormatError, match=r"k_proj\.weight.*not a GRAFT tensor"):
        PeftModel.from_pretrained(base, pack)
    assert torch.equal(_logits(base), before)  # no injected layer left behind, no weight overwritten
    assert type(base.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_tensors_of_a_module_the_config_does_not_adapt_are_refused(tmp_path):
    pack = _saved_pack(tmp_path / "pack")

    def add_o_proj(tensors):
        for key in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
            tensors[key.replace("q_proj", "o_proj")] = tensors[key].clone()

    _rewrite(pack, add_o_proj)
    with pytest.raises(PackFormatError, match=r"holds tensors for .*o_proj.*does not adapt"):
        PeftModel.from_pretrained(tiny_llama(), pack)


def test_an_adapted_module_missing_from_the_file_is_refused(tmp_path):
    pack = _saved_pack(tmp_path / "pack")

    def drop_v_proj(tensors):
        for key in [k for k in tensors if ".layers.1.self_attn.v_proj." in k]:
            del tensors[key]

    _rewrite(pack, drop_v_proj)
    with pytest.raises(PackFormatError, match=r"adapts .*layers\.1\.self_attn\.v_proj.*no tensors"):
        PeftModel.from_pretrained(tiny_llama(), pack)


def test_an_untouched_pack_still_loads_to_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj", "embed_tokens"], init_weights=False))
    model.save_pretrained(tmp_path / "pack")
    expected = _logits(model.eval())
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack").eval()
    assert torch.allclose(_logits(loaded), expected, atol=1e-2, rtol=0)


@pytest.mark.parametrize(
    ("field", "pattern"),
    [
        ("target_modules", "(.*.*)*x"),  # 27 s against 16 characters of a module name, doubling per character
        ("target_modules", "(a+)+$"),
        ("exclude_modules", "(.*a){20}"),
        ("rank_pattern", "(x|x)*y"),
        ("target_modules", ".*.*.*.*.*z"),
        ("target_modules", r"(q)\1"),
        ("modules_to_save", "(?=a)b"),
    ],
)
def test_a_backtracking_module_pattern_in_a_pack_config_is_refused_at_once(tmp_path, field, pattern):
    import json

    pack = _saved_pack(tmp_path / "pack")
    config = json.loads((pack / "adapter_config.json").read_text())
    config[field] = {pattern: 4} if field == "rank_pattern" else [pattern] if field == "modules_to_save" else pattern
    (pack / "adapter_config.json").write_text(json.dumps(config))
    # before the check, PEFT's matching of these against the model's module names ran for minutes or longer
    with pytest.raises(GraftConfigError, match=r"not allowed|exponential|repetitions"):
        PeftModel.from_pretrained(tiny_llama(), pack)


def test_real_module_patterns_are_accepted():
    for pattern in (r".*\.layers\.\d+\.(q_proj|v_proj)", "model.layers.0.mlp.down_proj", r"^lm_head$", r"\d{1,2}"):
        GraftConfig(target_modules=pattern, rank_pattern={pattern: 8})
