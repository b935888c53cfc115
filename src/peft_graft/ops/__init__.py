"""Operations on finished packs: export as a standard PEFT LoRA adapter, and static fusion of several packs."""

from .export import EngineExport, LoraExport, export_gguf, export_lora, export_vllm
from .fusion import METHODS, combine_deltas, merge_packs, pack_deltas

__all__ = [
    "METHODS",
    "EngineExport",
    "LoraExport",
    "combine_deltas",
    "export_gguf",
    "export_lora",
    "export_vllm",
    "merge_packs",
    "pack_deltas",
]
