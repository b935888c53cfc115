"""Run untrusted Python (model-written code) in a separate process with time, memory and file-size limits.

Nothing runs in-process: the program is written to a fresh temporary folder and executed by a new interpreter in
isolated mode (``-I``: no user site, no PYTHON* variables, script folder not on the path), in its own session so a
timeout kills everything it started. This is a guard against accidents (loops, memory blow-ups, stray files), not a
security boundary against hostile code; run untrusted benchmarks in a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout"
    detail: str = ""


def run_python(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> RunResult:
    """Run `source` as a script; it passes when it exits with status 0 within `timeout` seconds."""

    def limit() -> None:  # runs in the child, before the interpreter starts
        import resource

        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (int(timeout) + 1, int(timeout) + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 * 1024 * 1024, 10 * 1024 * 1024))

    with tempfile.TemporaryDirectory(prefix="graft-sandbox-") as folder:
        script = Path(folder) / "program.py"
        script.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": folder, "TMPDIR": folder}
        process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(script)],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=limit if os.name == "posix" else None,
            start_new_session=True,
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return RunResult(False, "timeout", f"no result within {timeout} s")
    if process.returncode == 0:
        return RunResult(True, "passed")
    lines = stderr.decode("utf-8", "replace").strip().splitlines()
    return RunResult(False, "failed", lines[-1] if lines else f"exit status {process.returncode}")
