"""Operations on finished packs: export as a standard PEFT LoRA adapter, and static fusion of several packs."""

from .export import LoraExport, export_lora
from .fusion import METHODS, combine_deltas, merge_packs, pack_deltas

__all__ = ["METHODS", "LoraExport", "combine_deltas", "export_lora", "merge_packs", "pack_deltas"]
