"""Mixed batches: `adapter_names=[...]` gives every row its own pack, in forward and generate (beams too)."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_graft import BASE_ADAPTER, GraftConfig
from peft_graft.layer import GraftLinear, GraftNorm

from tiny_models import BUILDERS, EMBED_TARGETS, LINEAR_TARGETS, NORM_TARGETS, token_batch

pytestmark = pytest.mark.filterwarnings("ignore:.*embedding layers found in:UserWarning")

ROW_ADAPTERS = ["a", "b", BASE_ADAPTER, "a", "b"]


def _two_pack_model(arch: str, tmp_path) -> PeftModel:
    """A base with packs 'a' (attention + embedding) and 'b' (all projections + norms), both loaded from disk."""
    build = BUILDERS[arch]
    targets = {
        "a": LINEAR_TARGETS[arch][:2] + EMBED_TARGETS[arch][:1],
        "b": LINEAR_TARGETS[arch] + EMBED_TARGETS[arch][-1:] + NORM_TARGETS[arch],
    }
    for seed, (name, modules) in enumerate(targets.items(), start=1):
        torch.manual_seed(seed)
        get_peft_model(build(), GraftConfig(target_modules=modules, init_weights=False, r=4)).save_pretrained(
            tmp_path / name
        )
    model = PeftModel.from_pretrained(build(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    return model.eval()


def _alone(model: PeftModel, name: str, run):
    """Run `run()` with only `name` active (or no adapter for the base)."""
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            return run()
    model.set_adapter(name)
    return run()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_forward_rows_equal_each_row_run_alone(arch, tmp_path):
    model = _two_pack_model(arch, tmp_path)
    ids = token_batch(batch=len(ROW_ADAPTERS), length=9)
    model.set_adapter("a")  # the active adapter must not leak into rows that name another
    with torch.no_grad():
        mixed = model(ids, adapter_names=ROW_ADAPTERS).logits
        for row, name in enumerate(ROW_ADAPTERS):
            alone = _alone(model, name, lambda row=row: model(ids[row : row + 1]).logits)
            assert (mixed[row : row + 1] - alone).abs().max() < 1e-5, (row, name)
    # rows really differ by adapter, so the check above is not vacuous
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3 and (mixed[0] - mixed[2]).abs().max() > 1e-3


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_rows_equal_each_row_generated_alone(num_beams, tmp_path):
    model = _two_pack_model("llama", tmp_path)
    ids = token_batch(batch=len(ROW_ADAPTERS), length=6)
    settings = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    mixed = model.generate(input_ids=ids, adapter_names=ROW_ADAPTERS, **settings)
    for row, name in enumerate(ROW_ADAPTERS):
        alone = _alone(model, name, lambda row=row: model.generate(input_ids=ids[row : row + 1], **settings))
        assert torch.equal(mixed[row : row + 1], alone), (row, name)
    assert not torch.equal(mixed[0], mixed[1])


def test_adapter_names_are_honoured_over_the_active_adapter(tmp_path):
    model = _two_pack_model("llama", tmp_path)
    ids = token_batch(batch=2)
    with torch.no_grad():
        model.set_adapter("b")
        only_b = model(ids).logits
        model.set_adapter("a")
        assert torch.allclose(model(ids, adapter_names=["b", "b"]).logits, only_b, atol=1e-5)
        assert not torch.allclose(model(ids).logits, only_b, atol=1e-3)


def test_unknown_names_training_mode_and_wrong_lengths_are_clear_errors(tmp_path):
    model = _two_pack_model("llama", tmp_path)
    ids = token_batch(batch=2)
    with pytest.raises(ValueError, match=r"non-existing adapter.*: c.*Loaded adapters: a, b"):
        model(ids, adapter_names=["a", "c"])
    with pytest.raises(ValueError, match="adapter_names has 3 entries but the batch has 2 rows"):
        model(ids, adapter_names=["a", "b", "a"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(ids, adapter_names=["a", "b"])


def test_mixed_batches_stay_right_while_a_pack_is_merged(tmp_path):
    model = _two_pack_model("llama", tmp_path)
    ids = token_batch(batch=len(ROW_ADAPTERS))
    with torch.no_grad():
        expected = model(ids, adapter_names=ROW_ADAPTERS).logits
        uniform = {name: model(ids, adapter_names=[name] * len(ids)).logits for name in ("b", BASE_ADAPTER)}
        model.merge_adapter(["a"])
        merged = model(ids, adapter_names=ROW_ADAPTERS).logits  # 'a' rows use the merged weights as they are
        # every row naming one other pack (or none) takes 'a' out of the whole batch at once
        merged_uniform = {name: model(ids, adapter_names=[name] * len(ids)).logits for name in uniform}
        model.unmerge_adapter()
    assert (merged - expected).abs().max() < 1e-4
    for name, logits in uniform.items():
        assert (merged_uniform[name] - logits).abs().max() < 1e-4, name


def _generate_concurrently(model, ids, names, rounds: int = 6, **settings) -> dict[str, list[torch.Tensor]]:
    """Each name's thread generates `rounds` times with its own adapter_names, all threads at once."""
    results: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    barrier = threading.Barrier(len(names))

    def run(name: str) -> None:
        barrier.wait()
        for _ in range(rounds):
            results[name].append(model.generate(input_ids=ids, adapter_names=[name] * len(ids), **settings))

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_concurrent_threads_with_different_packs_get_what_they_get_alone(tmp_path):
    model = _two_pack_model("llama", tmp_path)
    ids = token_batch(batch=2, length=6)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    names = ["a", "b", BASE_ADAPTER]
    alone = {name: model.generate(input_ids=ids, adapter_names=[name] * 2, **settings) for name in names}
    assert not torch.equal(alone["a"], alone["b"])
    for name, outputs in _generate_concurrently(model, ids, names, **settings).items():
        assert all(torch.equal(output, alone[name]) for output in outputs), name


