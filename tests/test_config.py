from __future__ import annotations

import json

import pytest
from peft import PeftConfig, PeftType

from peft_graft import DEFAULT_PRECISION_BANDS, GraftConfig, GraftConfigError


def test_defaults_follow_the_paper_preset():
    config = GraftConfig(target_modules=["q_proj", "v_proj"])
    assert config.peft_type is PeftType.GRAFT
    assert config.precision_bands == [(16, 8), (112, 4), (None, 2)] == list(DEFAULT_PRECISION_BANDS)
    assert config.group_size == 128 and config.r == 16 and config.init_weights is True
    assert config.target_modules == {"q_proj", "v_proj"}


def test_every_field_has_help_metadata():
    from dataclasses import fields

    own = [f for f in fields(GraftConfig) if f.name not in {f.name for f in fields(PeftConfig)}]
    assert own and all(f.metadata.get("help") for f in own)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": -1}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"precision_bands": []}, "non-empty list"),
        ({"precision_bands": [(16, 5), (None, 2)]}, r"bits must be one of \(2, 3, 4, 8, 16\)"),
        ({"precision_bands": [(None, 4), (16, 8)]}, "only the last precision band"),
        ({"precision_bands": [(0, 4), (None, 2)]}, "n_directions must be a positive integer"),
        ({"precision_bands": [(16,)]}, "must be a pair"),
        ({"precision_bands": [(8, 4)]}, "cover 8 directions but ranks go up to 16"),
        ({"precision_bands": [(32, 4)], "rank_pattern": {"down_proj": 40}}, "ranks go up to 40"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"embed_density": 0.0}, r"embed_density must be a number in \(0, 1\]"),
        ({"embed_density": 1.5}, r"embed_density must be a number in \(0, 1\]"),
        ({"mlp_energy": 0}, r"mlp_energy must be a number in \(0, 1\]"),
        ({"density_pattern": {"lm_head": 2.0}}, r"density_pattern\['lm_head'\] must be a number"),
        ({"module_roles": {"q_proj": "attention"}}, r"module_roles\['q_proj'\] must be one of"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"format_version": 99}, "upgrade peft-graft"),
    ],
)
def test_invalid_values_raise_at_construction(kwargs, message):
    with pytest.raises(GraftConfigError, match=message) as info:
        GraftConfig(**kwargs)
    assert isinstance(info.value, ValueError)


def test_config_json_round_trip_restores_band_tuples(tmp_path):
    config = GraftConfig(
        target_modules=["q_proj"], precision_bands=[(4, 16), (None, 3)], rank_pattern={"q_proj": 4}, group_size=64
    )
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "GRAFT" and on_disk["precision_bands"] == [[4, 16], [None, 3]]
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GraftConfig)
    assert loaded.precision_bands == [(4, 16), (None, 3)]
    assert loaded.rank_pattern == {"q_proj": 4} and loaded.group_size == 64


def test_rank_for_uses_rank_pattern_suffix_then_r():
    config = GraftConfig(r=8, rank_pattern={"layers.0.mlp.down_proj": 3, r"layers\.1\..*proj": 5})
    assert config.rank_for("model.layers.0.mlp.down_proj") == 3
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 5
    assert config.rank_for("model.layers.2.self_attn.q_proj") == 8
