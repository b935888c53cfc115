"""torch.compile: a model with one active pack traces without graph breaks in GRAFT layers; mixed batches (which may
break the graph at their per-row names) stay correct under compile. Dynamo's own backend ("eager") keeps these tests
fast: what is checked is the tracing of GRAFT code, not inductor's kernels (benchmarks/compile_speed.py times those)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_graft import BASE_ADAPTER, extract_skillpack

from fine_tunes import save_pair
from tiny_models import token_batch

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.slow]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _budget_pack(tmp_path, arch: str):
    """A pack extracted at 1/8 of its delta: low-rank and quantized projections, low-rank embeddings, norm deltas."""
    base_dir, tuned_dir = save_pair(tmp_path, arch)
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 8, progress=False)
    return base_dir, tmp_path / "pack"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_one_active_pack_traces_without_graph_breaks_and_matches_eager(tmp_path, arch):
    base_dir, pack = _budget_pack(tmp_path, arch)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), pack).eval()
    ids = token_batch()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
        eager = model(ids).logits
        compiled = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    torch.testing.assert_close(compiled, eager)


def test_mixed_batches_are_right_under_compile(tmp_path):
    base_dir, first = _budget_pack(tmp_path, "llama")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), first, adapter_name="a")
    model.load_adapter(first, adapter_name="b")  # the same pack twice, then made different
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".b." in name or name.endswith(".b"):
                parameter.mul_(1.5)
    model.eval()
    ids = token_batch(batch=3)
    names = ["a", "b", BASE_ADAPTER]
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        expected = model(ids, adapter_names=names).logits
        got = compiled(ids, adapter_names=names).logits
        plain = compiled(ids).logits  # then without names: the active pack for every row again
        model.set_adapter("a")
        alone = model(ids).logits
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(plain, alone)
    assert (expected[0] - expected[1]).abs().max() > 1e-4 and (expected[0] - expected[2]).abs().max() > 1e-4
