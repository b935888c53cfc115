"""The ``peft-graft`` command line as a new user meets it: a help that imports nothing heavy, one-line errors (the
traceback only with --debug), inspect on any pack or router folder, refusals before any work, --quiet and --json."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_graft import GraftConfig, PackFormatError, RoutedGraftModel
from peft_graft.pack.folder import PackFolder
from peft_graft.pack.summary import pack_summary
from peft_graft.utils import extras
from peft_graft_cli import COMMANDS, main

from fine_tunes import save_pair
from tiny_models import tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _trained_pack(folder: Path, seed: int = 1) -> Path:
    base = tiny_llama()
    torch.manual_seed(seed)
    config = GraftConfig(target_modules=["q_proj", "v_proj", "embed_tokens"], init_weights=False, r=4)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    assert error.startswith("peft-graft: error: ")
    return error


def test_help_and_version_import_neither_torch_nor_the_tuner():
    script = (
        "import sys; from peft_graft_cli import main; codes = (main(['--help']), main(['--version'])); "
        "print(codes, 'torch' in sys.modules, 'peft_graft' in sys.modules)"
    )
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert shown.strip().endswith("(0, 0) False False")
    assert all(name in shown for name in COMMANDS) and "--quiet" in shown and "--debug" in shown
    assert f"peft-graft {version('peft-graft')}" in shown


def test_errors_are_one_line_and_debug_raises_with_the_traceback(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a pack")
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "notes.txt")]) == 2
    assert "is a file: give the pack folder" in _one_line_error(capsys)
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _one_line_error(capsys)
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    assert "neither a pack folder" in _one_line_error(capsys)
    assert main(["frobnicate"]) == 2
    assert "No such command" in _one_line_error(capsys)
    with pytest.raises(PackFormatError, match="neither a pack folder"):
        main(["--debug", "inspect", str(tmp_path / "empty")])


def test_inspect_reads_a_trained_pack_and_a_router_folder(tmp_path, capsys):
    pack = _trained_pack(tmp_path / "math")
    assert main(["inspect", str(pack)]) == 0
    shown = capsys.readouterr().out
    assert "low-rank" in shown and "sparse" in shown and "base:" in shown  # by form: a trained pack has no roles
    assert "model.layers.0.self_attn.q_proj" not in shown
    assert main(["inspect", "--modules", str(pack)]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out
    assert main(["inspect", "--json", str(pack)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "pack" and summary["keyed_by"] == "form"
    assert sum(row["bytes"] for row in summary["groups"]) == sum(m["bytes"] for m in summary["modules"]) > 0
    assert {row["form"] for row in summary["groups"]} == {"low-rank", "sparse"}

    _trained_pack(tmp_path / "code", seed=2)
    routed = RoutedGraftModel.from_packs(
        tiny_llama(), {"math": tmp_path / "math", "code": tmp_path / "code"}, tiny_tokenizer()
    )
    routed.save_pretrained(tmp_path / "router")
    assert main(["inspect", str(tmp_path / "router")]) == 0
    shown = capsys.readouterr().out
    assert "math" in shown and "code" in shown and "packs/math" in shown
    assert main(["inspect", "--json", str(tmp_path / "router")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kind"] == "router" and [p["name"] for p in summary["packs"]] == ["math", "code"]
    sizes = {p["name"]: p["pack_bytes"] for p in summary["packs"]}
    assert sizes == {name: PackFolder(tmp_path / "router" / "packs" / name).pack_bytes for name in ("math", "code")}


def test_extract_refuses_policy_flags_beside_a_budget_before_any_work(tmp_path, capsys):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    capsys.readouterr()  # saving the pair's own progress bars
    common = ["extract", "--base", str(base_dir), "--finetuned", str(tuned_dir), "--output", str(tmp_path / "pack")]
    assert main([*common, "--budget", "0.1", "--attn-rank", "8", "--bands", "4:8,rest:4"]) == 2
    error = _one_line_error(capsys)
    assert "--budget plans ranks and bits itself, so --attn-rank and --bands would be ignored" in error
    assert "(see peft-graft extract --help)" in error
    assert main([*common, "--bands", "4-8"]) == 2
    assert "is not DIRECTIONS:BITS" in _one_line_error(capsys)
    assert not (tmp_path / "pack").exists()


def test_a_budget_packs_card_and_inspect_tell_what_was_done(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    pack = tmp_path / "pack"
    command = [sys.executable, "-m", "peft_graft_cli", "--quiet", "extract", "--base", str(base_dir)]
    command += ["--finetuned", str(tuned_dir), "--output", str(pack), "--budget", "0.125"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: no progress bars, no notes
    assert "of the fp16 delta" in done.stdout
    card = (pack / "README.md").read_text()
    assert "Byte budget: 0.125 of the fp16 delta" in card
    assert "the table below shows what each role actually got" in card
    assert "truncated SVD at rank" not in card  # not the default policy, which a budget does not use
    summary = pack_summary(pack)
    report = json.loads((pack / "graft_report.json").read_text())
    attn = [m for m in report["modules"] if m["role"] == "attn" and m["rank"] is not None]
    row = next(row for row in summary["groups"] if row["role"] == "attn")
    assert row["ranks"] == [min(m["rank"] for m in attn), max(m["rank"] for m in attn)]
    low, high = row["ranks"]
    ranks = str(low) if low == high else f"{low}–{high}"
    assert f"| attn | {row['modules']} |" in card and f"| {ranks} |" in card


def test_eval_refuses_packs_with_one_folder_name_and_names_a_missing_extra_before_loading(
    tmp_path, capsys, monkeypatch
):
    _trained_pack(tmp_path / "a" / "pack")
    _trained_pack(tmp_path / "b" / "pack", seed=2)
    (tmp_path / "texts.txt").write_text("hello world\n")
    capsys.readouterr()
    argv = ["eval", "--base", str(tmp_path / "no-base"), "--texts", str(tmp_path / "texts.txt")]
    assert main([*argv, "--pack", str(tmp_path / "a" / "pack"), "--pack", str(tmp_path / "b" / "pack")]) == 2
    assert "two packs share the folder name pack" in _one_line_error(capsys)
    # an extra that is not installed is named before any model loads (the base folder does not even exist)
    monkeypatch.setitem(extras.EXTRA_MODULES, "eval", ("evaluate", "a_module_that_is_not_installed"))
    assert main(argv) == 2
    error = _one_line_error(capsys)
    assert "needs the 'eval' extra (a_module_that_is_not_installed missing)" in error
    assert "pip install 'peft-graft[eval]'" in error
