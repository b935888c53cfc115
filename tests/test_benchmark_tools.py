"""The benchmarks' third-party tools work at the installed versions (the `bench` extra; `make test-lowest` runs this
at its floors): the real mergekit-extract-lora, the quality benchmark's low-rank baseline, recovers a planted
low-rank delta, and matplotlib draws the benchmark's plot headless."""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fine_tunes import save_pair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # benchmarks/quality.py: mergekit and matplotlib are imported only when used

pytestmark = [
    pytest.mark.skipif(
        find_spec("mergekit") is None or find_spec("matplotlib") is None,
        reason="needs the bench extra: make test EXTRAS=test,bench",
    ),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning"),
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(folder / "model.safetensors").items()}


def test_mergekit_baseline_recovers_a_planted_low_rank_delta(tmp_path):
    base_dir, tuned_dir = save_pair(tmp_path, "llama")
    base, tuned = _weights(base_dir), _weights(tuned_dir)
    delta = {name: tuned[name] - base[name] for name in base}
    per_rank = sum(2 * (d.shape[0] + d.shape[1]) for d in delta.values() if d.dim() >= 2)
    whole = sum(2 * d.numel() for d in delta.values() if d.dim() < 2)

    approx, stored = quality._mergekit_lowrank(base_dir, tuned_dir, delta, whole + 8 * per_rank, tmp_path)

    assert 0 < stored < 2 * sum(d.numel() for d in delta.values())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        # rank 8 holds the planted rank-4 part; what is left is the noise and the fp16 cast
        error = (approx[name] - delta[name]).norm() / delta[name].norm()
        assert error < 0.1, (name, float(error))
    untouched = base["model.layers.0.self_attn.q_proj.weight"]
    assert approx["model.layers.0.self_attn.q_proj.weight"].shape == untouched.shape


def test_quality_plot_renders_headless(tmp_path):
    rows = [
        {"method": method, "ratio": ratio, "retention": retention, "kl": kl}
        for method, points in {
            "graft": [(1 / 16, 1.01, 0.012), (1 / 32, 0.99, 0.016)],
            "BitDelta": [(1 / 16, 0.94, 0.15)],
        }.items()
        for ratio, retention, kl in points
    ]
    path = quality._plot(rows, {}, "-test", folder=tmp_path)
    assert path.parent == tmp_path
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_one_skill_runs_merge_into_the_full_results_with_their_own_targets(tmp_path, monkeypatch):
    import json

    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    for skill, prompts, kl in (("arithmetic", 500, 1e-3), ("letters", 300, 2e-3)):
        rows = [
            {
                "skill": skill,
                "method": method,
                "budget": "1/16",
                "ratio": 0.0625,
                "kl": kl * factor,
                "kl_se": kl / 10,
                "accuracy": 0.4,
                "retention": 1.0,
                "retention_se": 0.05,
                "relative_error": 0.1,
            }
            for method, factor in (("graft", 1.0), ("graft data-free", 2.0), ("lowrank (mergekit)", 10.0))
        ]
        summary = {"recipe": {"task": skill, "options": {}, "steps": 200}, "base": 0.01, "finetuned_accuracy": 0.41}
        summary |= {"held_out": prompts, "answered": 200}
        record = {"machine": {"date": f"2026-12-0{prompts // 100}"}, "skills": {skill: summary}, "rows": rows}
        (tmp_path / f"quality-{skill}.json").write_text(json.dumps(record | {"seconds": 10.0}))

    quality._merge(["arithmetic", "letters"])

    merged = json.loads((tmp_path / "quality.json").read_text())
    assert list(merged["skills"]) == ["arithmetic", "letters"] and len(merged["rows"]) == 6
    assert [(t["skill"], t["kl_ratio"], t["calibrated_vs_data_free"]) for t in merged["targets"]] == [
        ("arithmetic", pytest.approx(0.1), pytest.approx(0.5)),
        ("letters", pytest.approx(0.1), pytest.approx(0.5)),
    ]
    table = (tmp_path / "quality.md").read_text()
    assert "KL on 300 held-out questions, accuracy on 200 of them (measured 2026-12-03)" in table
    assert (tmp_path / "retention_vs_bytes.png").read_bytes()[:4] == b"\x89PNG"
