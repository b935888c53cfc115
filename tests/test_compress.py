"""Property tests of the pure tensor math in peft_graft.compress and the SkillPack tensor layout."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peft_graft.compress import (
    LargestEntries,
    band_slices,
    canonical_factors,
    dequantize_groupwise,
    magnitude_prune,
    pack_codes,
    packed_nbytes,
    quantize_groupwise,
    unpack_codes,
)
from peft_graft.errors import PackFormatError
from peft_graft.pack.codec import decode_lowrank, decode_values, encode_lowrank, encode_sparse, tensors_nbytes

settings.register_profile("peft-graft", max_examples=60, deadline=None)
settings.load_profile("peft-graft")


def _tensor(seed: int, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@given(bits=st.integers(1, 8), numel=st.integers(0, 300), seed=st.integers(0, 2**16))
def test_packing_is_lossless_and_dense(bits, numel, seed):
    codes = torch.randint(0, 1 << bits, (numel,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(numel, bits) == math.ceil(numel * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, numel).long(), codes)


def test_packing_rejects_out_of_range_codes_and_wrong_sizes():
    with pytest.raises(ValueError, match="codes must lie in"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="cannot hold exactly"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 7)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_codes(torch.tensor([0]), 9)


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 300),
    group_size=st.sampled_from([1, 3, 32, 128, 1000]),
    scale=st.sampled_from([1e-4, 1.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_groupwise_quantization_error_is_within_half_a_step(bits, rows, cols, group_size, scale, seed):
    matrix = _tensor(seed, rows, cols, scale=scale)
    quantized = quantize_groupwise(matrix, bits, group_size)
    groups = math.ceil(cols / group_size)
    assert quantized.codes.shape == (rows, cols) and quantized.codes.dtype == torch.uint8
    assert quantized.scales.shape == (rows, groups) and quantized.scales.dtype == torch.float16
    assert int(quantized.codes.max()) < (1 << bits) and int(quantized.zeros.max()) < (1 << bits)
    step = quantized.scales.float().repeat_interleave(group_size, dim=1)[:, :cols]
    error = (dequantize_groupwise(quantized) - matrix).abs()
    assert bool((error <= step / 2 * (1 + 1e-5) + 1e-12).all())


def test_quantization_keeps_zero_rows_exact_and_rejects_non_finite():
    matrix = torch.zeros(2, 10)
    matrix[1] = torch.linspace(-1, 1, 10)
    restored = dequantize_groupwise(quantize_groupwise(matrix, 2, 4))
    assert torch.equal(restored[0], torch.zeros(10))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_groupwise(torch.tensor([[1.0, float("nan")]]), 4, 2)
    with pytest.raises(ValueError, match="too wide for fp16"):
        quantize_groupwise(torch.tensor([[-1e9, 1e9]]), 2, 2)


@given(
    out_features=st.integers(1, 40),
    in_features=st.integers(1, 40),
    rank_fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_canonical_factors_are_an_exact_svd(out_features, in_features, rank_fraction, seed):
    rank = max(1, int(rank_fraction * min(out_features, in_features)))
    u, s, v = _tensor(seed, out_features, rank), _tensor(seed + 1, rank), _tensor(seed + 2, in_features, rank)
    cu, cs, cv = canonical_factors(u, s, v)
    product = (u * s) @ v.T
    assert torch.allclose((cu * cs) @ cv.T, product, atol=1e-5 * (1 + product.abs().max()))
    assert bool((cs[:-1] >= cs[1:]).all()) and bool((cs >= 0).all())
    eye = torch.eye(rank)
    assert torch.allclose(cu.T @ cu, eye, atol=1e-4) and torch.allclose(cv.T @ cv, eye, atol=1e-4)


def test_band_slices_cover_the_rank_in_order():
    assert band_slices(200, [(16, 8), (112, 4), (None, 2)]) == [(0, 16, 8), (16, 128, 4), (128, 200, 2)]
    assert band_slices(10, [(16, 8), (112, 4), (None, 2)]) == [(0, 10, 8)]
    assert band_slices(20, [(4, 16), (None, 3)]) == [(0, 4, 16), (4, 20, 3)]
    with pytest.raises(ValueError, match="cover 8 directions but the rank is 9"):
        band_slices(9, [(8, 4)])


@given(rows=st.integers(1, 20), cols=st.integers(1, 20), density=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_magnitude_prune_keeps_the_largest_entries(rows, cols, density, seed):
    dense = _tensor(seed, rows, cols)
    indices, values = magnitude_prune(dense, density)
    keep = math.ceil(density * (rows * cols))
    assert indices.numel() == keep
    assert bool((indices[1:] > indices[:-1]).all())
    assert torch.equal(values, dense.reshape(-1)[indices])
    dropped = torch.ones(rows * cols, dtype=torch.bool)
    dropped[indices] = False
    if bool(dropped.any()):
        assert float(dense.reshape(-1)[dropped].abs().max()) <= float(values.abs().min())


@given(
    size=st.integers(1, 300),
    keep=st.integers(0, 320),
    block=st.integers(1, 64),
    levels=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_largest_entries_over_blocks_equal_one_selection_over_everything(size, keep, block, levels, seed):
    """Streaming with cuts gives exactly the entries a single pass would keep: the largest non-zero magnitudes, and
    of those tied at the cut the first ones (few distinct levels make many ties; zeros are never kept)."""
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randint(-levels, levels + 1, (size,), generator=generator).float()
    largest = LargestEntries(keep)
    for start in range(0, size, block):
        largest.add(flat[start : start + block], start)
    positions, values = largest.result()
    magnitude = flat.abs()
    # by hand: stable order of decreasing magnitude, then non-zero, then the first `keep`
    order = sorted(range(size), key=lambda i: (-float(magnitude[i]), i))
    expected = sorted(i for i in order[:keep] if magnitude[i] > 0)
    assert positions.tolist() == expected
    assert torch.equal(values, flat[positions])
    assert LargestEntries(keep, positions=False).result()[0] is None


def test_magnitude_prune_never_keeps_zeros():
    indices, values = magnitude_prune(torch.zeros(4, 4), 0.5)
    assert indices.numel() == 0 and values.numel() == 0


@given(
    out_features=st.integers(2, 48),
    in_features=st.integers(2, 48),
    rank=st.integers(1, 12),
    bits=st.sampled_from([2, 3, 4, 8, 16]),
    group_size=st.sampled_from([8, 128]),
    seed=st.integers(0, 2**16),
)
def test_lowrank_encoding_round_trips_within_the_quantization_bound(
    out_features, in_features, rank, bits, group_size, seed
):
    rank = min(rank, out_features, in_features)
    u, s, v = _tensor(seed, out_features, rank), _tensor(seed + 1, rank).abs(), _tensor(seed + 2, in_features, rank)
    tensors = encode_lowrank(u, s, v, [(None, bits)], group_size)
    du, ds, dv = decode_lowrank(tensors)
    assert du.shape == u.shape and dv.shape == v.shape and ds.shape == s.shape
    # Stored singular vectors have unit RMS; each entry is off by at most half a quantization step.
    cu, cs, cv = canonical_factors(u, s, v)
    su, sv = cu * math.sqrt(out_features), cv * math.sqrt(in_features)
    if bits == 16:
        bound_u, bound_v = su.abs().max() * 2**-11, sv.abs().max() * 2**-11
    else:
        steps = (1 << bits) - 1
        # the grid always contains 0, so a step is at most (max(high, 0) - min(low, 0)) / steps
        bound_u = (su.amax().clamp(min=0) - su.amin().clamp(max=0)) / steps / 2
        bound_v = (sv.amax().clamp(min=0) - sv.amin().clamp(max=0)) / steps / 2
    assert float((du - su).abs().max()) <= float(bound_u) * 1.05 + 1e-6
    assert float((dv - sv).abs().max()) <= float(bound_v) * 1.05 + 1e-6
    assert torch.allclose(ds, cs / math.sqrt(out_features * in_features), rtol=1e-5)


def test_lowrank_bands_store_real_packed_integers_and_4_bit_is_under_0_3x_fp16():
    out_features, in_features, rank = 256, 192, 32
    u, s, v = _tensor(0, out_features, rank), _tensor(1, rank).abs(), _tensor(2, in_features, rank)
    fp16_bytes = 2 * (u.numel() + s.numel() + v.numel())
    four_bit = encode_lowrank(u, s, v, [(None, 4)], 128)
    codes = [t for name, t in four_bit.items() if name.endswith("_codes")]
    assert codes and all(t.dtype == torch.uint8 for t in codes)
    assert tensors_nbytes(four_bit) <= 0.3 * fp16_bytes
    mixed = encode_lowrank(u, s, v, [(8, 8), (8, 4), (None, 2)], 128)
    assert {int(t[2]) for name, t in mixed.items() if name.endswith("_qmeta")} == {8, 4, 2}
    assert tensors_nbytes(mixed) < tensors_nbytes(encode_lowrank(u, s, v, [(None, 8)], 128))


def test_more_bits_reconstruct_the_delta_better():
    u, s, v = _tensor(0, 96, 16), torch.linspace(2, 0.1, 16), _tensor(2, 80, 16)
    delta = (u * s) @ v.T
    errors = []
    for bits in (2, 3, 4, 8, 16):
        du, ds, dv = decode_lowrank(encode_lowrank(u, s, v, [(None, bits)], 32))
        errors.append(float(((du * ds) @ dv.T - delta).norm() / delta.norm()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-3 and errors[3] < 2e-2


@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_sparse_encoding_round_trips_and_picks_the_smaller_storage(density):
    dense = _tensor(0, 40, 30)
    tensors = encode_sparse(dense, None, (40, 30), density)
    values, indices, _ = decode_values(tensors, (40, 30))
    if density > 1 / 3:  # int32 index + fp16 value beats 2-byte dense only below 1/3
        assert indices is None and "graft_indices" not in tensors
        kept_positions = magnitude_prune(dense, density)[0]
        restored = values.reshape(-1)[kept_positions]
    else:
        assert tensors["graft_indices"].dtype == torch.int32 and tensors["graft_values"].dtype == torch.float16
        kept_positions = indices
        restored = values
    assert kept_positions.numel() == math.ceil(density * dense.numel())
    expected = dense.reshape(-1)[kept_positions]
    assert torch.allclose(restored, expected, rtol=2**-10, atol=1e-7)


def test_decoding_rejects_corrupt_tensors_with_pack_format_errors():
    u, s, v = _tensor(0, 16, 4), _tensor(1, 4).abs(), _tensor(2, 12, 4)
    good = encode_lowrank(u, s, v, [(None, 4)], 8)
    truncated = dict(good, **{"graft_U.b0_codes": good["graft_U.b0_codes"][:-1]})
    with pytest.raises(PackFormatError, match="cannot hold exactly"):
        decode_lowrank(truncated)
    nan_scales = dict(good, **{"graft_V.b0_scales": torch.full_like(good["graft_V.b0_scales"], float("nan"))})
    with pytest.raises(PackFormatError, match="NaN or Inf"):
        decode_lowrank(nan_scales)
    missing = {k: t for k, t in good.items() if not k.startswith("graft_V.b0_zeros")}
    with pytest.raises(PackFormatError, match="expected fp16, or codes/scales/zeros/qmeta"):
        decode_lowrank(missing)
    with pytest.raises(PackFormatError, match="unexpected tensor"):
        decode_lowrank(dict(good, extra=torch.zeros(1)))
    sparse = encode_sparse(_tensor(3, 10, 10), None, (10, 10), 0.1)
    shuffled = dict(sparse, graft_indices=sparse["graft_indices"].flip(0))
    with pytest.raises(PackFormatError, match="strictly increasing"):
        decode_values(shuffled, (10, 10))
    with pytest.raises(PackFormatError, match=r"lie in \[0, 50\)"):
        decode_values(sparse, (5, 10))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_trip_is_quantize_then_dequantize(bits):
    from peft_graft.compress.quantize import round_trip

    matrix = torch.randn(37, 300, generator=torch.Generator().manual_seed(bits)) * 1e-2
    expected = dequantize_groupwise(quantize_groupwise(matrix, bits, 128))
    assert torch.equal(round_trip(matrix, bits, 128), expected)
