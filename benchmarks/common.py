"""Shared by the benchmarks: the machine record, result files, tables and the real model pair."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on: recorded next to every result."""
    import peft
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def write_results(name: str, payload: dict[str, Any], table: str, suffix: str = "") -> Path:
    """``results/<name><suffix>.json`` and ``.md`` (the table, with the machine line)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), **payload}
    path = RESULTS / f"{name}{suffix}.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    info = record["machine"]
    header = f"_{info['date']}, {info['cpu']} ({info['cores']} cores), device {info['device']}, torch {info['torch']}, "
    header += f"transformers {info['transformers']}_\n\n"
    (RESULTS / f"{name}{suffix}.md").write_text(header + table + "\n")
    return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# Runs a command in a fork of this small process and writes the child's ru_maxrss (KiB) to argv[1]. A child spawned
# straight from the benchmark would inherit the benchmark's own high-water mark at exec (vfork/exec carries it over);
# from here it inherits only this launcher's ~10 MiB.
_LAUNCHER = """
import os, sys
child = os.fork()
if child == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(child, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, in its own process."""
    with tempfile.TemporaryFile() as errors, tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        child = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, peak.name, *map(str, command)],
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        seconds = time.perf_counter() - started
        if child.returncode != 0:
            errors.seek(0)
            message = errors.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{message}")
        return seconds, int(peak.read()) * 1024


def python() -> str:
    return sys.executable
