"""The examples run as documented (offline)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_quickstart_runs_offline_and_reports_a_faithful_pack():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")], capture_output=True, text=True, check=True, timeout=300
    )
    size = float(re.search(r"\(([\d.]+)x the fp16 factors\)", result.stdout).group(1))
    error = float(re.search(r"reload error:\s+([\d.]+)", result.stdout).group(1))
    assert 0 < size < 0.5  # 16 directions at 8 bits + 16 at 4 bits, plus scales
    assert error < 0.1
    assert "mixed batch row 0 == skill-a alone: True" in result.stdout
