"""The README's quickstart runs as written: its shell block (extract, inspect) and its Python block, on a tiny local
base and fine-tune put where the README names SmolLM2 and ``./my-math-sft`` (the only substitution)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from fine_tunes import save_pair

README = Path(__file__).parents[1] / "README.md"


def _quickstart_blocks() -> tuple[str, str]:
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return shell, python


def test_the_readme_quickstart_runs_as_written(tmp_path):
    shell, python = _quickstart_blocks()
    assert python.splitlines()[0].startswith("import peft_graft")  # the line everyone needs comes first
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    names = {"HuggingFaceTB/SmolLM2-135M-Instruct": str(base_dir), "./my-math-sft": str(tuned_dir)}
    for name, local in names.items():
        assert name in shell
        shell = shell.replace(name, local)
    python = python.replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(base_dir))
    for line in shell.strip().splitlines():
        command = shlex.split(line)
        assert command[0] == "peft-graft"
        done = subprocess.run(
            [sys.executable, "-m", "peft_graft_cli", *command[1:]], cwd=tmp_path, capture_output=True, text=True
        )
        assert done.returncode == 0, (line, done.stderr)
    assert (tmp_path / "math-pack" / "adapter_model.safetensors").is_file()
    done = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("What is 17 + 25?")  # the prompt, then what the packed model generated
