"""The SVD operator and the budget planner on their own."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from peft_graft.compress import svd as svd_module
from peft_graft.compress.dense import rounding_errors
from peft_graft.compress.svd import factorize, spectrum
from peft_graft.errors import BudgetError
from peft_graft.extraction import budget as budget_module
from peft_graft.extraction.budget import ModuleCandidate, plan_budget
from peft_graft.pack.cost import dense_bytes, direction_bytes, lowrank_overhead_bytes


def _with_spectrum(out_features: int, in_features: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rank = spectrum.numel()
    u, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator))
    return (u * spectrum) @ v.T


def test_fixed_rank_uses_the_randomized_svd_on_large_matrices_and_matches_the_full_one():
    delta = _with_spectrum(1100, 1024, torch.exp(-torch.arange(64.0) / 6))
    randomized = factorize(delta, rank=16)
    full = factorize(delta[:600, :600], rank=16)  # below the size where randomized pays off
    assert randomized.method == "randomized" and full.method == "full"
    exact = torch.linalg.svdvals(delta)[:16]
    assert torch.allclose(randomized.s, exact, rtol=1e-4)
    assert randomized.energy == pytest.approx(float(exact.pow(2).sum() / delta.pow(2).sum()), rel=1e-5)


def test_an_unconverged_randomized_svd_falls_back_to_the_full_one(monkeypatch):
    monkeypatch.setattr(svd_module, "_CONVERGENCE", -1.0)  # no randomized run can pass
    assert factorize(_with_spectrum(1100, 1024, torch.ones(32)), rank=8).method == "full"


def test_a_partial_spectrum_matches_the_leading_part_of_the_exact_one(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    low_rank = _with_spectrum(700, 300, 1 / (1 + torch.arange(48.0) / 4))
    delta = low_rank + 2e-3 * torch.randn(700, 300, generator=generator)  # decaying, then a flat noise floor
    exact = spectrum(delta)
    assert spectrum(delta, top=32).complete  # below PARTIAL_MIN_SIDE the exact one costs the same: it is kept
    monkeypatch.setattr(svd_module, "PARTIAL_MIN_SIDE", 256)
    for matrix in (delta, delta.T):  # tall and wide: the vectors are always the short side's
        partial = spectrum(matrix, top=32)
        assert exact.complete and not partial.complete
        assert partial.values.numel() == 32 and partial.vectors.shape == (300, 32)
        # two power iterations: the leading values to 1e-3 (measured 1.2e-4); those near the end of the sketch, where
        # this spectrum decays slowly, to 3 % (measured 2 %)
        assert torch.allclose(partial.values[:16], exact.values[:16], rtol=1e-3)
        assert torch.allclose(partial.values, exact.values[:32], rtol=3e-2)
        alignment = (partial.vectors.T @ exact.vectors[:, :32]).diagonal().abs()
        assert alignment[:16].min() > 1 - 1e-3
    assert torch.equal(spectrum(delta, top=32).values, spectrum(delta, top=32).values)  # one fixed sketch
    assert spectrum(delta, top=150).complete  # a sketch over half the short side: exact instead
    # the long side from a partial spectrum: nearly the factorization from the exact one
    from_partial = factorize(delta, rank=20, known=spectrum(delta, top=32))
    from_exact = factorize(delta, rank=20, known=exact)
    assert from_partial.method == "full" and from_partial.rank == 20
    partial_product = (from_partial.u * from_partial.s) @ from_partial.v.T
    exact_product = (from_exact.u * from_exact.s) @ from_exact.v.T
    # (σ₂₀ and σ₂₁ are close on this slow decay, so the subspace cut differs a little; the energy kept hardly does)
    assert torch.linalg.norm(partial_product - exact_product) < 3e-2 * torch.linalg.norm(exact_product)
    assert from_partial.energy == pytest.approx(from_exact.energy, rel=1e-3)
    # a partial spectrum too short for the rank (or the energy) wanted is not used
    assert factorize(delta, rank=40, known=spectrum(delta, top=32)).rank == 40
    assert factorize(delta, energy=0.9999, known=spectrum(delta, top=8)).energy >= 0.9999


def test_planning_extends_partial_spectra_until_every_plan_ends_inside_its_own(tmp_path, monkeypatch):
    from peft_graft import extract_skillpack
    from peft_graft.extraction import plan as plan_module

    from fine_tunes import build, plant_delta
    from tiny_models import tiny_tokenizer

    shape = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1}
    build("llama", **shape).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    tuned = build("llama", **shape)
    plant_delta(tuned, rank=40, noise=1e-6)  # ranks well past the first sketch, on a spectrum that decays
    tuned.save_pretrained(tmp_path / "tuned")

    asked: list[int | None] = []

    def recording(delta, top=None, seed=0):
        asked.append(top)
        return spectrum(delta, top, seed)

    monkeypatch.setattr(plan_module, "spectrum", recording)
    monkeypatch.setattr(plan_module, "FIRST_DIRECTIONS", 8)
    monkeypatch.setattr(svd_module, "PARTIAL_MIN_SIDE", 64)  # partial spectra at these small shapes too
    extended = extract_skillpack(
        tmp_path / "base", tmp_path / "tuned", tmp_path / "extended", budget=1 / 12, progress=False
    )
    assert {8, 16}.issubset(asked)  # first sketches, then wider ones where plans reached their end
    monkeypatch.setattr(plan_module, "FIRST_DIRECTIONS", 10_000)  # every spectrum exact
    exact = extract_skillpack(tmp_path / "base", tmp_path / "tuned", tmp_path / "exact", budget=1 / 12, progress=False)
    plans = [
        {m.name: (m.form, m.rank, m.bands) for m in report.modules if m.form in ("lowrank", "dense")}
        for report in (extended, exact)
    ]
    assert plans[0] == plans[1]
    assert max(rank for _, rank, _ in plans[0].values() if rank) > 16  # the plan did go past two extensions
    # the embeddings' few changed rows bought nothing at this budget: pruning to no entries leaves them out
    assert not any(m.role == "embed" for m in extended.modules)


def test_energy_mode_keeps_the_smallest_rank_reaching_the_energy():
    spectrum = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5])  # cumulative energies 16, 20, 21, 22, 22.25
    delta = _with_spectrum(40, 30, spectrum)
    assert factorize(delta, energy=0.70).rank == 1  # 16 / 22.25 = 0.719
    assert factorize(delta, energy=0.89).rank == 2  # 20 / 22.25 = 0.899
    assert factorize(delta, energy=0.90).rank == 3
    assert factorize(delta, energy=0.95).rank == 4
    assert factorize(delta, energy=1.0).rank == 5
    assert factorize(torch.zeros(5, 4), energy=0.9).rank == 0


def test_factorize_needs_exactly_one_criterion():
    with pytest.raises(ValueError, match="exactly one"):
        factorize(torch.ones(3, 3))
    with pytest.raises(ValueError, match="exactly one"):
        factorize(torch.ones(3, 3), rank=1, energy=0.5)


def _lowrank(name: str, out_features: int, in_features: int, values: torch.Tensor, **forms) -> ModuleCandidate:
    energy = float(values.double().pow(2).sum())
    return ModuleCandidate(name, out_features, in_features, energy=energy, singular_values=values, **forms)


def _candidates() -> list[ModuleCandidate]:
    magnitudes = torch.linspace(1, 0.01, 20000).pow(2)
    return [
        _lowrank("model.layers.0.mlp.up_proj", 512, 256, torch.exp(-torch.arange(256.0) / 20)),
        _lowrank("model.layers.0.self_attn.q_proj", 256, 256, 0.5 * torch.exp(-torch.arange(256.0) / 5)),
        ModuleCandidate(
            "model.embed_tokens", 1000, 256, energy=float(magnitudes.double().sum()), squared_magnitudes=magnitudes
        ),
    ]


@pytest.mark.parametrize("budget", [20_000, 60_000, 200_000])
def test_the_plan_fits_the_budget_with_monotone_contiguous_bands(budget):
    plan = plan_budget(budget, 1_000, _candidates(), group_size=128)
    assert plan.planned_bytes <= budget
    for bits in plan.lowrank.values():
        assert all(a >= b for a, b in itertools.pairwise(bits))
    assert plan.planned_bytes > 0.8 * budget  # it spends what it can


def test_more_budget_buys_lower_modeled_error():
    candidates = _candidates()

    def modeled_error(plan) -> float:
        error = 0.0
        for candidate in candidates:
            if candidate.singular_values is not None:
                bits = plan.lowrank.get(candidate.name, [])
                sigma2 = candidate.singular_values.double().pow(2)
                kept = sum(float(sigma2[i]) * (1 - 2 * budget_module.QUANT_NOISE[b]) for i, b in enumerate(bits))
                error += float(sigma2.sum()) - kept
            else:
                error += float(candidate.squared_magnitudes[plan.sparse.get(candidate.name, 0) :].double().sum())
        return error

    errors = [modeled_error(plan_budget(b, 0, candidates, group_size=128)) for b in (20_000, 60_000, 200_000)]
    assert errors[0] > errors[1] > errors[2]


def test_a_module_whose_plan_outgrows_its_dense_delta_is_stored_dense():
    spectrum = torch.ones(16)  # a flat spectrum: every direction is worth the same
    small = _lowrank("tiny", 16, 16, spectrum, dense=True)
    budget = 10 * dense_bytes("tiny", 256)
    plan = plan_budget(budget, 0, [small], group_size=128)
    assert plan.dense == {"tiny"} and plan.lowrank == {}
    assert direction_bytes(16, 16, 8, 128) * 16 > dense_bytes("tiny", 256) / 2


def _planted(delta: torch.Tensor, name: str = "model.layers.0.mlp.up_proj") -> ModuleCandidate:
    """The candidate planning would build for `delta`: its spectrum, energy and measured rounding errors."""
    return ModuleCandidate(
        name,
        *delta.shape,
        energy=float(delta.double().pow(2).sum()),
        singular_values=spectrum(delta).values.float(),
        quantized_errors=rounding_errors(delta, (2, 3, 4, 8), 128),
        dense=True,
    )


def test_a_full_rank_delta_is_quantized_dense_and_a_low_rank_one_stays_low_rank():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(512, 512, generator=generator) * 1e-3  # a flat spectrum: no direction is worth much more
    low_rank = _with_spectrum(512, 512, torch.tensor([4.0, 3.0, 2.0, 1.0])) + 1e-6 * noise
    budget = dense_bytes("m", 512 * 512) // 4
    flat_plan = plan_budget(budget, 0, [_planted(noise, "m")], group_size=128)
    assert flat_plan.form("m") == "quantized" and flat_plan.quantized["m"] in (3, 4)
    # for equal bytes, the low-rank form would keep about a quarter of the energy; 4 bits keep 99 %
    low_plan = plan_budget(budget, 0, [_planted(low_rank, "m")], group_size=128)
    assert low_plan.form("m") == "lowrank" and 4 <= len(low_plan.lowrank["m"]) < 64
    # between the two, each module takes the form it compresses best in
    both = plan_budget(2 * budget, 0, [_planted(noise, "flat"), _planted(low_rank, "low")], group_size=128)
    assert both.form("flat") == "quantized" and both.form("low") == "lowrank"


def test_a_profile_without_dense_forms_keeps_the_module_low_rank():
    noise = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 1e-3
    candidate = dataclasses.replace(_planted(noise, "m"), quantized_errors={}, dense=False)
    plan = plan_budget(dense_bytes("m", 512 * 512) // 4, 0, [candidate], group_size=128)
    assert plan.form("m") == "lowrank" and not plan.quantized and not plan.dense


def test_a_budget_below_the_mandatory_bytes_is_refused():
    with pytest.raises(BudgetError, match="below what norms, biases and added rows need alone") as refused:
        plan_budget(100, 1_000, [], group_size=128)
    assert refused.value.needed_bytes == 1_000


def test_a_budget_that_buys_nothing_is_refused_with_the_least_that_keeps_a_module():
    candidate = _planted(torch.randn(256, 256), "m")
    with pytest.raises(BudgetError, match="buys no module's delta") as refused:
        plan_budget(50, 10, [candidate], group_size=128)
    needed = refused.value.needed_bytes
    assert needed > 50
    with pytest.raises(BudgetError):
        plan_budget(needed - 1, 10, [candidate], group_size=128)
    plan = plan_budget(needed, 10, [candidate], group_size=128)  # the figure the error gives is enough
    assert plan.form("m") is not None and plan.planned_bytes <= needed


def test_under_a_hessian_the_plan_keeps_the_directions_worth_most_to_the_output():
    values = torch.tensor([4.0, 3.0, 2.0, 1.0])
    weights = torch.tensor([0.01, 1.0, 0.01, 1.0])  # the inputs hardly ever point along v₀ and v₂
    energy = float((values.pow(2) * weights).sum())
    weighted = ModuleCandidate("m", 256, 256, energy=energy, singular_values=values, direction_weights=weights)
    budget = lowrank_overhead_bytes("m", 1) + 2 * direction_bytes(256, 256, 4, 128) + 100  # about two directions
    plan = plan_budget(budget, 0, [weighted], group_size=128)
    assert plan.directions["m"] == [1, 3]  # σ²·w = 9 and 1, against 0.16 and 0.04
    unweighted = dataclasses.replace(weighted, direction_weights=None, energy=float(values.pow(2).sum()))
    plain = plan_budget(budget, 0, [unweighted], group_size=128)
    assert len(plain.lowrank["m"]) == 2 and not plain.directions  # the leading two, by singular value
