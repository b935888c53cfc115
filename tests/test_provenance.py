"""Base-model fingerprints: recorded by extraction and save_pretrained, checked on attach, cheap to compute."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig, RoutedGraftModel, RoutingError, extract_skillpack
from peft_graft.errors import BaseModelMismatchError
from peft_graft.extraction.checkpoint import CheckpointReader
from peft_graft.extraction.roles import meta_model
from peft_graft.pack.provenance import (
    ALLOW_MISMATCH_ENV,
    allow_base_mismatch,
    base_parameters,
    fingerprint_checkpoint,
    fingerprint_model,
    fingerprint_variants,
    same_base,
)

from fine_tunes import save_pair
from tiny_models import tiny_llama, tiny_tokenizer, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float32])
def test_extraction_records_the_fingerprint_of_the_base_as_loaded_in_any_dtype(arch, stored, tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, arch, dtype=stored)
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", progress=False, skill="planted skill")
    config = json.loads((tmp_path / "pack" / "adapter_config.json").read_text())
    recorded = config["base_model_fingerprint"]
    # an fp32 base loaded in fp16 is rounded twice, which differs from rounding once at some sampled values: its
    # fingerprint records that variant too (bf16 and fp16 checkpoints round the same either way: one variant)
    assert len(fingerprint_variants(recorded)) == (2 if stored == torch.float32 else 1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        assert same_base(fingerprint_model(base), recorded), dtype
        PeftModel.from_pretrained(base, tmp_path / "pack")  # attaches without complaint
    if stored == torch.float32:  # the refusal this fixes: rounded twice, the direct variant alone would not match
        half = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float16)
        assert recorded.split(",")[0] not in fingerprint_variants(fingerprint_model(half))
    assert config["pack_info"]["skill"] == "planted skill"
    assert config["pack_info"]["finetuned"] == str(tuned_dir)
    card = ModelCard((tmp_path / "pack" / "README.md").read_text())  # extract writes the card
    assert "SkillPack: planted skill" in card.text and "| attn |" in card.text and "| mlp |" in card.text


def test_a_different_base_with_the_same_shapes_is_refused_naming_both(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama", dtype=torch.bfloat16)
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", progress=False)
    other_dir = tmp_path / "other-base"
    tiny_llama(seed=7, hidden_size=128, intermediate_size=256).to(torch.bfloat16).save_pretrained(other_dir)
    other = AutoModelForCausalLM.from_pretrained(other_dir)
    before = {name: p.clone() for name, p in other.named_parameters()}
    with pytest.raises(BaseModelMismatchError) as caught:
        PeftModel.from_pretrained(other, tmp_path / "pack")
    message = str(caught.value)
    assert str(base_dir) in message and str(other_dir) in message and "force=True" in message
    # refused before anything was attached: the base is untouched
    assert not any("graft" in name for name, _ in other.named_parameters())
    assert all(torch.equal(p, before[name]) for name, p in other.named_parameters())


def test_force_and_the_environment_variable_attach_with_a_warning(tmp_path, monkeypatch, caplog):
    torch.manual_seed(0)
    get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj"], init_weights=False)).save_pretrained(
        tmp_path / "pack"
    )
    with caplog.at_level(logging.WARNING, logger="peft_graft.pack.provenance"), allow_base_mismatch():
        PeftModel.from_pretrained(tiny_llama(seed=3), tmp_path / "pack")
    assert "Attaching anyway" in caplog.text
    monkeypatch.setenv(ALLOW_MISMATCH_ENV, "1")
    PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "pack")
    monkeypatch.delenv(ALLOW_MISMATCH_ENV)
    with pytest.raises(BaseModelMismatchError):
        PeftModel.from_pretrained(tiny_llama(seed=4), tmp_path / "pack")
    routed = RoutedGraftModel.from_packs(tiny_llama(seed=5), {"q": tmp_path / "pack"}, tiny_tokenizer(), force=True)
    assert routed.labels == ["q"]


def test_trained_packs_record_their_base_and_adapters_or_grown_vocab_do_not_change_it():
    base = tiny_llama()
    clean = fingerprint_model(base)
    assert clean == fingerprint_model(tiny_llama()) != fingerprint_model(tiny_llama(seed=1))
    model = get_peft_model(base, GraftConfig(target_modules=["q_proj", "embed_tokens"], init_weights=False))
    assert fingerprint_model(model) == clean  # wrappers and adapter weights are not the base
    model.base_model.model.resize_token_embeddings  # noqa: B018  (exists; growth goes through grow_vocabulary)
    from peft_graft import grow_vocabulary

    grow_vocabulary(model.get_base_model(), 140)
    assert fingerprint_model(model) == clean  # the rows the base had before growing are what count
    model.merge_adapter()
    assert fingerprint_model(model) is None  # merged weights are not the base: verification is skipped


def test_fingerprinting_a_checkpoint_reads_a_few_values_per_tensor_not_the_tensors(tmp_path, monkeypatch):
    base_dir, _ = save_pair(tmp_path, "llama", dtype=torch.bfloat16)
    reader = CheckpointReader(base_dir)

    def no_full_reads(*args, **kwargs):
        raise AssertionError("fingerprinting read a whole tensor")

    monkeypatch.setattr(reader, "get_rows", no_full_reads)
    calls = []
    original = reader.get_values
    monkeypatch.setattr(
        reader, "get_values", lambda name, positions: calls.append(len(positions)) or original(name, positions)
    )
    names = base_parameters(meta_model(str(base_dir)))
    fingerprint = fingerprint_checkpoint(reader, names)
    assert fingerprint == fingerprint_model(AutoModelForCausalLM.from_pretrained(base_dir))
    assert len(calls) == len(names) and set(calls) == {4}


def test_router_refuses_packs_made_for_different_bases(tmp_path):
    for seed, name in ((0, "a"), (9, "b")):
        torch.manual_seed(seed)
        get_peft_model(
            tiny_llama(seed=seed), GraftConfig(target_modules=["q_proj"], init_weights=False)
        ).save_pretrained(tmp_path / name)
    with pytest.raises(RoutingError, match="different base models"):
        RoutedGraftModel.from_packs(tiny_llama(), {"a": tmp_path / "a", "b": tmp_path / "b"}, tiny_tokenizer())
    routed = RoutedGraftModel.from_packs(tiny_llama(), {"a": tmp_path / "a"}, tiny_tokenizer())
    with pytest.raises(RoutingError, match="different base models"):
        routed.add_pack("b", tmp_path / "b")
    assert routed.labels == ["a"]
    logits = routed(token_batch(), routes=["a"] * 3).logits
    assert torch.isfinite(logits).all()
