"""Pure tensor math for SkillPacks: bit packing, group-wise quantization, low-rank factors, sparse deltas.

Nothing in this package does I/O or knows about PEFT.
"""

from .bitpack import pack_codes, packed_nbytes, unpack_codes
from .lowrank import BandSlice, band_slices, canonical_factors
from .quantize import GroupQuantized, dequantize_groupwise, fit_grid, quantize_groupwise, quantize_to_grid
from .sparse import (
    LargestEntries,
    MagnitudeHistogram,
    csr_row_pointers,
    magnitude_prune,
    scatter_dense,
    top_magnitude_positions,
)

__all__ = [
    "BandSlice",
    "GroupQuantized",
    "LargestEntries",
    "MagnitudeHistogram",
    "band_slices",
    "canonical_factors",
    "csr_row_pointers",
    "dequantize_groupwise",
    "fit_grid",
    "magnitude_prune",
    "pack_codes",
    "packed_nbytes",
    "quantize_groupwise",
    "quantize_to_grid",
    "scatter_dense",
    "top_magnitude_positions",
    "unpack_codes",
]
