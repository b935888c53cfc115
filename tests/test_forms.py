"""The forms a budget plan chooses between: group-quantized dense deltas and low-rank embeddings, end to end (codec,
extraction, PEFT forward, merge, mixed batches, re-save, LoRA export), and the `forms` serving profile."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_graft import BASE_ADAPTER, extract_skillpack
from peft_graft.compress.dense import quantize_dense, rounding_errors
from peft_graft.errors import ExportError, GraftConfigError, PackFormatError
from peft_graft.extraction.roles import module_specs
from peft_graft.ops import export_lora, pack_deltas
from peft_graft.pack.codec import decode_module, encode_quantized_dense

from fine_tunes import build, plant_delta
from tiny_models import tiny_tokenizer, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_quantized_dense_delta_round_trips_within_half_a_step(bits):
    delta = torch.randn(70, 300, generator=torch.Generator().manual_seed(bits)) * 1e-2  # a partial last group
    quantized = quantize_dense(delta, bits, 128)
    decoded = decode_module(encode_quantized_dense(quantized), (70, 300)).tensors["graft_values"]
    assert decoded.shape == (70, 300)
    step = quantized.scales.float()[:, torch.arange(300) // 128]
    assert bool(((decoded - delta).abs() <= step / 2 + 1e-7).all())
    assert float((decoded - delta).norm() / delta.norm()) < {2: 0.6, 3: 0.25, 4: 0.12, 8: 0.01}[bits]
    with pytest.raises(PackFormatError, match="must belong to this base model"):
        decode_module(encode_quantized_dense(quantized), (300, 70))


def _pair(tmp_path, arch: str = "llama", noise: float = 2e-2, mlp_noise: float = 0.0, embed_noise: float = 0.0):
    """A base and a fine-tune whose projection deltas are mostly full-rank noise (a full fine-tune's, not LoRA's),
    or low-rank with full-rank MLP deltas (`noise` small, `mlp_noise` large); `embed_noise` changes every embedding
    row (as a full fine-tune of a tied output embedding does)."""
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    build(arch).save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    tuned = build(arch)
    plant_delta(tuned, rank=4, noise=noise)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if ".mlp." in name:
                parameter += mlp_noise * torch.randn(parameter.shape, generator=generator)
            if "embed_tokens" in name or "lm_head" in name:
                parameter += embed_noise * torch.randn(parameter.shape, generator=generator)
    tuned.save_pretrained(tuned_dir)
    return base_dir, tuned_dir


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch()).logits


def test_a_full_rank_fine_tune_is_quantized_dense_and_served_unmerged_merged_and_in_mixed_batches(tmp_path):
    base_dir, tuned_dir = _pair(tmp_path)
    packs = {}
    for forms in ("any", "lowrank"):
        report = extract_skillpack(base_dir, tuned_dir, tmp_path / forms, budget=1 / 4, forms=forms, progress=False)
        packs[forms] = {m.name: m for m in report.modules}
        assert report.ratio <= 0.25
    projections = {name: m for name, m in packs["any"].items() if m.role in ("attn", "mlp")}
    assert {m.form for m in projections.values()} == {"quantized"}  # 3-4 bits keep far more than rank r at 1/4
    assert all(m.form == "lowrank" for m in packs["lowrank"].values() if m.role in ("attn", "mlp"))
    assert all(m.frobenius_error < 0.25 for m in projections.values())  # 3-4 bits: ~0.2 and ~0.1

    tuned = _logits(AutoModelForCausalLM.from_pretrained(tuned_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "any", "any")
    model.load_adapter(tmp_path / "lowrank", "lowrank")
    model.eval()
    model.set_adapter("any")
    unmerged = _logits(model)
    model.set_adapter("lowrank")
    lowrank = _logits(model)
    # at the same budget the quantized pack is much closer to the fine-tune
    assert (unmerged - tuned).norm() < 0.7 * (lowrank - tuned).norm()  # measured 0.51
    ids = token_batch(batch=3)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["any", "lowrank", BASE_ADAPTER]).logits
        model.set_adapter("any")
        alone = model(ids[:1]).logits
        model.merge_adapter()
        merged = _logits(model)
        model.unmerge_adapter()
    torch.testing.assert_close(mixed[:1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_a_quantized_pack_resaves_byte_identically(tmp_path):
    base_dir, tuned_dir = _pair(tmp_path)
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 4, progress=False)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack")
    model.save_pretrained(tmp_path / "again")
    original = (tmp_path / "pack" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "again" / "adapter_model.safetensors").read_bytes() == original


def test_lora_export_refuses_quantized_projections_unless_merged_and_takes_a_lowrank_profile_pack(tmp_path):
    base_dir, tuned_dir = _pair(tmp_path, noise=5e-4, mlp_noise=5e-2)  # low-rank attention, full-rank MLP deltas
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "any", budget=1 / 4, progress=False)
    forms = {m.name: m.form for m in report.modules}
    assert "quantized" in {forms[n] for n in forms if ".mlp." in n}
    assert {forms[n] for n in forms if ".self_attn." in n} == {"lowrank"}
    with pytest.raises(ExportError, match="forms='lowrank'"):
        export_lora(tmp_path / "any", tmp_path / "lora-any")
    assert not (tmp_path / "lora-any").exists()
    merged = export_lora(tmp_path / "any", tmp_path / "lora", base=base_dir, merged_base_dir=tmp_path / "merged")
    assert any("mlp" in name for name in merged.merged)
    pack = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "any").eval()
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tmp_path / "lora")
    torch.testing.assert_close(_logits(served.eval()), _logits(pack), rtol=1e-4, atol=1e-4)

    extract_skillpack(base_dir, tuned_dir, tmp_path / "low", budget=1 / 4, forms="lowrank", progress=False)
    exported = export_lora(tmp_path / "low", tmp_path / "lora-low")
    assert all(name.endswith("_proj") for name in exported.lora_modules)
    assert all("proj" not in name for name in exported.dropped)  # only embeddings and norms lack a LoRA form


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["untied", "tied"])
def test_an_embedding_delta_of_few_directions_is_packed_low_rank_and_served_without_building_it(arch, tmp_path):
    base_dir, tuned_dir = _pair(tmp_path, arch, noise=5e-4)  # eight changed embedding rows: a rank-8 delta
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 8, progress=False)
    embeddings = [m for m in report.modules if m.role == "embed"]
    assert embeddings and all(m.form == "lowrank" and m.rank <= 8 for m in embeddings)
    assert all(m.frobenius_error < 0.05 for m in embeddings)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack").eval()
    unmerged = _logits(model)
    with torch.no_grad():
        mixed = model(token_batch(batch=2), adapter_names=["default", BASE_ADAPTER]).logits
        model.merge_adapter()
        merged = _logits(model)
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[:1], unmerged[:1], rtol=1e-4, atol=1e-4)
    base = _logits(AutoModelForCausalLM.from_pretrained(base_dir))
    torch.testing.assert_close(mixed[1:], base[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"], ids=["untied", "tied"])
def test_an_embedding_delta_spread_over_every_row_is_quantized_dense_and_served(arch, tmp_path):
    base_dir, tuned_dir = _pair(tmp_path, arch, noise=5e-4, embed_noise=2e-2)  # full-rank noise in every row
    forms = {}
    for profile in ("any", "lowrank"):
        report = extract_skillpack(base_dir, tuned_dir, tmp_path / profile, budget=1 / 4, forms=profile, progress=False)
        forms[profile] = [m for m in report.modules if m.role == "embed"]
    assert forms["any"] and all(m.form == "quantized" and m.frobenius_error < 0.25 for m in forms["any"])
    assert all(m.form != "quantized" for m in forms["lowrank"])  # the LoRA-exportable profile never quantizes

    tuned = _logits(AutoModelForCausalLM.from_pretrained(tuned_dir))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "any", "any")
    model.load_adapter(tmp_path / "lowrank", "lowrank")
    model.eval()
    unmerged = _logits(model)
    model.set_adapter("lowrank")
    assert (unmerged - tuned).norm() < 0.75 * (_logits(model) - tuned).norm()  # measured 0.61 (untied)
    model.set_adapter("any")
    ids = token_batch(batch=2)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["any", BASE_ADAPTER]).logits
        model.merge_adapter()
        merged = _logits(model)
        model.unmerge_adapter()
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[:1], unmerged[:1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed[1:], _logits(AutoModelForCausalLM.from_pretrained(base_dir))[1:2])
    model.save_pretrained(tmp_path / "again", selected_adapters=["any"])
    again = tmp_path / "again" / "any" / "adapter_model.safetensors"
    assert again.read_bytes() == (tmp_path / "any" / "adapter_model.safetensors").read_bytes()


def test_an_unknown_profile_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(GraftConfigError, match="forms must be one of any, lowrank"):
        extract_skillpack(tmp_path / "nothing", tmp_path / "nothing", tmp_path / "out", budget=0.1, forms="dense")
    assert not (tmp_path / "out").exists()


def test_a_calibrated_layer_replan_keeps_the_budget_and_picks_directions_by_output_error(tmp_path):
    base_dir, tuned_dir = _pair(tmp_path, noise=5e-4, mlp_noise=5e-2)
    texts = ["The quick brown fox jumps over the lazy dog, again and again."] * 8
    settings = {"budget": 1 / 16, "calibration": texts, "batch_size": 4, "progress": False}
    plain = extract_skillpack(base_dir, tuned_dir, tmp_path / "plain", **settings)
    replanned = extract_skillpack(base_dir, tuned_dir, tmp_path / "replan", layer_replan=True, **settings)
    assert replanned.pack_bytes <= replanned.fp16_delta_bytes / 16
    plans = [{m.name: (m.form, m.rank, m.bits) for m in r.modules} for r in (plain, replanned)]
    assert plans[0] != plans[1]  # the Hessians moved bytes between the layers' projections
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "replan").eval()
    unmerged = _logits(model)
    with torch.no_grad():
        model.merge_adapter()
        merged = _logits(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("budget", [None, 1 / 64], ids=["sparse", "budget"])
def test_calibration_keeps_the_embedding_rows_of_its_tokens(budget, tmp_path):
    """A skill's tokens are few and their rows may change less than others (measured on the arithmetic fine-tune:
    none of its 35 calibration tokens is among the 50 rows that changed most). With calibration, those rows weigh
    by their frequency, so the pack keeps them where the data-free plan spends on the largest rows."""
    base_dir, tuned_dir = tmp_path / "base", tmp_path / "tuned"
    build("llama").save_pretrained(base_dir)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(base_dir)
    tuned = build("llama")
    digits = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123")))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in tuned.named_parameters():
            if "embed_tokens" in name or "lm_head" in name:
                change = 0.05 * torch.randn(parameter.shape, generator=generator)
                change[digits] *= 0.5  # the skill's rows change least
                parameter += change
    tuned.save_pretrained(tuned_dir)
    texts = ["".join(str((a * b + c) % 4) for c in range(24)) for a in range(6) for b in range(4)]
    # budget: the LoRA profile, whose embedding forms (low-rank, sparse) choose rows; a quantized embedding (`any`)
    # spends the same bits on every row, with or without calibration
    settings = {"budget": budget, "batch_size": 8, "progress": False}
    if budget is not None:
        settings["forms"] = "lowrank"
    errors = []
    variants = (("data-free", None, True), ("calibrated", texts, True), ("plain", texts, False))
    for name, calibration, weighted in variants:
        out = tmp_path / name
        extract_skillpack(base_dir, tuned_dir, out, calibration=calibration, row_weights=weighted, **settings)
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        packed = pack_deltas(base, out)["model.embed_tokens.weight"]
        delta = dict(tuned.named_parameters())["model.embed_tokens.weight"] - base.model.embed_tokens.weight
        errors.append(float((packed - delta)[digits].norm() / delta[digits].norm()))
    data_free, calibrated, unweighted = errors
    assert calibrated < 0.5 * data_free, errors
    assert unweighted == pytest.approx(data_free, rel=1e-4), errors  # row_weights=False: rows chosen as data-free


def test_only_token_embeddings_are_weighted_by_token_frequency():
    specs = {spec.name: spec for spec in module_specs(build("gpt2"))}
    assert specs["transformer.wte"].tokens and specs["lm_head"].tokens
    assert not specs["transformer.wpe"].tokens  # its rows are positions
    assert not any(spec.tokens for spec in specs.values() if spec.role != "embed")


def test_row_weighted_rounding_errors_count_each_row_times_its_weight():
    delta = torch.randn(6, 300, generator=torch.Generator().manual_seed(3))
    plain = rounding_errors(delta, (2, 4), 128)
    weights = torch.tensor([1.0, 0.0, 2.0, 0.0, 1.0, 0.5], dtype=torch.float64)
    weighted = rounding_errors(delta, (2, 4), 128, row_weights=weights)
    for bits in (2, 4):
        rows = [rounding_errors(delta[i : i + 1], (bits,), 128)[bits] for i in range(6)]
        assert plain[bits] == pytest.approx(sum(rows), rel=1e-6)
        expected = sum(weight * row for weight, row in zip(weights.tolist(), rows, strict=True))
        assert weighted[bits] == pytest.approx(expected, rel=1e-6)
