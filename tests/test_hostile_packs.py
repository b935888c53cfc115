"""Hostile or inconsistent pack files: each is refused with a typed error before it can change the model."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_graft import (
    CheckpointError,
    GraftConfig,
    GraftConfigError,
    PackFormatError,
    RoutedGraftModel,
    RoutingError,
    UnsafePackError,
    allow_unverified_weights,
    push_pack,
)

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
    folder, tokenizer = _trained_router(tmp_path)
    recorded = json.loads((folder / "router_config.json").read_text())["weights_sha256"]
    assert recorded == hashlib.sha256((folder / "router.safetensors").read_bytes()).hexdigest()
    RoutedGraftModel.from_pretrained(tiny_llama(), folder, tokenizer)
    _flip_a_data_byte(folder / "router.safetensors")
    with pytest.raises(PackFormatError, match=r"router.safetensors does not match the SHA-256"):
        RoutedGraftModel.from_pretrained(tiny_llama(), folder, tokenizer)


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


def _rewrite_header(pack, change) -> None:
    """Edit the JSON header of the pack's weight file in place (the data untouched), and re-record the hash."""
    file = pack / ADAPTER_FILE
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])
    _edit_config(pack, weights_sha256=hashlib.sha256(file.read_bytes()).hexdigest())


def _first_key(header, suffix):
    return next(key for key in header if key.endswith(suffix))


@pytest.mark.parametrize(
    "damage",
    [
        # a shape holding a string: math.prod repeated the string (1.5 GB from a 31 KB file)
        lambda h: h[_first_key(h, "graft_S")].__setitem__("shape", ["x" * 64, 10**7]),
        lambda h: h[_first_key(h, "graft_S")].__setitem__("shape", [-4]),
        lambda h: h[_first_key(h, "graft_S")].__setitem__("shape", [True]),
        lambda h: h[_first_key(h, "graft_S")].__setitem__("data_offsets", [0]),
        lambda h: h[_first_key(h, "graft_S")].__setitem__("dtype", {"F32": 1}),
        lambda h: h[_first_key(h, "graft_S")].pop("dtype"),
        lambda h: h.__setitem__(_first_key(h, "graft_S"), [1, 2]),
        lambda h: h.__setitem__("__metadata__", {"format": 7}),
        # two tensors over the same bytes, and a gap: safetensors' own reader refuses both
        lambda h: h[_first_key(h, "q_proj.graft_S")].__setitem__(
            "data_offsets", h[_first_key(h, "v_proj.graft_S")]["data_offsets"]
        ),
    ],
)
def test_a_malformed_weight_header_is_a_pack_format_error_before_any_allocation(tmp_path, damage):
    pack = _saved_pack(tmp_path / "pack")
    _rewrite_header(pack, damage)
    base = tiny_llama().eval()
    before = _logits(base)
    with pytest.raises(PackFormatError, match=r"damaged"):
        PeftModel.from_pretrained(base, pack)
    assert torch.equal(_logits(base), before)


def test_a_tensor_read_as_another_dtype_of_the_same_size_is_refused(tmp_path):
    pack = _saved_pack(tmp_path / "pack")
    # float16 bytes relabelled bfloat16: a valid file, and different values if it were read
    _rewrite_header(pack, lambda h: h[_first_key(h, "_scales")].__setitem__("dtype", "BF16"))
    with pytest.raises(PackFormatError, match=r"must be stored as torch.float16, got torch.bfloat16"):
        PeftModel.from_pretrained(tiny_llama(), pack)


def test_a_huge_group_size_decodes_without_allocating_by_it():
    from peft_graft.compress import GroupQuantized, dequantize_groupwise, quantize_groupwise

    matrix = torch.randn(3, 40)
    one_group = quantize_groupwise(matrix, 4, 40)
    # a self-consistent header with one group per row: before, decoding repeated each scale group_size times (17 GB)
    hostile = GroupQuantized(one_group.codes, one_group.scales, one_group.zeros, 4, 2**31 - 1)
    assert torch.equal(dequantize_groupwise(hostile), dequantize_groupwise(one_group))


