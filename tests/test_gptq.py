"""The GPTQ core: exact codes, better than round-to-nearest, and at least as good as gptqmodel's GPTQ."""

from __future__ import annotations

import logging

import pytest
import torch

from peft_graft.compress import GroupQuantized, dequantize_groupwise, quantize_groupwise
from peft_graft.compress.gptq import gptq_quantize, output_error


def _problem(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight and correlated inputs (as real activations are), with H = XᵀX."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    mixing = torch.randn(cols, cols, generator=generator) * 0.2 + torch.eye(cols)
    inputs = torch.randn(2048, cols, generator=generator) @ mixing
    return weight, inputs, inputs.T @ inputs


@pytest.mark.parametrize("act_order", [False, True])
def test_row_grid_codes_decode_exactly_to_the_returned_weight(act_order):
    weight, _, hessian = _problem(10, 70)
    bits = [8, 8, 4, 4, 4, 3, 3, 2, 2, 2]
    result = gptq_quantize(weight, hessian, bits, group_size=32, act_order=act_order)
    for row, row_bits in enumerate(bits):
        stored = GroupQuantized(
            result.codes[row : row + 1], result.scales[row : row + 1], result.zeros[row : row + 1], row_bits, 32
        )
        assert torch.equal(dequantize_groupwise(stored)[0], result.dequantized[row])
        assert int(result.codes[row].max()) < 2**row_bits


def test_column_grid_codes_decode_exactly_per_column():
    weight, _, hessian = _problem(50, 12)
    bits = [8] * 4 + [4] * 4 + [2] * 4
    result = gptq_quantize(weight, hessian, bits, group_size=16, grid="column")
    assert result.scales.shape == (4, 12)  # ceil(50 / 16) row groups per column
    for column, column_bits in enumerate(bits):
        stored = GroupQuantized(
            result.codes[:, column].unsqueeze(0),
            result.scales[:, column].unsqueeze(0),
            result.zeros[:, column].unsqueeze(0),
            column_bits,
            16,
        )
        assert torch.equal(dequantize_groupwise(stored)[0], result.dequantized[:, column])


@pytest.mark.parametrize(("bits", "grid", "act_order"), [(4, "row", False), (3, "row", True), (2, "column", False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits, grid, act_order):
    weight, _, hessian = _problem(64, 96)
    result = gptq_quantize(weight, hessian, bits, group_size=32, grid=grid, act_order=act_order)
    rtn = weight if grid == "row" else weight.T
    rtn = dequantize_groupwise(quantize_groupwise(rtn, bits, 32))
    rtn = rtn if grid == "row" else rtn.T
    assert output_error(weight, result.dequantized, hessian) < 0.85 * output_error(weight, rtn, hessian)


def test_dead_inputs_and_bad_arguments():
    weight, _, hessian = _problem(8, 16)
    hessian[3, :] = hessian[:, 3] = 0.0
    result = gptq_quantize(weight, hessian, 4, group_size=8)
    assert torch.isfinite(result.dequantized).all() and not result.dequantized[:, 3].any()
    with pytest.raises(ValueError, match="one entry per row"):
        gptq_quantize(weight, hessian, [4, 4], group_size=8)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(weight, hessian[:4, :4], 4, group_size=8)


def test_output_error_matches_the_definition():
    weight, inputs, hessian = _problem(6, 20)
    approximation = weight + 0.01 * torch.randn_like(weight)
    direct = ((weight - approximation) @ inputs.T).norm() / (weight @ inputs.T).norm()
    assert output_error(weight, approximation, hessian) == pytest.approx(float(direct), rel=1e-4)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 64), (3, 128), (2, 32), (8, 128)])
def test_at_least_as_good_as_gptqmodel(bits, group_size):
    gptqmodel = pytest.importorskip("gptqmodel", reason="cross-check needs the optional extra: pip install -e .[gptq]")
    from gptqmodel.quantization import GPTQ, QuantizeConfig

    logging.getLogger("gptqmodel").setLevel(logging.ERROR)
    weight, inputs, hessian = _problem(96, 256, seed=bits)

    def theirs(**options) -> float:
        linear = torch.nn.Linear(256, 96, bias=False)
        linear.weight.data = weight.clone()
        config = QuantizeConfig(bits=bits, group_size=group_size, sym=False, offload_to_disk=False, **options)
        quantizer = GPTQ(linear, qcfg=config)
        quantizer.quantizer.configure(bits=bits, sym=False, perchannel=True)
        quantizer.add_batch(inputs.unsqueeze(0), None)
        quantizer.fasterquant(percdamp=0.01, group_size=group_size, actorder=False)
        return output_error(weight, linear.weight.data.float(), hessian)

    ours_default = output_error(
        weight, gptq_quantize(weight, hessian, bits, group_size, act_order=True).dequantized, hessian
    )
    assert ours_default <= theirs(desc_act=False), gptqmodel.__version__  # their default: group-aware act-order
    ours_plain = output_error(weight, gptq_quantize(weight, hessian, bits, group_size).dequantized, hessian)
    assert ours_plain <= 1.01 * theirs(desc_act=False, act_group_aware=False)  # the same algorithm, fp16 scales


def test_wide_hessians_are_inverted_in_float32_to_the_same_quality(monkeypatch):
    """Past FLOAT64_INVERSION_COLUMNS (8192: an 8B model's down_proj is 14336 wide) the inversion runs in float32 to
    halve its memory; here the threshold is lowered so that a small problem takes that path."""
    from peft_graft.compress import gptq

    weight, _, hessian = _problem(64, 96)
    reference = gptq_quantize(weight, hessian, 3, group_size=32, act_order=True)
    monkeypatch.setattr(gptq, "FLOAT64_INVERSION_COLUMNS", 64)
    wide = gptq_quantize(weight, hessian, 3, group_size=32, act_order=True)
    assert (wide.codes == reference.codes).float().mean() > 0.99
    error = output_error(weight, wide.dequantized, hessian)
    assert error <= 1.01 * output_error(weight, reference.dequantized, hessian)
