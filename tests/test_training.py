"""Training GRAFT factors with transformers.Trainer and trl.SFTTrainer; saving re-quantizes them."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, PeftType, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from peft_graft import GraftConfig, GraftLinear

from tiny_models import VOCAB, tiny_llama, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _counting_sequences(count: int, length: int = 24, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Next token = previous + 1 (mod vocab): learnable by a tiny model in a few steps."""
    starts = torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))
    rows = (starts[:, None] + torch.arange(length)) % VOCAB
    return [{"input_ids": row, "labels": row} for row in rows]


def _loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        ids = torch.stack([item["input_ids"] for item in batch])
        return float(model(input_ids=ids, labels=ids).loss)


def _train(model, tmp_path, steps: int = 120, **overrides) -> Trainer:
    args = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=steps,
        use_cpu=True,
        disable_tqdm=True,
    )
    args.update(overrides)
    trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=_counting_sequences(256))
    trainer.train()
    return trainer


def test_trainer_lowers_the_loss_trains_only_graft_factors_and_leaves_the_base_bit_unchanged(tmp_path):
    base = tiny_llama()
    base_before = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = get_peft_model(base, GraftConfig(target_modules=TARGETS, r=8))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".graft_" in name for name in trainable)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    held_out = _counting_sequences(16, seed=99)
    before = _loss(model, held_out)
    _train(model, tmp_path)
    after = _loss(model, held_out)
    assert after < 0.85 * before, (before, after)

    trained_base = model.get_base_model().state_dict()
    for name, tensor in base_before.items():
        key = name if name in trained_base else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(trained_base[key], tensor), name


def test_saving_a_trained_adapter_quantizes_it_and_is_trainable_reloads_float_factors(tmp_path):
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=TARGETS, r=8, precision_bands=[(None, 8)]))
    _train(model, tmp_path, steps=10)
    model.save_pretrained(tmp_path / "pack")
    stored = load_file(tmp_path / "pack" / "adapter_model.safetensors")
    assert any(t.dtype == torch.uint8 for t in stored.values())
    assert not any(name.endswith(("graft_U", "graft_V")) for name in stored)

    held_out = _counting_sequences(8, seed=7)
    trained_loss = _loss(model, held_out)
    for is_trainable in (True, False):
        reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack", is_trainable=is_trainable)
        factors = [p for name, p in reloaded.named_parameters() if ".graft_" in name]
        assert factors and all(p.dtype == torch.float32 and p.requires_grad is is_trainable for p in factors)
        assert abs(_loss(reloaded, held_out) - trained_loss) < 0.02 * trained_loss

    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack", is_trainable=True)
    _train(reloaded, tmp_path, steps=3)  # keeps training from the decoded factors


def test_gradient_checkpointing_trains(tmp_path):
    model = get_peft_model(tiny_llama(), GraftConfig(target_modules=TARGETS, r=4))
    trainer = _train(model, tmp_path, steps=4, gradient_checkpointing=True)
    assert trainer.state.global_step == 4
    layer = next(m for m in model.modules() if isinstance(m, GraftLinear))
    assert layer.graft_U["default"].abs().sum() > 0  # U started at zero and moved


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_trl_sft_trainer_accepts_a_graft_config(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = [f"{a}+{b}={a + b}" for a in range(30) for b in range(10)]
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=60,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        max_length=32,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tiny_tokenizer(),
        peft_config=GraftConfig(target_modules=TARGETS, r=8),
    )
    assert isinstance(trainer.model, PeftModel)
    assert trainer.model.peft_config["default"].peft_type is PeftType.GRAFT
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    trainer.model.save_pretrained(tmp_path / "pack")
    assert any(t.dtype == torch.uint8 for t in load_file(tmp_path / "pack" / "adapter_model.safetensors").values())
