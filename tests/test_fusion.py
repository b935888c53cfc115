"""Fusion: packs served side by side through a router, against static sum / TIES merges of their deltas."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from peft_graft import GraftConfig, extract_skillpack
from peft_graft._demo.finetune import save_finetune
from peft_graft.errors import FusionError
from peft_graft.evaluation import text_nll
from peft_graft.evaluation.tasks import chat_prompt, chat_text
from peft_graft.ops import combine_deltas, merge_packs, pack_deltas
from peft_graft.routing import RoutedGraftModel
from peft_graft_cli import main

from fine_tunes import save_pair
from tiny_models import tiny_llama
from word_skills import SKILLS, chat_tokenizer, finetune_skill, word_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_pack_deltas_are_what_merging_the_pack_adds(tmp_path, arch):
    base_dir, tuned_dir = save_pair(tmp_path, arch)
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", GraftConfig(), progress=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    deltas = pack_deltas(base, tmp_path / "pack")
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "the base was modified"

    merged = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "pack").merge_and_unload()
    merged_parameters = dict(merged.named_parameters())  # tied weights once, under their first name
    changed = {k for k, v in merged_parameters.items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(deltas)
    parameters = dict(base.named_parameters())
    for name, delta in deltas.items():
        expected = merged_parameters[name] - parameters[name]
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=1e-5)
    assert {k.rsplit(".", 1)[-1] for k in deltas} >= {"weight", "bias"} or arch != "gpt2"


def test_sum_mean_and_ties_by_hand():
    a = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}
    b = {"w": torch.tensor([2.0, 1.0, -1.0, 0.0])}
    torch.testing.assert_close(combine_deltas([a, b], "sum")["w"], torch.tensor([3.0, -1.0, 2.0, 0.5]))
    torch.testing.assert_close(combine_deltas([a, b], "mean")["w"], torch.tensor([1.5, -0.5, 1.0, 0.25]))
    torch.testing.assert_close(
        combine_deltas([a, b], "sum", weights=[1.0, 0.5])["w"], torch.tensor([2, -1.5, 2.5, 0.5])
    )
    # density 1: elect the sign of the sum (+, -, +, +), average the entries that agree with it
    torch.testing.assert_close(combine_deltas([a, b], "ties", density=1.0)["w"], torch.tensor([1.5, -2.0, 3.0, 0.5]))
    # density 0.5: a keeps (-2, 3), b keeps (2, 1); signs (+, -, +, 0); disjoint means
    torch.testing.assert_close(combine_deltas([a, b], "ties", density=0.5)["w"], torch.tensor([2.0, -2.0, 3.0, 0.0]))
    # a parameter only one pack changes passes through
    torch.testing.assert_close(combine_deltas([a, {}], "ties", density=1.0)["w"], a["w"])
    with pytest.raises(FusionError, match="unknown method"):
        combine_deltas([a, b], "average")
    with pytest.raises(FusionError, match="density"):
        combine_deltas([a, b], "ties", density=0.0)


@pytest.mark.slow
def test_routed_packs_keep_each_skill_where_static_merges_interfere(tmp_path):
    """Two conflicting skills (reverse / sort the letters), tagged so that a router can tell them apart."""
    tokenizer = chat_tokenizer()
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    packs = {}
    for skill in SKILLS:
        tuned = finetune_skill(copy.deepcopy(base).train(), tokenizer, skill, tagged=True)
        save_finetune(tuned, tokenizer, tmp_path / skill)
        policy = GraftConfig(r=64, mlp_energy=0.9999, embed_density=1.0, precision_bands=[(None, 8)])
        extract_skillpack(tmp_path / "base", tmp_path / skill, tmp_path / f"{skill}-pack", policy, progress=False)
        packs[skill] = tmp_path / f"{skill}-pack"

    held_out = {skill: word_examples(skill, 32, seed=99, tagged=True) for skill in SKILLS}

    def answer_loss(model, skill: str, **options) -> float:
        examples = held_out[skill]
        texts = [chat_text(tokenizer, e.question, e.answer) for e in examples]
        prompts = [chat_prompt(tokenizer, e.question) for e in examples]
        sums, counts = text_nll(model, tokenizer, texts, prompts=prompts, **options)
        return sum(sums) / sum(counts)

    routed = RoutedGraftModel.from_packs(tiny_llama(), packs, tokenizer)
    train = {
        skill: [chat_prompt(tokenizer, e.question) for e in word_examples(skill, 40, seed=7, tagged=True)]
        for skill in SKILLS
    }
    routed.fit_router(train)
    prompts = [chat_prompt(tokenizer, e.question) for skill in SKILLS for e in held_out[skill]]
    routes = [name for name, _ in routed.route(prompts)]
    assert routes == [skill for skill in SKILLS for _ in held_out[skill]], "the router mixed up the skills"

    losses = {"base": {s: answer_loss(base, s) for s in SKILLS}}
    losses["routed"] = {s: answer_loss(routed.model, s, adapter_names=[s] * 32) for s in SKILLS}
    for method in ("sum", "ties"):
        merged_dir = merge_packs(tmp_path / "base", list(packs.values()), tmp_path / method, method=method, density=0.5)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        losses[method] = {s: answer_loss(merged, s) for s in SKILLS}
    for skill in SKILLS:
        assert losses["routed"][skill] < 0.5 * losses["base"][skill], losses  # each skill, from its pack
    for method in ("sum", "ties"):  # one set of weights for both skills: interference
        assert sum(losses[method].values()) > 1.5 * sum(losses["routed"].values()), losses


def test_merge_cli_and_refusals(tmp_path, capsys):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", GraftConfig(), progress=False)
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_dir),
                "--pack",
                str(tmp_path / "pack"),
                "--method",
                "sum",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack")
    expected = expected.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=1e-5)
    assert main(["merge", "--base", str(base_dir), "--pack", str(tmp_path / "pack"), str(tmp_path / "merged")]) == 2
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(FusionError, match="at least one pack"):
        merge_packs(base_dir, [], tmp_path / "none")
