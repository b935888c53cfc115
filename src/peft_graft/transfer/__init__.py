"""Cross-capability transfer (behind the ``[trl]`` extra): a source model answers a task, trl fine-tunes the target on
the checked answers (SFT, optionally DPO), and the delta becomes a SkillPack. See ``pipeline``."""

from .pipeline import REFERENCE, STAGES, TransferConfig, TransferResult, transfer

__all__ = ["REFERENCE", "STAGES", "TransferConfig", "TransferResult", "transfer"]
