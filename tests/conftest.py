import os

# Tests never touch the network: set before transformers / huggingface_hub are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

import peft_graft  # noqa: F401  (registers PeftType.GRAFT)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
