"""GRAFT layers: forward = base + delta, sparse paths, exact merge / unmerge, dtypes, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from peft_graft import GraftConfig, GraftEmbedding, GraftLinear, GraftNorm

from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen2, token_batch


def _layers(model, layer_type):
    return [(name, module) for name, module in model.named_modules() if isinstance(module, layer_type)]


def _dense_reference(layer, x):
    """What the layer should compute: the base op on W + ΔW."""
    base = layer.get_base_layer()
    weight = base.weight + layer.get_delta_weight("default").to(base.weight.dtype)
    if isinstance(layer, GraftEmbedding):
        return F.embedding(x, weight)
    if isinstance(layer, GraftLinear) and layer.fan_in_fan_out:
        return x @ weight + base.bias
    return F.linear(x, weight, base.bias)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_lowrank_forward_equals_base_plus_dense_delta_and_never_builds_it(builder, monkeypatch):
    targets = ["q_proj", "v_proj", "down_proj"] if builder is tiny_llama else ["c_attn", "c_fc"]
    model = get_peft_model(builder(), GraftConfig(target_modules=targets, r=6, init_weights=False))
    layers = _layers(model, GraftLinear)
    assert len(layers) == 2 * len(targets)
    expected = {}
    for name, layer in layers:
        x = torch.randn(2, 5, layer.in_features)
        expected[name] = (x, _dense_reference(layer, x))
    monkeypatch.setattr(GraftLinear, "get_delta_weight", lambda *a: pytest.fail("forward built the dense delta"))
    for name, layer in layers:
        x, reference = expected[name]
        assert torch.allclose(layer(x), reference, atol=1e-5), name


def test_rank_is_capped_by_the_layer_shape():
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=["k_proj"], r=1000, precision_bands=[(None, 8)]))
    (_, layer), *_ = _layers(model, GraftLinear)
    assert layer.rank("default") == 32 == min(layer.in_features, layer.out_features)


def test_embedding_and_lm_head_get_sparse_deltas_that_match_dense_references():
    model = get_peft_model(
        tiny_llama(), GraftConfig(target_modules=["embed_tokens", "lm_head"], init_weights=False, embed_density=0.1)
    )
    embedding = model.base_model.model.model.embed_tokens
    lm_head = model.base_model.model.lm_head
    assert isinstance(embedding, GraftEmbedding) and isinstance(lm_head, GraftLinear) and lm_head.prune_on_save
    assert embedding.graft_values["default"].numel() == math.ceil(0.1 * VOCAB * 64)
    ids = torch.tensor([[0, 5, 5, VOCAB - 1], [3, 3, 3, 3]])  # repeated ids and both vocab ends
    assert torch.allclose(embedding(ids), _dense_reference(embedding, ids), atol=1e-6)
    x = torch.randn(2, 4, 64)
    assert torch.allclose(lm_head(x), _dense_reference(lm_head, x), atol=1e-5)


def test_trainable_sparse_deltas_start_dense_at_zero_and_learn():
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=["embed_tokens", "lm_head"]))
    embedding = model.base_model.model.model.embed_tokens
    values = embedding.graft_values["default"]
    assert values.shape == (VOCAB, 64) and not values.any() and "default" not in embedding.graft_indices
    model.train()
    loss = model(token_batch(), labels=token_batch()).loss
    loss.backward()
    assert values.grad is not None and values.grad.abs().sum() > 0
    assert model.base_model.model.lm_head.graft_values["default"].grad.abs().sum() > 0


def test_gradients_reach_sparse_values_and_all_three_factors():
    model = get_peft_model(
        tiny_llama(), GraftConfig(target_modules=["q_proj", "embed_tokens", "lm_head"], init_weights=False)
    )
    model.train()
    model(token_batch(), labels=token_batch()).loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("graft_" in name for name in trainable)
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_embedding_delta_is_scaled_like_a_scaled_word_embedding():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = Gemma3TextScaledWordEmbedding(VOCAB, 16, padding_idx=0, embed_scale=4.0)

        def forward(self, ids):
            return self.embed(ids)

    model = get_peft_model(Wrapper(), GraftConfig(target_modules=["embed"], init_weights=False, embed_density=0.5))
    layer = model.base_model.model.embed
    ids = token_batch(2, 6)
    assert torch.allclose(layer(ids), _dense_reference(layer, ids) * 4.0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_matches_unmerged_output_and_unmerge_restores_exact_bits(dtype):
    base = tiny_llama().to(dtype)
    original = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    config = GraftConfig(target_modules=["q_proj", "down_proj", "embed_tokens", "lm_head"], init_weights=False)
    model = get_peft_model(base, config).eval()
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        merged = model(ids).logits
        model.unmerge_adapter()
        again = model(ids).logits
    tolerance = 1e-4 if dtype == torch.float32 else 0.1
    assert (merged.float() - unmerged.float()).abs().max() < tolerance
    assert torch.equal(again, unmerged)
    restored = model.get_base_model().state_dict()
    for name, tensor in original.items():
        key = next(k for k in (name, name.replace(".weight", ".base_layer.weight")) if k in restored)
        assert torch.equal(restored[key], tensor), name


def test_merge_and_unload_returns_a_plain_model_with_the_delta_baked_in():
    model = get_peft_model(tiny_gpt2(), GraftConfig(target_modules=["c_attn", "c_fc"], init_weights=False)).eval()
    ids = token_batch()
    with torch.no_grad():
        expected = model(ids).logits
        merged = model.merge_and_unload()
        assert not any(isinstance(m, GraftLinear) for m in merged.modules())
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)


@pytest.mark.parametrize(("builder", "targets"), [(tiny_qwen2, ["embed_tokens"]), (tiny_gpt2, ["lm_head"])])
def test_tied_embeddings_share_one_delta_that_merges_once(builder, targets):
    model = get_peft_model(builder(), GraftConfig(target_modules=targets, init_weights=False)).eval()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, GraftEmbedding) and isinstance(head, GraftLinear)
    assert "default" in head.graft_tied and "default" not in head.graft_values
    shared = embedding.get_base_layer().weight
    assert head.get_base_layer().weight is shared
    x = torch.randn(2, 3, shared.shape[1])
    with torch.no_grad():
        expected_head = F.linear(x, shared + embedding.get_delta_weight("default"))
        assert torch.allclose(head(x), expected_head, atol=1e-5)
        ids = token_batch()
        unmerged = model(ids).logits
        before = shared.detach().clone()
        model.merge_adapter()
        assert torch.allclose(model(ids).logits, unmerged, atol=1e-4)
        model.unmerge_adapter()
        assert torch.equal(shared, before)


def test_merging_into_a_weight_shared_with_an_unadapted_module_is_refused():
    class SharedWeights(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.second.weight = self.first.weight

        def forward(self, x):
            return self.second(self.first(x))

    model = get_peft_model(SharedWeights(), GraftConfig(target_modules=["first"], init_weights=False))
    with pytest.raises(ValueError, match="tied weights"):
        model.merge_adapter()
    with pytest.raises(ValueError, match="tied weights"):
        model.merge_and_unload()


def test_norm_deltas_run_the_norm_with_shifted_parameters():
    model = get_peft_model(tiny_gpt2(), GraftConfig(target_modules=["ln_1", "ln_f", "c_fc"], init_weights=False)).eval()
    norms = _layers(model, GraftNorm)
    assert len(norms) == 3
    x = torch.randn(2, 4, 64)
    for _, layer in norms:
        base = layer.get_base_layer()
        assert "default" in layer.graft_bias  # LayerNorm has a bias, so its delta does too
        expected = F.layer_norm(
            x, (64,), base.weight + layer.graft_values["default"], base.bias + layer.graft_bias["default"], base.eps
        )
        assert torch.allclose(layer(x), expected, atol=1e-5)
    ids = token_batch()
    with torch.no_grad():
        unmerged = model(ids).logits
        model.merge_adapter()
        assert torch.allclose(model(ids).logits, unmerged, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*embedding layers found in")
def test_bf16_base_keeps_float32_factors_and_bf16_outputs():
    model = get_peft_model(tiny_llama().to(torch.bfloat16), GraftConfig(target_modules=["q_proj"], init_weights=False))
    (_, layer), *_ = _layers(model, GraftLinear)
    assert layer.graft_U["default"].dtype == torch.float32
    assert model(token_batch()).logits.dtype == torch.bfloat16


def test_unsupported_modules_are_a_clear_error():
    with pytest.raises(ValueError, match=r"GRAFT cannot adapt .*LlamaAttention.*exclude_modules"):
        get_peft_model(tiny_llama(), GraftConfig(target_modules=["self_attn"]))


def test_safe_merge_refuses_a_broken_delta_and_leaves_the_base_untouched():
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj"], init_weights=False))
    (_, layer), *_ = _layers(model, GraftLinear)
    before = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.graft_U["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs or Infs detected"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, before) and not layer.merged
