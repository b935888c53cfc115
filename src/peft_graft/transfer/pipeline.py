"""Cross-capability transfer: teach a target model a source model's skill, then carry it as a SkillPack.

The source can be any causal LM (another architecture, another tokenizer): only its *text* answers travel.

1. **responses** — the source answers the task's prompts (chat prompt if it has a chat template, else a few-shot
   prompt); each answer is checked by the task's rule-based scorer. Written line by line to ``responses.jsonl``.
2. **sft** — full-parameter SFT of the target on the prompts and the source's answers with ``trl.SFTTrainer``
   (only answers that pass the checker, unless ``keep="all"``).
3. **dpo** (optional) — ``trl.DPOTrainer`` on rule-checked pairs: chosen = a source answer that passes the checker,
   rejected = one of the SFT model's own samples that fails it.
4. **pack** — the SkillPack of the trained model's delta against the untouched target.

Every stage writes its output into the work folder and is skipped when that output exists; generation resumes after
the last written batch and training from the trainer's last checkpoint. Running again with other settings is
refused (use a new work folder).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import GraftConfig
from ..errors import TransferError
from ..evaluation.tasks import Example, ReasoningTask, chat_prompt, chat_text, few_shot_prompt, generate_answers
from ..utils.atomic import write_file, write_folder
from ..utils.jsonio import read_json

REFERENCE = "reference"
STAGES = ("responses", "sft", "dpo", "pack")


@dataclass
class TransferConfig:
    """Settings of a transfer run; the work folder records them, and a resumed run must use the same ones."""

    prompts: int = field(default=640, metadata={"help": "Task prompts the source answers (training questions)."})
    shots: int = field(
        default=4, metadata={"help": "Worked examples in the source's prompt when it has no chat template."}
    )
    keep: str = field(
        default="correct",
        metadata={"help": "'correct': train only on source answers that pass the task's checker; 'all': on every one."},
    )
    max_new_tokens: int = field(default=16, metadata={"help": "Tokens generated per answer (source and samples)."})
    generation_batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    sft_steps: int = field(default=60, metadata={"help": "SFT optimizer steps."})
    sft_learning_rate: float = field(default=3e-4, metadata={"help": "SFT learning rate (constant after warm-up)."})
    batch_size: int = field(default=8, metadata={"help": "Training examples per step (SFT and DPO)."})
    dpo: bool = field(default=False, metadata={"help": "Run the DPO stage after SFT."})
    dpo_steps: int = field(default=20, metadata={"help": "DPO optimizer steps."})
    dpo_learning_rate: float = field(default=5e-6, metadata={"help": "DPO learning rate."})
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta (strength of the pull towards the SFT model)."})
    dpo_samples: int = field(
        default=4, metadata={"help": "Samples drawn from the SFT model per prompt to find a failing (rejected) one."}
    )
    save_steps: int = field(default=20, metadata={"help": "Trainer checkpoint interval, for resuming a stopped run."})
    budget: float | None = field(
        default=1 / 16, metadata={"help": "Pack size as a fraction of the fp16 delta; None: the GraftConfig policy."}
    )
    calibrate: bool = field(
        default=True, metadata={"help": "Calibrate the pack's GPTQ on the training texts (else round-to-nearest)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of prompts, training order and sampling."})

    def __post_init__(self) -> None:
        if self.keep not in ("correct", "all"):
            raise TransferError(f"keep must be 'correct' or 'all', got {self.keep!r}")
        for name in ("prompts", "sft_steps", "batch_size", "dpo_steps", "dpo_samples", "save_steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise TransferError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class TransferResult:
    work_dir: Path
    pack_dir: Path
    trained_dir: Path
    responses: int
    passed: int
    pairs: int | None
    stages: dict[str, str]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def transfer(
    source: str | os.PathLike,
    target: str | os.PathLike,
    task: ReasoningTask,
    work_dir: str | os.PathLike,
    config: TransferConfig | None = None,
    *,
    graft_config: GraftConfig | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> TransferResult:
    """Run (or resume) a transfer of `task` from `source` to `target`; the pack is ``work_dir/pack``.

    Args:
        source: a model folder, a Hub id, or ``"reference"`` to use the task's reference answers (when no source
            model is good enough).
        target: the model to teach (folder or Hub id); it is never modified.
        task: the skill, with its prompts and its checker.
        config: the run's settings (``TransferConfig()`` if None).
        graft_config: the pack's compression policy (``GraftConfig()`` if None).
        callbacks: extra ``transformers.TrainerCallback`` objects for the SFT and DPO trainers.
    """
    config = config or TransferConfig()
    work_dir = Path(work_dir)
    source, target = str(source), str(target)
    _check_or_record_settings(work_dir, source, target, task, config)
    say = print if progress else (lambda *_: None)
    stages: dict[str, str] = {}
    seconds: dict[str, float] = {}
    target_dir = target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    train = task.examples(config.prompts + config.shots, config.seed)
    shots, questions = train[: config.shots], train[config.shots :]

    started = time.perf_counter()
    say(f"[transfer] 1/4 responses: {source} answers {len(questions)} {task.name} prompts")
    stages["responses"] = _responses_stage(work_dir, source, task, questions, shots, config, progress)
    seconds["responses"] = time.perf_counter() - started
    records = _read_jsonl(work_dir / "responses.jsonl")
    passed = sum(record["passed"] for record in records)
    kept = [record for record in records if record["passed"] or config.keep == "all"]
    say(f"[transfer]     {passed}/{len(records)} answers pass the checker; training on {len(kept)}")
    if not kept:
        raise TransferError(
            f"none of the {len(records)} answers of {source!r} passes the {task.name} checker; use a stronger "
            "source, keep='all', or source='reference'"
        )
    sft_texts = [(chat_prompt(tokenizer, record["question"]), record["response"]) for record in kept]

    started = time.perf_counter()
    say(f"[transfer] 2/4 sft: {config.sft_steps} steps of full-parameter SFT of {target}")
    stages["sft"] = _sft_stage(work_dir, target_dir, tokenizer, sft_texts, config, callbacks)
    seconds["sft"] = time.perf_counter() - started
    trained_dir = work_dir / "sft"

    pairs = None
    if config.dpo:
        started = time.perf_counter()
        say(f"[transfer] 3/4 dpo: rule-checked pairs, then {config.dpo_steps} DPO steps")
        stages["dpo"] = _dpo_stage(work_dir, tokenizer, task, kept, config, callbacks, progress)
        seconds["dpo"] = time.perf_counter() - started
        pairs = len(_read_jsonl(work_dir / "dpo_pairs.jsonl"))
        trained_dir = work_dir / "dpo"
    else:
        say("[transfer] 3/4 dpo: skipped (TransferConfig.dpo=False)")

    started = time.perf_counter()
    say(f"[transfer] 4/4 pack: the delta of {trained_dir.name} against the untouched target")
    pack_dir = work_dir / "pack"
    if pack_dir.is_dir():
        stages["pack"] = "done before"
    else:
        from ..extraction import extract_skillpack

        graft_config = copy.deepcopy(graft_config) if graft_config is not None else GraftConfig()
        graft_config.pack_info = {**graft_config.pack_info, "transferred_from": source}
        calibration = [chat_text(tokenizer, record["question"], record["response"]) for record in kept]
        extract_skillpack(
            target_dir,
            trained_dir,
            pack_dir,
            graft_config,
            calibration=calibration if config.calibrate else None,
            budget=config.budget,
            progress=progress,
            skill=f"{task.name}, transferred from {source} ({trained_dir.name.upper()})",
        )
        stages["pack"] = "ran"
    seconds["pack"] = time.perf_counter() - started
    result = TransferResult(work_dir, pack_dir, trained_dir, len(records), passed, pairs, stages, seconds)
    _write_json(work_dir / "transfer_result.json", result.to_dict())
    return result


def _check_or_record_settings(work_dir: Path, source: str, target: str, task: ReasoningTask, config) -> None:
    settings = {
        "source": source,
        "target": target,
        "task": task.name,
        "task_options": task.dataset_options,
        "config": asdict(config),
    }
    settings = json.loads(json.dumps(settings, default=list))
    recorded = work_dir / "transfer.json"
    if recorded.is_file():
        previous = read_json(recorded)
        if previous != settings:
            changed = sorted(
                k for k in set(previous) | set(settings) if k != "config" and previous.get(k) != settings.get(k)
            )
            changed += sorted(
                k
                for k in {f.name for f in fields(TransferConfig)}
                if previous.get("config", {}).get(k) != settings["config"].get(k)
            )
            raise TransferError(
                f"{work_dir} holds a transfer with other settings ({', '.join(changed)}); resume it with the same "
                "settings or use a new work folder"
            )
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    _write_json(recorded, settings)


def _responses_stage(work_dir, source, task, questions, shots, config, progress) -> str:
    path = work_dir / "responses.jsonl"
    done = _read_jsonl(path) if path.is_file() else []
    if len(done) == len(questions):
        return "done before"
    if source == REFERENCE:
        missing = questions[len(done) :]
        _append_jsonl(path, [_record(len(done) + i, e, e.answer, task) for i, e in enumerate(missing)])
        return "ran"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = source
    source_tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if source_tokenizer.pad_token is None:
        source_tokenizer.pad_token = source_tokenizer.eos_token
    step = config.generation_batch_size
    state = "resumed" if done else "ran"
    bar = tqdm(total=len(questions), initial=len(done), desc="source answers", unit="prompt", disable=not progress)
    for start in range(len(done), len(questions), step):
        batch = questions[start : start + step]
        if source_tokenizer.chat_template:
            prompts = [chat_prompt(source_tokenizer, e.question) for e in batch]
        else:
            prompts = [few_shot_prompt(e.question, shots) for e in batch]
        answers = generate_answers(
            model, source_tokenizer, prompts, max_new_tokens=config.max_new_tokens, batch_size=step
        )
        pairs = enumerate(zip(batch, answers, strict=True), start)
        records = [_record(index, example, _first_line(answer), task) for index, (example, answer) in pairs]
        _append_jsonl(path, records)
        bar.update(len(batch))
    bar.close()
    return state


def _record(index: int, example: Example, response: str, task: ReasoningTask) -> dict[str, Any]:
    passed = task.score(response, example) >= 1.0
    return {
        "index": index,
        "question": example.question,
        "reference": example.answer,
        "response": response,
        "passed": passed,
        "entry": example.entry,
    }


def _first_line(completion: str) -> str:
    return completion.strip().split("\n")[0].strip()


def _sft_stage(work_dir, target_dir, tokenizer, texts, config, callbacks) -> str:
    if (work_dir / "sft").is_dir():
        return "done before"
    from trl import SFTConfig, SFTTrainer

    columns = {"prompt": [p for p, _ in texts], "completion": [a for _, a in texts]}
    return _train(
        SFTTrainer,
        SFTConfig,
        work_dir / "sft",
        target_dir,
        columns,
        tokenizer,
        config,
        callbacks,
        max_steps=config.sft_steps,
        learning_rate=config.sft_learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, config.sft_steps),
        weight_decay=0.0,
        max_grad_norm=1.0,
    )


def _dpo_stage(work_dir, tokenizer, task, kept, config, callbacks, progress) -> str:
    if (work_dir / "dpo").is_dir():
        return "done before"
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    pairs_path = work_dir / "dpo_pairs.jsonl"
    if not pairs_path.is_file():
        sft = AutoModelForCausalLM.from_pretrained(work_dir / "sft", dtype=torch.float32).eval()
        pairs = _rule_checked_pairs(sft, tokenizer, task, kept, config, progress)
        write_file(pairs_path, "".join(json.dumps(pair) + "\n" for pair in pairs))
        del sft
    pairs = _read_jsonl(pairs_path)
    if not pairs:
        raise TransferError(
            "the SFT model passed the checker on every sampled answer, so there is no rejected answer for DPO; "
            "run without dpo, or raise dpo_samples"
        )
    return _train(
        DPOTrainer,
        DPOConfig,
        work_dir / "dpo",
        work_dir / "sft",
        {key: [pair[key] for pair in pairs] for key in ("prompt", "chosen", "rejected")},
        tokenizer,
        config,
        callbacks,
        max_steps=config.dpo_steps,
        learning_rate=config.dpo_learning_rate,
        lr_scheduler_type="constant",
        beta=config.dpo_beta,
        precompute_ref_log_probs=True,  # the SFT model's log-probs once, instead of a second model in memory
    )


def _train(trainer_class, args_class, output: Path, start, columns, tokenizer, config, callbacks, **arguments) -> str:
    """Train the model at `start` with a trl trainer, resuming from its last checkpoint; save it to `output`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    checkpoints = output.with_name(f"{output.name}-checkpoints")
    resume = _last_checkpoint(checkpoints)
    args = args_class(
        output_dir=str(checkpoints),
        per_device_train_batch_size=config.batch_size,
        seed=config.seed,
        **_trainer_defaults(config, args_class),
        **arguments,
    )
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_dict(columns),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )
    trainer.train(resume_from_checkpoint=resume)
    _save_trained(trainer, tokenizer, output)
    return "resumed" if resume else "ran"


