"""Extraction: from a base and a fine-tune checkpoint to a SkillPack folder.

``extract`` orchestrates; ``options`` (ExtractionOptions) and ``report`` (ExtractionReport) are its interface;
``checkpoint`` and ``delta`` read the checkpoints, ``roles`` decides each module's operator, ``plan`` and ``budget``
spend a byte budget, ``compressor`` compresses one module, and ``calibration`` walks the model for GPTQ.
"""

from .extract import extract_skillpack
from .options import ExtractionOptions
from .report import ExtractionReport, ModuleReport

__all__ = ["ExtractionOptions", "ExtractionReport", "ModuleReport", "extract_skillpack"]
