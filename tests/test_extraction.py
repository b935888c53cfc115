"""SkillPack extraction on tiny checkpoints: roles, tied / grown embeddings, dtypes, shards, errors, budgets."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from peft_graft import (
    CheckpointMismatchError,
    ExtractionReport,
    GraftConfig,
    GraftConfigError,
    MissingTensorError,
    NonFiniteDeltaError,
    PickleCheckpointError,
    extract_skillpack,
    grow_vocabulary,
)

from fine_tunes import build, plant_delta, save_pair
from tiny_models import tiny_tokenizer, token_batch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _error_vs_finetune(pack: Path, base_dir: Path, tuned_dir: Path, ids=None) -> float:
    """‖pack logits − fine-tune logits‖ / ‖fine-tune logits − base logits‖: 0 is perfect, 1 is no better than base."""
    ids = token_batch() if ids is None else ids
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir).float().eval()
        tuned_model = AutoModelForCausalLM.from_pretrained(tuned_dir).float().eval()
        grow_vocabulary(base, tuned_model.config.vocab_size)  # added tokens: the base's rows for them are zero
        base_logits = base(ids).logits
        tuned = tuned_model(ids).logits
        packed = PeftModel.from_pretrained(base, pack).eval()(ids).logits
    return float((packed - tuned).norm() / (tuned - base_logits).norm())


def _edited_copy(source: Path, target: Path, edit) -> Path:
    """A copy of a single-file checkpoint whose tensors went through `edit` (which changes the dict in place)."""
    target.mkdir()
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    (target / "config.json").write_text((source / "config.json").read_text())
    return target


def _assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_default_extraction_reproduces_a_planted_rank_4_delta_under_an_eighth_of_the_bytes(arch, tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, arch)
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", progress=False)
    assert report.ratio <= 1 / 8, report.table()
    assert (tmp_path / "pack" / "adapter_model.safetensors").stat().st_size == report.pack_bytes
    error = _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir)
    assert error < 0.06, f"{arch}: logit error {error:.4f} of the fine-tune's effect\n{report.table()}"


def test_every_module_role_gets_its_operator(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", progress=False)
    by_name = {m.name: m for m in report.modules}
    assert by_name["transformer.wte"].form == "sparse" and by_name["transformer.wpe"].form == "sparse"
    attention = by_name["transformer.h.0.attn.c_attn"]
    assert attention.role == "attn" and attention.rank == 16 and attention.bands == [[16, 8]]
    mlp = by_name["transformer.h.0.mlp.c_fc"]
    assert mlp.role == "mlp" and mlp.rank == 4  # the planted rank: 90% of the energy needs exactly 4 directions
    assert by_name["transformer.h.0.ln_1"].form == "dense" and by_name["transformer.ln_f"].role == "dense"
    stored = load_file(tmp_path / "pack" / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.graft_bias" in stored  # biases are never dropped
    assert "base_model.model.transformer.h.0.ln_1.graft_bias" in stored
    assert not any("lm_head" in name for name in stored)  # tied to wte: stored once


def test_config_overrides_roles_ranks_and_densities(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    config = GraftConfig(
        r=6,
        module_roles={"down_proj": "dense", r"layers\.1\.self_attn\.v_proj": "skip"},
        rank_pattern={"layers.0.self_attn.q_proj": 2},
        density_pattern={"lm_head": 0.02},
    )
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", config, progress=False)
    by_name = {m.name: m for m in report.modules}
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 2
    assert by_name["model.layers.0.self_attn.k_proj"].rank == 6
    assert by_name["model.layers.0.mlp.down_proj"].form == "dense"
    assert "model.layers.1.self_attn.v_proj" not in by_name
    assert by_name["lm_head"].density == pytest.approx(0.02, abs=1e-3)  # the planted delta has 6.25 % non-zeros
    assert by_name["model.embed_tokens"].density == pytest.approx(0.05, abs=1e-3)


def test_a_factorization_larger_than_the_dense_delta_is_never_written(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    config = GraftConfig(r=64, precision_bands=[(None, 16)], mlp_energy=1.0)
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", config, progress=False)
    k_proj = next(m for m in report.modules if m.name.endswith("layers.0.self_attn.k_proj"))
    assert k_proj.form == "dense" and k_proj.bytes == 2 * 64 * 128  # GQA: 64 x 128, rank 64 x (64 + 128) is larger
    _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir)  # dense modules load too


def test_tied_embeddings_carry_one_delta_for_both_ends(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "qwen2")
    extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", GraftConfig(embed_density=1.0), progress=False)
    config = json.loads((tmp_path / "pack" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"] and "lm_head" not in config["target_modules"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack")
    assert "default" in model.get_output_embeddings().graft_tied
    assert _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir) < 0.06


def test_added_tokens_are_stored_dense_with_the_tokenizer_and_grow_the_base(tmp_path):
    base_dir = tmp_path / "base"
    build("llama").save_pretrained(base_dir)
    tiny_tokenizer().save_pretrained(base_dir)
    tuned = build("llama")
    tuned.resize_token_embeddings(131, mean_resizing=False)
    plant_delta(tuned)
    with torch.no_grad():
        tuned.model.embed_tokens.weight[128:] = torch.randn(3, 128)
        tuned.lm_head.weight[128:] = torch.randn(3, 128)
    tuned.save_pretrained(tmp_path / "finetuned")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<skill>", "<step>", "<done>"])
    tokenizer.save_pretrained(tmp_path / "finetuned")

    extract_skillpack(base_dir, tmp_path / "finetuned", tmp_path / "pack", progress=False)
    stored = load_file(tmp_path / "pack" / "adapter_model.safetensors")
    rows = stored["base_model.model.model.embed_tokens.graft_rows"]
    assert rows.shape == (3, 128) and int(stored["base_model.model.model.embed_tokens.graft_rows_start"]) == 128
    assert json.loads((tmp_path / "pack" / "adapter_config.json").read_text())["vocab_size"] == 131
    assert (tmp_path / "pack" / "tokenizer.json").is_file()
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path / "pack")) == len(tokenizer)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "pack")
    assert model.get_input_embeddings().get_base_layer().weight.shape == (131, 128)
    ids = torch.tensor([[5, 128, 129, 130, 7]])
    assert _error_vs_finetune(tmp_path / "pack", base_dir, tmp_path / "finetuned", ids) < 0.06


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama", dtype=dtype)
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", progress=False)
    assert report.ratio <= 1 / 8
    assert _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir) < 0.1


def test_sharded_checkpoints_give_the_identical_pack(tmp_path):
    whole = save_pair(tmp_path / "whole", "llama")
    sharded = save_pair(tmp_path / "sharded", "llama", max_shard_size="60KB")
    assert (sharded[0] / "model.safetensors.index.json").is_file()
    extract_skillpack(*whole, tmp_path / "pack-whole", progress=False)
    extract_skillpack(*sharded, tmp_path / "pack-sharded", progress=False)
    whole_bytes = (tmp_path / "pack-whole" / "adapter_model.safetensors").read_bytes()
    assert whole_bytes == (tmp_path / "pack-sharded" / "adapter_model.safetensors").read_bytes()


def test_bad_inputs_are_clear_errors_and_write_nothing(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    output = tmp_path / "pack"

    other = tmp_path / "qwen"
    build("qwen2").save_pretrained(other)
    with pytest.raises(CheckpointMismatchError, match="differ in model_type"):
        extract_skillpack(base_dir, other, output, progress=False)
    _assert_nothing_written(output)

    narrow = tmp_path / "narrow"
    build("llama", intermediate_size=192).save_pretrained(narrow)
    with pytest.raises(CheckpointMismatchError, match=r"gate_proj.weight has shape \(256, 128\) in the base but"):
        extract_skillpack(base_dir, narrow, output, progress=False)
    _assert_nothing_written(output)

    missing = _edited_copy(tuned_dir, tmp_path / "missing", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model.layers.1.mlp.up_proj.weight is missing from the fine-tune"):
        extract_skillpack(base_dir, missing, output, progress=False)
    _assert_nothing_written(output)

    broken = _edited_copy(tuned_dir, tmp_path / "broken", lambda t: t["model.norm.weight"].__setitem__(3, float("nan")))
    with pytest.raises(NonFiniteDeltaError, match=r"model.norm.weight holds NaN or Inf"):
        extract_skillpack(base_dir, broken, output, progress=False)
    _assert_nothing_written(output)
    key = "model.layers.0.mlp.down_proj.weight"
    infinite = _edited_copy(tuned_dir, tmp_path / "infinite", lambda t: t[key].__setitem__((2, 5), float("-inf")))
    with pytest.raises(NonFiniteDeltaError, match=rf"{key} holds NaN or Inf"):
        extract_skillpack(base_dir, infinite, output, budget=1 / 8, progress=False)
    _assert_nothing_written(output)

    with pytest.raises(CheckpointMismatchError, match="is a Conv1D; the 'embed' role"):
        extract_skillpack(*save_pair(tmp_path / "gpt2", "gpt2"), output, GraftConfig(module_roles={"c_fc": "embed"}))
    _assert_nothing_written(output)

    with pytest.raises(CheckpointMismatchError, match="identical to the base"):
        extract_skillpack(base_dir, base_dir, output, progress=False)
    _assert_nothing_written(output)

    output.mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        extract_skillpack(base_dir, tuned_dir, output, progress=False)
    assert not any(output.iterdir())


def test_pickle_only_checkpoints_are_refused_unless_allowed(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(load_file(tuned_dir / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "config.json").write_text((tuned_dir / "config.json").read_text())
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model.bin.*allow_pickle=True"):
        extract_skillpack(base_dir, pickled, tmp_path / "pack", progress=False)
    _assert_nothing_written(tmp_path / "pack")
    report = extract_skillpack(base_dir, pickled, tmp_path / "pack", allow_pickle=True, progress=False)
    assert report.modules


def test_an_interrupted_run_leaves_no_pack_behind_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    extract_skillpack(base_dir, tuned_dir, tmp_path / "straight", budget=1 / 8, progress=False)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(GraftConfig, "save_pretrained", interrupted)  # after every unit is staged
        with pytest.raises(KeyboardInterrupt):
            extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 8, progress=False)
    assert not (tmp_path / "pack").exists()
    assert not list(tmp_path.glob(".pack.*.partial"))  # no half-written pack folder
    assert (tmp_path / ".pack.extracting").is_dir()  # the finished work is kept for --resume
    with pytest.raises(GraftConfigError, match="other inputs or settings"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 4, resume=True, progress=False)
    assert (tmp_path / ".pack.extracting").is_dir()

    from peft_graft.extraction.compressor import Compressor

    compressed = []
    with monkeypatch.context() as patch:  # every unit was staged before the interrupt: none is compressed again
        patch.setattr(Compressor, "compress", lambda self, spec, hessian=None: compressed.append(spec.name))
        extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=1 / 8, resume=True, progress=False)
    assert compressed == []
    assert not (tmp_path / ".pack.extracting").exists()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "pack" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_a_killed_extraction_resumes_from_its_last_finished_unit(tmp_path):
    """kill -9 of the CLI in the middle of a run; --resume redoes only the unfinished units, to the same bytes."""
    import signal
    import time

    base_dir, tuned_dir = save_pair(tmp_path, "llama", model_overrides={"num_hidden_layers": 6})
    common = [sys.executable, "-m", "peft_graft_cli", "extract", "--base", str(base_dir), "--finetuned", str(tuned_dir)]
    subprocess.run([*common, "--output", str(tmp_path / "straight"), "--no-progress"], check=True, capture_output=True)
    work = tmp_path / ".pack.extracting" / "units"
    process = subprocess.Popen([*common, "--output", str(tmp_path / "pack"), "--no-progress"])
    deadline = time.monotonic() + 120
    while len(list(work.glob("*.json"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sorted(path.name for path in work.glob("*.json"))
    assert 3 <= len(finished) < 9 and not (tmp_path / "pack").exists(), finished  # 3 outside units + 6 layers

    subprocess.run([*common, "--output", str(tmp_path / "pack"), "--no-progress", "--resume"], check=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "pack" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    assert not (tmp_path / ".pack.extracting").exists()


@pytest.mark.parametrize("budget", [1 / 8, 1 / 16])
def test_budget_mode_keeps_the_pack_within_budget(budget, tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=budget, progress=False)
    assert report.pack_bytes <= budget * report.fp16_delta_bytes
    assert report.ratio > 0.6 * budget  # the budget is spent, not hoarded
    bands = [m.bands for m in report.modules if m.form == "lowrank"]
    assert all(all(a[1] >= b[1] for a, b in itertools.pairwise(band)) for band in bands)
    assert _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir) < (0.06 if budget == 1 / 8 else 0.1)


def test_a_budget_below_the_mandatory_parts_is_refused(tmp_path):
    from peft_graft import BudgetError

    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    with pytest.raises(BudgetError, match=r"0\.001 of the fp16 delta is too small.*smallest budget that keeps") as low:
        extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=0.001, progress=False)
    _assert_nothing_written(tmp_path / "pack")
    smallest = low.value.smallest
    assert smallest > 0.001
    # just below it: norms and biases fit, no module does; the error says so (not "identical to the base")
    with pytest.raises(BudgetError, match="buys no module's delta"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=smallest * 0.999, progress=False)
    _assert_nothing_written(tmp_path / "pack")
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", budget=smallest * 1.001, progress=False)
    assert any(module.role != "norm" for module in report.modules)  # the figure given keeps a module


def _calibration_texts(count: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "and", "is", "the", "skill"]
    texts = []
    for _ in range(count):
        a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=generator))
        picks = torch.randint(0, len(words), (6,), generator=generator)
        texts.append(" ".join(words[int(i)] for i in picks) + f" {a}+{b}={a + b}.")
    return texts


@pytest.mark.parametrize("source", ["list", "jsonl", "dataset"])
def test_calibrated_extraction_accepts_each_input_kind_and_reports_output_errors(source, tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    texts = _calibration_texts(32, seed=0)
    if source == "jsonl":
        calibration = tmp_path / "calibration.jsonl"
        calibration.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    elif source == "dataset":
        from datasets import Dataset

        calibration = Dataset.from_dict({"text": texts})
    else:
        calibration = texts
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", calibration=calibration, progress=False)
    assert report.calibrated and report.settings["calibration_samples"] == 32
    lowrank = [m for m in report.modules if m.form == "lowrank"]
    assert lowrank and all(m.output_error is not None and m.output_error < 0.1 for m in lowrank)
    held_out = tiny_tokenizer()(_calibration_texts(16, seed=1), return_tensors="pt", padding=True)["input_ids"]
    assert _error_vs_finetune(tmp_path / "pack", base_dir, tuned_dir, held_out) < 0.06


def test_calibrated_gptq_beats_round_to_nearest_at_equal_bytes_on_held_out_text(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    tokenizer = tiny_tokenizer()
    held_out = tokenizer(_calibration_texts(16, seed=1), return_tensors="pt", padding=True)["input_ids"]
    config = GraftConfig(precision_bands=[(None, 2)], r=8)  # low bits, where the data matters most
    rtn = extract_skillpack(base_dir, tuned_dir, tmp_path / "rtn", config, progress=False)
    gptq = extract_skillpack(
        base_dir, tuned_dir, tmp_path / "gptq", config, calibration=_calibration_texts(64, seed=0), progress=False
    )
    assert gptq.pack_bytes == rtn.pack_bytes
    rtn_error = _error_vs_finetune(tmp_path / "rtn", base_dir, tuned_dir, held_out)
    gptq_error = _error_vs_finetune(tmp_path / "gptq", base_dir, tuned_dir, held_out)
    assert gptq_error < rtn_error, (gptq_error, rtn_error)


def test_report_is_written_and_inspect_prints_it(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    cli = [sys.executable, "-m", "peft_graft_cli"]
    extract = [
        *cli,
        "extract",
        "--base",
        str(base_dir),
        "--finetuned",
        str(tuned_dir),
        "--output",
        str(tmp_path / "pack"),
    ]
    result = subprocess.run([*extract, "--attn-rank", "8", "--bands", "4:8,rest:4"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "of the fp16 delta" in result.stdout and "attn" in result.stdout  # the size, and the table by role
    report = ExtractionReport.load(tmp_path / "pack")
    assert report.fp16_delta_bytes > report.pack_bytes > 0 and report.peak_rss_bytes > 0 and report.wall_seconds > 0
    stages = report.stage_seconds
    assert set(stages) == {"setup", "planning", "compression", "writing", "per_layer"}
    assert all(seconds >= 0 for seconds in stages.values())
    assert abs(sum(stages[k] for k in ("setup", "planning", "compression", "writing")) - report.wall_seconds) < 1e-6
    assert "wrote" in result.stderr and "setup" in result.stderr
    q_proj = next(m for m in report.modules if m.name.endswith("layers.0.self_attn.q_proj"))
    assert q_proj.rank == 8 and q_proj.bands == [[4, 8], [4, 4]]
    shown = subprocess.run([*cli, "inspect", str(tmp_path / "pack")], capture_output=True, text=True, check=True)
    assert "attn" in shown.stdout and "8/4" in shown.stdout and "q_proj" not in shown.stdout  # by role
    every = [*cli, "inspect", "--modules", str(tmp_path / "pack")]
    shown = subprocess.run(every, capture_output=True, text=True, check=True)
    assert "model.layers.0.self_attn.q_proj" in shown.stdout and "4x8,4x4" in shown.stdout
    failed = subprocess.run(extract, capture_output=True, text=True)
    assert failed.returncode == 2 and "already exists" in failed.stderr


def test_options_come_as_one_object_or_as_keywords_and_drive_the_cli(tmp_path, capsys):
    from dataclasses import fields

    from peft_graft import BudgetError, ExtractionOptions
    from peft_graft_cli import main
    from peft_graft_cli.commands import extract as extract_command

    base_dir, tuned_dir = save_pair(tmp_path, "gpt2")
    options = ExtractionOptions(budget=1 / 8, progress=True)
    report = extract_skillpack(base_dir, tuned_dir, tmp_path / "pack", None, options, progress=False)
    assert report.budget == 1 / 8 and report.pack_bytes <= report.fp16_delta_bytes / 8
    assert options.progress is True  # keywords override a copy, never the object given
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) budgt; the options are .*budget"):
        extract_skillpack(base_dir, tuned_dir, tmp_path / "other", budgt=0.1)
    with pytest.raises(BudgetError):
        ExtractionOptions(budget=1.5)

    command = extract_command()
    parsed = command.make_context("extract", ["--base", "b", "--finetuned", "f", "--output", "o", "--no-act-order"])
    flags = list(fields(ExtractionOptions))
    assert {item.name: parsed.params[item.name] for item in flags} == {
        **{item.name: item.default for item in flags},
        "act_order": False,
    }
    assert main(["extract", "--help"]) == 0
    shown = capsys.readouterr().out
    assert all("--" + item.name.replace("_", "-") in shown for item in flags)