def test_a_vocabulary_growth_far_past_the_base_is_refused_before_allocating(tmp_path):
    pack = _saved_pack(tmp_path / "pack")
    _edit_config(pack, vocab_size=10**9)  # was: 256 GB of zero rows allocated before the weights were read
    base = tiny_llama().eval()
    rows = base.get_input_embeddings().weight.shape[0]
    with pytest.raises(PackFormatError, match=rf"grows the vocabulary from {rows} to 1000000000"):
        PeftModel.from_pretrained(base, pack)
    assert base.get_input_embeddings().weight.shape[0] == rows


def test_codec_refuses_padding_broadcast_and_non_finite_added_rows():
    from peft_graft.pack.codec import decode_module, decode_values

    half = torch.float16
    with pytest.raises(PackFormatError, match=r"dense graft_values has shape \(8, 4\), expected \(10, 4\)"):
        decode_values({"graft_values": torch.ones(8, 4, dtype=half)}, (10, 4))
    # only an embedding grown by added tokens takes a pack made on its vocabulary before, the new rows zero
    padded, _, _ = decode_values({"graft_values": torch.ones(8, 4, dtype=half)}, (10, 4), rows_before_growth=8)
    assert torch.equal(padded[8:], torch.zeros(2, 4)) and torch.equal(padded[:8], torch.ones(8, 4))
    with pytest.raises(PackFormatError, match=r"graft_bias must be a finite vector of the module's 6 outputs"):
        decode_module({"graft_values": torch.ones(6, 4, dtype=half), "graft_bias": torch.ones(1, dtype=half)}, (6, 4))
    rows = torch.ones(2, 4, dtype=half)
    rows[1, 2] = float("nan")
    sparse = {
        "graft_indices": torch.tensor([1], dtype=torch.int32),
        "graft_values": torch.ones(1, dtype=half),
        "graft_rows": rows,
        "graft_rows_start": torch.tensor([8]),
    }
    with pytest.raises(PackFormatError, match=r"graft_rows .* NaN or Inf"):
        decode_values(sparse, (10, 4))


def _trained_router(tmp_path):
    tokenizer = tiny_tokenizer()
    packs = {"a": _saved_pack(tmp_path / "a", ("q_proj",)), "b": _saved_pack(tmp_path / "b", ("v_proj",))}
    routed = RoutedGraftModel.from_packs(tiny_llama(), packs, tokenizer)
    routed.fit_router({"a": ["1+1", "2+2", "3+3"], "b": ["cat", "dog", "owl"]})
    routed.save_pretrained(tmp_path / "router")
    return tmp_path / "router", tokenizer


def test_a_router_config_declaring_a_huge_classifier_is_refused_before_allocating(tmp_path):
    folder, tokenizer = _trained_router(tmp_path)
    config = json.loads((folder / "router_config.json").read_text())
    config["router"].update(embedding_dim=65536, hidden_size=65536)  # 16 GiB of float32, tried before the check
    (folder / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(RoutingError, match=r"does not hold the classifier"):
        RoutedGraftModel.from_pretrained(tiny_llama(), folder, tokenizer)


def test_non_finite_router_weights_are_refused(tmp_path):
    folder, tokenizer = _trained_router(tmp_path)
    weights = load_file(folder / "router.safetensors")
    weights["network.0.bias"][0] = float("nan")
    save_file(weights, folder / "router.safetensors")
    config = json.loads((folder / "router_config.json").read_text())
    config["weights_sha256"] = hashlib.sha256((folder / "router.safetensors").read_bytes()).hexdigest()
    (folder / "router_config.json").write_text(json.dumps(config))
    with pytest.raises(RoutingError, match=r"NaN or Inf"):
        RoutedGraftModel.from_pretrained(tiny_llama(), folder, tokenizer)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ({"repo_id": "org/pack", "revision": "../../../etc"}, "not a branch, tag or commit name"),
        ({"repo_id": "org/pack", "revision": "/tmp/pack"}, "not a branch, tag or commit name"),
        ({"repo_id": "org/pack", "revision": ["main"]}, "not a branch, tag or commit name"),
        ({"repo_id": "org/pack", "commit": "main"}, "not a 40-hex-digit commit id"),
    ],
)
def test_a_router_config_revision_must_name_a_ref_never_a_path(tmp_path, source, message):
    from peft_graft.routing.config import RouterConfig

    (tmp_path / "router_config.json").write_text(json.dumps({"labels": ["a"], "packs": {"a": source}}))
    with pytest.raises(RoutingError, match=message):
        RouterConfig.read(tmp_path)
    source = {**source, "revision": "refs/pr/1", "commit": "0123456789abcdef0123456789abcdef01234567"}
    (tmp_path / "router_config.json").write_text(json.dumps({"labels": ["a"], "packs": {"a": source}}))
    assert RouterConfig.read(tmp_path).sources(tmp_path)["a"].revision == "refs/pr/1"


