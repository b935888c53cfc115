"""What a SkillPack folder holds and how its tensors are named: the only place that knows pack file names and keys.

A pack folder::

    adapter_config.json          the GraftConfig (PEFT's adapter config)
    adapter_model.safetensors    the packed tensors, keyed ``base_model.model.<module>.<graft_tensor>[.<part>]``
    graft_report.json            what extraction did, module by module (extracted packs only)
    README.md                    the model card
    tokenizer files              when the fine-tune changed the vocabulary

Pickle weights are never read from a pack, whatever their name. A pack sets only GRAFT tensors (``graft_*`` keys), and
exactly those of the modules its config adapts: any other key (a base weight would overwrite the base model), tensors
of modules the config does not adapt, and adapted modules missing from the file are refused with PackFormatError.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REPORT_FILE = "graft_report.json"
CARD_FILE = "README.md"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files a fine-tune's tokenizer may consist of; a pack carries them when the fine-tune changed the vocabulary.
TOKENIZER_FILES = (
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
# What a pack folder may hold; nothing else is downloaded or uploaded.
PACK_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, REPORT_FILE, CARD_FILE, *TOKENIZER_FILES)
# Weight files a pack must not be loaded from: they are pickle, which can run code.
PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")

PEFT_TYPE = "GRAFT"
KEY_PREFIX = "graft_"
"""PEFT's prefix of GRAFT tensors: every tensor name of a GRAFT layer starts with it."""
PEFT_PREFIX = "base_model.model."
"""What PEFT puts before module names in an adapter file."""

# Forms of a module's delta, as graft_report.json names them.
LOWRANK, SPARSE, DENSE, QUANTIZED, BIAS = "lowrank", "sparse", "dense", "quantized", "bias"


def pack_key(module_name: str, relative_key: str) -> str:
    """The key of a module's packed tensor in ``adapter_model.safetensors``."""
    return f"{PEFT_PREFIX}{module_name}.{relative_key}"


def split_key(key: str) -> tuple[str, str] | None:
    """``(module name, key relative to the module)`` of a pack tensor, without PEFT's prefix; None for other keys."""
    position = key.find(f".{KEY_PREFIX}")
    if position < 0:
        return None
    return key[:position].removeprefix(PEFT_PREFIX), key[position + 1 :]


def modules_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a pack file's tensors by module: ``{module name: {relative key: tensor}}`` (other keys are dropped)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is not None:
            modules.setdefault(split[0], {})[split[1]] = tensor
    return modules
