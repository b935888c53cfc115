"""The SVD operator and the budget planner on their own."""

from __future__ import annotations

import itertools

import pytest
import torch

from peft_graft.compress import svd as svd_module
from peft_graft.compress.svd import factorize
from peft_graft.extraction import budget as budget_module
from peft_graft.extraction.budget import LowRankCandidate, SparseCandidate, plan_budget
from peft_graft.pack.cost import dense_bytes, direction_bytes


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


def _candidates() -> tuple[list[LowRankCandidate], list[SparseCandidate]]:
    lowrank = [
        LowRankCandidate("model.layers.0.mlp.up_proj", 512, 256, torch.exp(-torch.arange(256.0) / 20)),
        LowRankCandidate("model.layers.0.self_attn.q_proj", 256, 256, 0.5 * torch.exp(-torch.arange(256.0) / 5)),
    ]
    sparse = [SparseCandidate("model.embed_tokens", 1000 * 256, torch.linspace(1, 0.01, 20000).pow(2))]
    return lowrank, sparse


@pytest.mark.parametrize("budget", [20_000, 60_000, 200_000])
def test_the_plan_fits_the_budget_with_monotone_contiguous_bands(budget):
    lowrank, sparse = _candidates()
    plan = plan_budget(budget, 1_000, lowrank, sparse, group_size=128)
    assert plan.planned_bytes <= budget
    for bits in plan.lowrank.values():
        assert all(a >= b for a, b in itertools.pairwise(bits))
    assert plan.planned_bytes > 0.8 * budget  # it spends what it can


def test_more_budget_buys_lower_modeled_error():
    lowrank, sparse = _candidates()

    def modeled_error(plan) -> float:
        error = 0.0
        for candidate in lowrank:
            bits = plan.lowrank[candidate.name]
            sigma2 = candidate.singular_values.double().pow(2)
            kept = sum(float(sigma2[i]) * (1 - 2 * budget_module.QUANT_NOISE[b]) for i, b in enumerate(bits))
            error += float(sigma2.sum()) - kept
        for candidate in sparse:
            error += float(candidate.squared_magnitudes[plan.sparse[candidate.name] :].double().sum())
        return error

    errors = [modeled_error(plan_budget(b, 0, lowrank, sparse, group_size=128)) for b in (20_000, 60_000, 200_000)]
    assert errors[0] > errors[1] > errors[2]


def test_a_module_whose_plan_outgrows_its_dense_delta_is_stored_dense():
    spectrum = torch.ones(16)  # a flat spectrum: every direction is worth the same
    small = LowRankCandidate("tiny", 16, 16, spectrum)
    budget = 10 * dense_bytes("tiny", 256)
    plan = plan_budget(budget, 0, [small], [], group_size=128)
    assert plan.dense == {"tiny"} and plan.lowrank == {}
    assert direction_bytes(16, 16, 8, 128) * 16 > dense_bytes("tiny", 256) / 2


def test_a_budget_below_the_mandatory_bytes_is_refused():
    with pytest.raises(ValueError, match="raise the budget"):
        plan_budget(100, 1_000, [], [], group_size=128)
