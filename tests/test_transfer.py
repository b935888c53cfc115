"""Cross-capability transfer on tiny models: source answers → trl SFT → rule-checked DPO → SkillPack, resumable."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from peft_graft import GraftConfig
from peft_graft.errors import TransferError
from peft_graft.evaluation.tasks import ReasoningTask, few_shot_prompt, generate_answers
from peft_graft.transfer import TransferConfig, transfer

from tiny_models import tiny_gpt2, tiny_llama, tiny_tokenizer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning"),
    pytest.mark.slow,
]


def _task() -> ReasoningTask:
    return ReasoningTask("basic_arithmetic", min_terms=2, max_terms=2, min_digits=1, max_digits=1)


def _settings(**overrides) -> TransferConfig:
    settings = dict(
        prompts=24,
        shots=1,
        max_new_tokens=4,
        generation_batch_size=8,
        sft_steps=6,
        sft_learning_rate=3e-3,
        batch_size=4,
        dpo_steps=4,
        dpo_learning_rate=1e-3,
        dpo_samples=2,
        save_steps=2,
        budget=None,
    )
    return TransferConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A Llama-shaped target with a chat template, and a GPT-2-shaped source without one (a base model)."""
    root = tmp_path_factory.mktemp("models")
    target_tokenizer = tiny_tokenizer()
    target_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    tiny_llama().save_pretrained(root / "target")
    target_tokenizer.save_pretrained(root / "target")
    tiny_gpt2(seed=3).save_pretrained(root / "source")
    tiny_tokenizer().save_pretrained(root / "source")
    return root / "target", root / "source"


def _state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _completion_logp(model, tokenizer, prompt: str, completion: str) -> float:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logp = model(input_ids=ids).logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt_ids) - 1 :].sum())


def test_reference_answers_sft_dpo_pack_and_a_second_run_redoes_nothing(models, tmp_path):
    target, _ = models
    target_before = _state(target)
    # a generous policy, so that the check below is about plumbing (which delta is packed), not about compression
    policy = GraftConfig(r=64, mlp_energy=0.9999, embed_density=1.0, precision_bands=[(None, 8)])
    result = transfer(
        "reference", target, _task(), tmp_path / "run", _settings(dpo=True), graft_config=policy, progress=False
    )
    assert result.stages == {"responses": "ran", "sft": "ran", "dpo": "ran", "pack": "ran"}
    assert result.responses == result.passed == 24  # reference answers pass their own checker
    assert result.pairs and result.pairs > 0
    assert all(torch.equal(t, target_before[k]) for k, t in _state(target).items()), "the target was modified"

    # DPO moved the SFT model towards chosen and away from rejected answers
    tokenizer = tiny_tokenizer()
    pairs = [json.loads(line) for line in (tmp_path / "run" / "dpo_pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)

    def margin(folder) -> float:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return sum(
            _completion_logp(model, tokenizer, p["prompt"], p["chosen"] + "</s>")
            - _completion_logp(model, tokenizer, p["prompt"], p["rejected"] + "</s>")
            for p in pairs
        ) / len(pairs)

    assert margin(tmp_path / "run" / "dpo") > margin(tmp_path / "run" / "sft") + 0.5

    # the pack carries the DPO model's delta against the untouched target
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "dpo").eval()
    base = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = tokenizer(["Question: 3 + 4|", "Calculate 2 * 5.|"], return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned_logits = trained(input_ids=ids).logits
        pack_logits = PeftModel.from_pretrained(base, result.pack_dir).eval()(input_ids=ids).logits
    error = (pack_logits - tuned_logits).norm() / (base_logits - tuned_logits).norm()
    assert error < 0.05, f"the pack misses the trained delta: relative error {error:.3f}"
    info = json.loads((result.pack_dir / "adapter_config.json").read_text())["pack_info"]
    assert info["transferred_from"] == "reference" and info["calibrated"]

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = transfer("reference", target, _task(), tmp_path / "run", _settings(dpo=True), progress=False)
    assert set(again.stages.values()) == {"done before"}
    changed = [p for p, stamp in stamps.items() if p.stat().st_mtime_ns != stamp]
    assert [p.name for p in changed] == ["transfer_result.json"]


def test_a_source_of_another_architecture_resumes_generation_and_training(models, tmp_path):
    target, source = models
    task = _task()
    run = tmp_path / "run"
    settings = _settings(keep="all")

    class StopAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        transfer(source, target, task, run, settings, callbacks=[StopAtStep3()], progress=False)
    assert (run / "sft-checkpoints" / "checkpoint-2").is_dir() and not (run / "sft").exists()

    # the source's answers are its own greedy few-shot completions (GPT-2 shapes, no chat template)
    records = [json.loads(line) for line in (run / "responses.jsonl").read_text().splitlines()]
    examples = task.examples(24 + 1, 0)
    source_model = AutoModelForCausalLM.from_pretrained(source).eval()
    expected = generate_answers(
        source_model,
        tiny_tokenizer(),
        [few_shot_prompt(e.question, examples[:1]) for e in examples[1:]],
        max_new_tokens=4,
    )
    assert [r["response"] for r in records] == [a.strip().split("\n")[0].strip() for a in expected]
    assert [r["question"] for r in records] == [e.question for e in examples[1:]]

    # a stop during generation: only the missing batches are generated again, identically
    full_responses = (run / "responses.jsonl").read_text()
    (run / "responses.jsonl").write_text("".join(full_responses.splitlines(keepends=True)[:8]))
    resumed = transfer(source, target, task, run, settings, progress=False)
    assert resumed.stages["responses"] == "resumed" and resumed.stages["sft"] == "resumed"
    assert (run / "responses.jsonl").read_text() == full_responses

    # training resumed from checkpoint-2 ends where an uninterrupted run ends
    straight = transfer(source, target, task, tmp_path / "straight", settings, progress=False)
    assert straight.stages["sft"] == "ran"
    a, b = _state(run / "sft"), _state(tmp_path / "straight" / "sft")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_refusals_come_before_any_training(models, tmp_path):
    target, source = models
    with pytest.raises(TransferError, match="passes the basic_arithmetic checker"):
        transfer(source, target, _task(), tmp_path / "weak", _settings(), progress=False)
    assert not (tmp_path / "weak" / "sft-checkpoints").exists()
    with pytest.raises(TransferError, match=r"other settings.*sft_steps"):
        transfer(source, target, _task(), tmp_path / "weak", _settings(sft_steps=7), progress=False)
    with pytest.raises(TransferError, match="keep"):
        TransferConfig(keep="some")


def test_cli_runs_a_transfer_and_prints_its_result(models, tmp_path, capsys):
    from peft_graft_cli import main

    target, _ = models
    options = json.dumps({"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    argv = ["transfer", "--source", "reference", "--target", str(target), "--task", "basic_arithmetic"]
    argv += ["--task-options", options, "--work-dir", str(tmp_path / "run"), "--prompts", "8", "--shots", "0"]
    argv += ["--sft-steps", "2", "--batch-size", "4", "--budget", "none", "--no-calibrate"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.rindex("\n{\n") + 1 :])  # the result, after the stage and trainer lines
    assert printed["stages"] == {"responses": "ran", "sft": "ran", "pack": "ran"} and printed["responses"] == 8
    recorded = json.loads((tmp_path / "run" / "transfer.json").read_text())
    assert recorded["config"]["sft_steps"] == 2 and recorded["config"]["budget"] is None
    assert (tmp_path / "run" / "pack" / "adapter_model.safetensors").is_file()
