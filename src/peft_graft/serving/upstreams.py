"""The OpenAI-compatible engines the routing gateway forwards to, and how each one selects an adapter: one table, so
that supporting another engine is one entry (no imports here: the CLI lists the engines without loading the server).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineNaming:
    """How an engine's OpenAI API selects an adapter: the ``model`` a pack's request carries, and the one for the
    base alone (``{base}``: the engine's base model name, ``{adapter}``: the pack's adapter name there). With
    ``lora_scales``, the adapter is chosen by a per-request ``lora`` list of ``{"id", "scale"}`` instead (llama.cpp:
    adapters given with ``--lora`` at start, numbered in that order; any not listed would keep its global scale).
    ``health`` is the path that answers 200 when the engine is up."""

    model: str
    base: str = "{base}"
    lora_scales: bool = False
    health: str = "/health"


ENGINES: dict[str, EngineNaming] = {
    "peft-graft": EngineNaming("{adapter}"),
    "vllm": EngineNaming("{adapter}"),  # vllm serve BASE --enable-lora --lora-modules NAME=PATH ...
    "lorax": EngineNaming("{adapter}"),  # the adapter id
    "sglang": EngineNaming("{base}:{adapter}"),  # --enable-lora --lora-paths NAME=PATH ...
    "llamacpp": EngineNaming("{base}", lora_scales=True),  # llama-server -m BASE.gguf --lora PACK.gguf ...
    # python -m llama_cpp.server --config_file F: one model alias per pack (the base GGUF with its lora_path)
    "llama-cpp-python": EngineNaming("{adapter}", health="/v1/models"),
}
