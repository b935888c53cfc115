import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Set before transformers / huggingface_hub are imported (they read these once, at import).
# The Hub endpoint is a loopback server owned by this test session (tests/hub_server.py), so tests can push and pull
# through the real huggingface_hub client while nothing ever leaves the machine; the Hub cache is a fresh folder.
from hub_server import LoopbackHub

_HUB_ROOT = Path(tempfile.mkdtemp(prefix="graft-test-hub-"))
HUB = LoopbackHub(_HUB_ROOT / "repos").start()
atexit.register(shutil.rmtree, _HUB_ROOT, ignore_errors=True)
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ["HF_HOME"] = str(_HUB_ROOT / "hf-home")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import peft_graft  # noqa: E402, F401  (registers PeftType.GRAFT)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def hub() -> LoopbackHub:
    """The session's loopback Hub; each test gets a clean tamper table (use unique repo names)."""
    HUB.tamper.clear()
    yield HUB
    HUB.tamper.clear()
