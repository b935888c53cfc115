"""Synthetic (base, fine-tune) checkpoint pairs with a known delta, saved to disk like real checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from tiny_models import tiny_gpt2, tiny_llama, tiny_qwen2, tiny_tokenizer

# Wider than the lifecycle tests' models so that factor bytes, not headers, dominate a pack.
WIDE = {
    "llama": (tiny_llama, {"hidden_size": 128, "intermediate_size": 256}),
    "qwen2": (tiny_qwen2, {"hidden_size": 128, "intermediate_size": 256}),
    "gpt2": (tiny_gpt2, {"n_embd": 128}),
}
EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe")


def build(arch: str, seed: int = 0, **overrides):
    builder, shape = WIDE[arch]
    return builder(seed=seed, **{**shape, **overrides})


def plant_delta(model, seed: int = 5, rank: int = 4, noise: float = 5e-4) -> None:
    """A fine-tune's delta: rank-`rank` projections plus small noise, a few changed embedding rows, nudged norms
    and biases."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            shape = parameter.shape
            if any(part in name for part in EMBEDDING_NAMES):
                rows = torch.randperm(shape[0], generator=generator)[:8]
                parameter[rows] += 0.05 * torch.randn(8, shape[1], generator=generator)
            elif parameter.dim() == 2:
                planted = torch.randn(shape[0], rank, generator=generator) @ torch.randn(
                    rank, shape[1], generator=generator
                )
                parameter += 0.02 * planted + noise * torch.randn(shape, generator=generator)
            else:
                parameter += 1e-3 * torch.randn(shape, generator=generator)


def save_pair(
    folder: Path, arch: str, dtype: torch.dtype = torch.float32, model_overrides: dict | None = None, **save_kwargs
) -> tuple[Path, Path]:
    """Save a base (with a tokenizer) and its planted fine-tune under `folder`; return both folders."""
    base_dir, tuned_dir = folder / "base", folder / "finetuned"
    build(arch, **(model_overrides or {})).to(dtype).save_pretrained(base_dir, **save_kwargs)
    tiny_tokenizer().save_pretrained(base_dir)
    tuned = build(arch, **(model_overrides or {}))
    plant_delta(tuned)
    tuned.to(dtype).save_pretrained(tuned_dir, **save_kwargs)
    return base_dir, tuned_dir