def _graft_layers(model: PeftModel, kind: type) -> list:
    return [module for module in model.modules() if type(module) is kind]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_token_rows_run_every_pack_in_one_product_per_layer(arch, tmp_path):
    """Decoding steps (one token per row) stack the packs' factors; the rows still equal each row run alone, also
    after a factor is changed in place or a pack is replaced under the same name."""
    model = _two_pack_model(arch, tmp_path)
    ids = token_batch(batch=len(ROW_ADAPTERS), length=1)
    linears = _graft_layers(model, GraftLinear)

    def check() -> None:
        with torch.no_grad():
            mixed = model(ids, adapter_names=ROW_ADAPTERS).logits
            for row, name in enumerate(ROW_ADAPTERS):
                alone = _alone(model, name, lambda row=row: model(ids[row : row + 1]).logits)
                assert (mixed[row : row + 1] - alone).abs().max() < 1e-5, (row, name)

    check()
    stacked = [layer for layer in linears if layer._stack_cache.stacked is not None]
    assert stacked, "no layer used the stacked product"
    # a layer holding both packs stacks both: its V has the two ranks side by side
    both = [layer for layer in stacked if "a" in layer.graft_S and "b" in layer.graft_S]
    assert both and all(layer._stack_cache.stacked[0].shape[1] == layer.rank("a") + layer.rank("b") for layer in both)
    with torch.no_grad():
        before = model(ids, adapter_names=ROW_ADAPTERS).logits
        for layer in stacked:  # in place: the cached stacks must notice
            layer.graft_U["b"].mul_(3.0)
    check()
    with torch.no_grad():
        assert (model(ids, adapter_names=ROW_ADAPTERS).logits - before).abs().max() > 1e-3
    torch.manual_seed(99)
    replacement = get_peft_model(
        BUILDERS[arch](), GraftConfig(target_modules=LINEAR_TARGETS[arch], init_weights=False, r=3)
    )
    replacement.save_pretrained(tmp_path / "c")
    model.delete_adapter("b")
    model.load_adapter(tmp_path / "c", adapter_name="b")
    check()


def test_norms_that_broadcast_take_per_row_parameters_and_others_run_per_pack(tmp_path):
    """Llama's RMSNorm broadcasts a (rows, 1, features) weight, so mixed rows run in one call; GPT-2's LayerNorm does
    not, which the first mixed batch finds out, and it keeps one call per pack. Both equal each row run alone
    (checked by the forward test above); here, which path each took."""
    for arch, broadcasts in (("llama", True), ("gpt2", False)):
        model = _two_pack_model(arch, tmp_path / arch)
        with torch.no_grad():
            model(token_batch(batch=len(ROW_ADAPTERS)), adapter_names=ROW_ADAPTERS)
        norms = _graft_layers(model, GraftNorm)
        assert norms and all(norm._rows_broadcast is broadcasts for norm in norms), arch