def _rule_checked_pairs(model, tokenizer, task, kept, config, progress) -> list[dict[str, str]]:
    """chosen = a source answer that passed the checker; rejected = the SFT model's first failing sample."""
    candidates = [record for record in kept if record["passed"]]
    prompts = [chat_prompt(tokenizer, record["question"]) for record in candidates]
    torch.manual_seed(config.seed)
    samples = generate_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=max(1, config.generation_batch_size // config.dpo_samples),
        generation_options={"do_sample": True, "temperature": 1.0, "num_return_sequences": config.dpo_samples},
        progress=progress,
        description="sampling the SFT model",
    )
    pairs = []
    for i, (record, prompt) in enumerate(zip(candidates, prompts, strict=True)):
        example = Example(record["question"], record["reference"], record["entry"])
        for sample in samples[i * config.dpo_samples : (i + 1) * config.dpo_samples]:
            rejected = _first_line(sample)
            if task.score(rejected, example) < 1.0 and rejected != record["response"]:
                pairs.append({"prompt": prompt, "chosen": record["response"], "rejected": rejected})
                break
    random.Random(config.seed).shuffle(pairs)
    return pairs


def _trainer_defaults(config, config_class) -> dict[str, Any]:
    from dataclasses import fields as dataclass_fields

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    # trl turns activation checkpointing on by default; on small models recomputing costs more than it saves
    names = {item.name for item in dataclass_fields(config_class)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    return {
        checkpointing: False,
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": 1,
        "logging_steps": 5,
        "report_to": [],
        "bf16": bf16,
        "max_length": 512,
        "dataloader_num_workers": 0,
    }


def _last_checkpoint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder))


def _save_trained(trainer, tokenizer, output: Path) -> None:
    """The trained model in fp32 (so small updates survive the delta) with its tokenizer, written atomically."""

    def write(staging: Path) -> None:
        trainer.model.float().save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder(output, write)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite the file atomically with `records` added: a stopped run leaves whole batches, never half a line."""
    earlier = path.read_text(encoding="utf-8") if path.is_file() else ""
    write_file(path, earlier + "".join(json.dumps(record) + "\n" for record in records))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_file(path, json.dumps(data, indent=2, default=str) + "\n")