def test_a_pack_file_linking_outside_its_folder_is_refused_on_load_and_push(tmp_path):
    pack = _saved_pack(tmp_path / "pack")
    outside = tmp_path / "secret.safetensors"
    (pack / ADAPTER_FILE).rename(outside)
    (pack / ADAPTER_FILE).symlink_to(outside)  # push_pack uploaded the linked file's content
    base = tiny_llama().eval()
    before = _logits(base)
    with pytest.raises(UnsafePackError, match=r"adapter_model.safetensors is a symbolic link to .*secret"):
        PeftModel.from_pretrained(base, pack)
    assert torch.equal(_logits(base), before)
    with pytest.raises(UnsafePackError, match=r"symbolic link"):
        push_pack(pack, "someone/pack")  # refused before any request is made
    # a link that stays inside the folder is the folder's own file
    inside = pack / "weights" / ADAPTER_FILE
    inside.parent.mkdir()
    outside.rename(inside)
    (pack / ADAPTER_FILE).unlink()
    (pack / ADAPTER_FILE).symlink_to(inside)
    PeftModel.from_pretrained(tiny_llama(), pack)


def test_router_weights_linking_outside_the_folder_are_refused(tmp_path):
    folder, tokenizer = _trained_router(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    (folder / "router.safetensors").rename(outside)
    (folder / "router.safetensors").symlink_to(outside)
    with pytest.raises(UnsafePackError, match=r"router.safetensors is a symbolic link"):
        RoutedGraftModel.from_pretrained(tiny_llama(), folder, tokenizer)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/outside.safetensors", "sub/../../x.safetensors"])
def test_a_checkpoint_index_naming_a_shard_outside_its_folder_is_refused(tmp_path, shard):
    from peft_graft.extraction.checkpoint import CheckpointReader

    tiny_llama().save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": shard}})
    )
    with pytest.raises(CheckpointError, match=r"outside the checkpoint folder"):
        CheckpointReader(tmp_path / "model")
    (tmp_path / "model" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["x"]}))
    with pytest.raises(CheckpointError, match=r"weight_map must map"):
        CheckpointReader(tmp_path / "model")


def test_the_cli_reports_a_hostile_pack_in_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from peft_graft_cli import main

    pack = _saved_pack(tmp_path / "pack")
    _rewrite_header(pack, lambda h: h[_first_key(h, "graft_S")].__setitem__("shape", ["x", 7]))
    assert main(["inspect", str(pack)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("peft-graft: error:") and "damaged" in error and error.count("\n") == 1
    with pytest.raises(PackFormatError):
        main(["--debug", "inspect", str(pack)])


def test_a_sparse_delta_emptied_of_its_entries_is_refused(tmp_path):
    pack = tmp_path / "pack"
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj", "embed_tokens"], init_weights=False))
    model.save_pretrained(pack)

    def empty_embedding(tensors):  # found by the fuzzer: loaded, with the embedding's delta silently gone
        for key in [k for k in tensors if "embed_tokens.graft_" in k]:
            tensors[key] = tensors[key][:0].contiguous()

    _rewrite(pack, empty_embedding)
    with pytest.raises(PackFormatError, match=r"sparse delta with no entries"):
        PeftModel.from_pretrained(tiny_llama(), pack)


@pytest.mark.parametrize("targets", [[], ["no_such_module"]])
def test_a_pack_config_targeting_no_module_of_the_model_is_a_graft_config_error(tmp_path, targets):
    pack = _saved_pack(tmp_path / "pack")
    _edit_config(pack, target_modules=targets)  # found by the fuzzer: PEFT's own error escaped untyped
    with pytest.raises(GraftConfigError, match=r"target_modules do not match this model"):
        PeftModel.from_pretrained(tiny_llama(), pack)
