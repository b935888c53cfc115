"""Writes never lose data: overwrite replaces only what it made, an interrupted swap leaves the old or the new folder,
leftovers of killed writers are cleaned up, and concurrent saves into one folder take turns."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_graft import GraftConfig, extract_skillpack
from peft_graft.pack.folder import is_pack_folder
from peft_graft.utils import atomic

from fine_tunes import build, plant_delta
from tiny_models import tiny_llama, tiny_tokenizer


def _write_marker(text: str):
    def write(staging):
        (staging / "adapter_config.json").write_text(json.dumps({"peft_type": "GRAFT", "marker": text}))

    return write


def _marker(folder) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["marker"]


def test_overwrite_refuses_a_folder_that_is_not_a_pack_before_any_work(tmp_path):
    build("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    tuned = build("llama")
    plant_delta(tuned, rank=4)
    tuned.save_pretrained(tmp_path / "tuned")
    output = tmp_path / "project"
    output.mkdir()
    (output / "notes.txt").write_text("months of work")  # was deleted by extract --overwrite
    with pytest.raises(FileExistsError, match=r"is not a SkillPack folder"):
        extract_skillpack(tmp_path / "base", tmp_path / "tuned", output, overwrite=True, progress=False)
    assert (output / "notes.txt").read_text() == "months of work"
    assert not list(tmp_path.glob(".project.*"))  # nothing staged
    # a pack folder is replaced, an empty folder is filled
    extract_skillpack(tmp_path / "base", tmp_path / "tuned", tmp_path / "pack", progress=False)
    extract_skillpack(tmp_path / "base", tmp_path / "tuned", tmp_path / "pack", overwrite=True, progress=False)
    (tmp_path / "empty").mkdir()
    extract_skillpack(tmp_path / "base", tmp_path / "tuned", tmp_path / "empty", overwrite=True, progress=False)
    assert is_pack_folder(tmp_path / "pack") and is_pack_folder(tmp_path / "empty")


def test_a_swap_interrupted_at_any_point_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch):
    target = tmp_path / "pack"
    atomic.write_folder(target, _write_marker("old"))
    # interrupted right after the swap: the new one is in place
    real_swap = atomic._swap

    def swap_then_interrupted(staging, destination):
        real_swap(staging, destination)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "_swap", swap_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_folder(target, _write_marker("new"), overwrite=True, replaceable=is_pack_folder)
    monkeypatch.setattr(atomic, "_swap", real_swap)
    assert _marker(target) == "new"
    # what kill -9 leaves (a staging folder nobody removed) is cleaned up by the next writer of that target
    (tmp_path / ".pack.k9x2.partial").mkdir()
    (tmp_path / ".pack.k9x2.partial" / "adapter_model.safetensors").write_bytes(b"half")
    atomic.write_folder(target, _write_marker("next"), overwrite=True, replaceable=is_pack_folder)
    assert _marker(target) == "next" and not list(tmp_path.glob(".pack.*.partial"))

    # without an atomic exchange (not Linux), a kill between the two renames is undone by the next writer
    monkeypatch.setattr(atomic, "_renameat2", lambda: None)
    real_replace, calls = atomic.os.replace, []

    def killed_after_first(source, destination):
        calls.append(source)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, destination)

    monkeypatch.setattr(atomic.os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        atomic.write_folder(target, _write_marker("lost"), overwrite=True, replaceable=is_pack_folder)
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert not target.exists() and (tmp_path / ".pack.replaced").is_dir()
    with pytest.raises(FileExistsError):  # the next writer first puts the old pack back, and refuses to overwrite it
        atomic.write_folder(target, _write_marker("other"))
    assert _marker(target) == "next"


def test_linux_swaps_folders_in_one_atomic_rename(tmp_path):
    if atomic._renameat2() is None:
        pytest.skip("no renameat2 on this platform")
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "a").write_text("old")
    (new / "a").write_text("new")
    atomic._swap(new, old)
    assert (old / "a").read_text() == "new" and (new / "a").read_text() == "old"


def test_concurrent_saves_into_one_folder_take_turns(tmp_path):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(get_peft_model(tiny_llama(), GraftConfig(target_modules=["q_proj"], init_weights=False)))
    errors = []

    def save(model):
        try:
            for _ in range(4):
                model.save_pretrained(tmp_path / "pack")
        except Exception as error:  # collected, so the main thread can fail the test
            errors.append(error)

    threads = [threading.Thread(target=save, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # whichever save came last, its config and weights belong together (the hash matches)
    PeftModel.from_pretrained(tiny_llama(), tmp_path / "pack")


def test_the_cli_reports_a_disk_error_in_one_line(tmp_path, capsys):
    from peft_graft_cli import main

    build("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    (tmp_path / "a-file").write_text("not a folder")
    command = ["extract", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "base")]
    command += ["--output", str(tmp_path / "a-file" / "pack"), "--no-progress"]
    assert main(command) == 2  # the output's parent is a file: the OS refuses the write (as a read-only disk would)
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # (after the progress bars of saving the test's own checkpoint)
    assert last.startswith("peft-graft: error:") and "writable" in last and "Traceback" not in error
    with pytest.raises(OSError):
        main(["--debug", *command])


def test_written_folders_and_files_follow_the_umask(tmp_path):
    import os

    from peft import get_peft_model

    from peft_graft import GraftConfig, RoutedGraftModel

    from tiny_models import tiny_llama, tiny_tokenizer

    previous = os.umask(0o022)
    try:
        atomic.write_folder(tmp_path / "pack", _write_marker("shared"))
        atomic.write_file(tmp_path / "pack" / "card.md", "text")
        for name in ("trained", "other"):
            get_peft_model(tiny_llama(), GraftConfig(init_weights=False)).save_pretrained(tmp_path / name)
        packs = {"math": tmp_path / "trained", "code": tmp_path / "other"}
        routed = RoutedGraftModel.from_packs(tiny_llama(), packs, tiny_tokenizer())
        routed.fit_router({"math": ["two plus two", "three times four"], "code": ["def f(x):", "return x"]})
        routed.save_pretrained(tmp_path / "router")
    finally:
        os.umask(previous)
    # were 0700 and 0600 (mkdtemp / mkstemp): a team's shared cache could not read them
    assert (tmp_path / "pack").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "pack" / "card.md").stat().st_mode & 0o777 == 0o644
    for saved in ("trained", "router"):
        for path in [tmp_path / saved, *(tmp_path / saved).rglob("*")]:
            expected = 0o755 if path.is_dir() else 0o644
            assert path.stat().st_mode & 0o777 == expected, path
