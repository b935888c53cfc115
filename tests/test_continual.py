"""Forget-free continual learning: skill A, then skill B, as two packs on one base, against sequential full
fine-tuning (A, then B, same budget) where B overwrites A."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from peft_graft import extract_skillpack
from peft_graft._demo.finetune import save_finetune
from peft_graft.evaluation import text_nll
from peft_graft.evaluation.tasks import chat_prompt, chat_text

from tiny_models import tiny_llama
from word_skills import chat_tokenizer, finetune_skill, word_examples

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_packs_keep_skill_a_bit_identical_while_sequential_finetuning_forgets_it(tmp_path):
    tokenizer = chat_tokenizer()
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    tuned = {}
    for skill in ("reverse", "sort"):
        tuned[skill] = finetune_skill(copy.deepcopy(base).train(), tokenizer, skill)
        save_finetune(tuned[skill], tokenizer, tmp_path / skill)
        extract_skillpack(tmp_path / "base", tmp_path / skill, tmp_path / f"{skill}-pack", progress=False)
    sequential = finetune_skill(copy.deepcopy(tuned["reverse"]).train(), tokenizer, "sort")  # A, then B: same budget

    examples = word_examples("reverse", 32, seed=99)
    held_out = [chat_text(tokenizer, e.question, e.answer) for e in examples]
    prompts = [chat_prompt(tokenizer, e.question) for e in examples]

    def loss_on_a(model) -> float:  # the loss of A's answers on held-out questions
        sums, counts = text_nll(model, tokenizer, held_out, prompts=prompts)
        return sum(sums) / sum(counts)

    # packs: learn A, then B as a second pack; A's outputs do not move
    packs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "reverse-pack", adapter_name="reverse").eval()
    batch = tokenizer(held_out, return_tensors="pt", padding=True)
    with torch.no_grad():
        before = packs(**batch).logits
    a_before = loss_on_a(packs)
    packs.load_adapter(tmp_path / "sort-pack", adapter_name="sort")
    packs.set_adapter("reverse")
    with torch.no_grad():
        assert torch.equal(packs(**batch).logits, before)
    assert loss_on_a(packs) == a_before
    packs.delete_adapter("sort")  # unplugging B restores exactly the prior outputs (here: unchanged all along)
    with torch.no_grad():
        assert torch.equal(packs(**batch).logits, before)

    base_loss, a_tuned, a_after_b = loss_on_a(base), loss_on_a(tuned["reverse"]), loss_on_a(sequential)
    assert a_tuned < 0.7 * base_loss  # the fine-tune learned A
    assert a_before < 0.8 * base_loss  # and the pack carries most of it
    assert a_after_b > 1.5 * a_tuned  # sequential full fine-tuning on B forgets A
