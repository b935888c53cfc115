"""Synthetic (base, fine-tune) checkpoint pairs with real Llama shapes, written tensor by tensor.

No model is ever built: each tensor is generated from its own seed, written into ~1 GiB safetensors shards, and
dropped, so an 8B-shaped pair (16 GB per checkpoint in bf16) is written in about one shard's memory.

The fine-tune's delta is made to look like a real one rather than white noise, so that extraction chooses realistic
ranks: every projection gets a low-rank delta with a decaying spectrum (σᵢ ∝ 1/(1 + i/4), rank 64) at 2 % of the
weight's norm, plus dense noise at a third of that; the embedding gets a dominant rank-1 direction across all rows
(what the softmax does to untrained tokens) plus larger changes on 2 % of the rows (the trained tokens), sized so that
it holds about a fifth of the delta's energy, as in a real fine-tune (SmolLM2-135M on arithmetic: 21 %); norms move
by 1e-3. Storing the fine-tune in bf16 then adds its own rounding noise, as it does for real fine-tunes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 1 << 30
DELTA_RANK = 64


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def config(self, layers: int | None = None) -> dict:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=layers or self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            tie_word_embeddings=self.tied,
            max_position_embeddings=4096,
            dtype="bfloat16",
            architectures=["LlamaForCausalLM"],
        ).to_dict()

    def tensors(self, layers: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of a Llama checkpoint of this shape, in file order."""
        head_dim = self.hidden // self.heads
        kv = self.kv_heads * head_dim
        names = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(layers or self.layers):
            prefix = f"model.layers.{i}"
            names += [
                (f"{prefix}.input_layernorm.weight", (self.hidden,)),
                (f"{prefix}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, self.hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.post_attention_layernorm.weight", (self.hidden,)),
                (f"{prefix}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        names.append(("model.norm.weight", (self.hidden,)))
        if not self.tied:
            names.append(("lm_head.weight", (self.vocab, self.hidden)))
        return names

    def parameters(self, layers: int | None = None) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors(layers))


SHAPES = {
    # SmolLM2-135M's shape, two wider/deeper small Llamas, and Llama-3.1-8B
    "135M": Shape(576, 1536, 30, 9, 3, 49152, True),
    "360M": Shape(960, 2560, 32, 15, 5, 49152, True),
    "1.5B": Shape(2048, 5632, 24, 16, 8, 49152, True),
    "8B": Shape(4096, 14336, 32, 32, 8, 128256, False),
}


def _generator(name: str, salt: str) -> torch.Generator:
    seed = int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


def _base(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    out = torch.empty(shape, dtype=torch.bfloat16)
    generator = _generator(name, "base")
    for start in range(0, shape[0], 4096):  # row blocks: never the whole fp32 matrix
        stop = min(start + 4096, shape[0])
        out[start:stop] = (torch.randn(stop - start, shape[1], generator=generator) * 0.02).to(torch.bfloat16)
    return out


def _add_delta(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The fine-tuned tensor: `weight` (bf16) plus a realistic delta, rounded to bf16 again."""
    generator = _generator(name, "delta")
    if weight.dim() == 1:
        return (weight.float() + 1e-3 * torch.randn(weight.shape, generator=generator)).to(torch.bfloat16)
    rows, cols = weight.shape
    out = torch.empty_like(weight)
    if "embed_tokens" in name or "lm_head" in name:
        direction = torch.randn(cols, generator=generator)
        direction *= 0.0005 / direction.norm() * math.sqrt(cols)
        per_row = 1 + 0.1 * torch.randn(rows, generator=generator)
        trained = torch.rand(rows, generator=generator) < 0.02
        for start in range(0, rows, 4096):
            stop = min(start + 4096, rows)
            block = weight[start:stop].float() + per_row[start:stop, None] * direction
            changed = trained[start:stop]
            block[changed] += 0.003 * torch.randn(int(changed.sum()), cols, generator=generator)
            out[start:stop] = block.to(torch.bfloat16)
        return out
    rank = min(DELTA_RANK, rows, cols)
    spectrum = 1.0 / (1.0 + torch.arange(rank) / 4.0)
    left = torch.linalg.qr(torch.randn(rows, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, rank, generator=generator)).Q
    weight_norm = 0.02 * math.sqrt(rows * cols)  # the base's entries have std 0.02
    scale = 0.02 * weight_norm / float(spectrum.norm())
    noise = 0.02 * weight_norm / 3 / math.sqrt(rows * cols)
    for start in range(0, rows, 4096):
        stop = min(start + 4096, rows)
        block = weight[start:stop].float() + (left[start:stop] * (scale * spectrum)) @ right.T
        block += noise * torch.randn(stop - start, cols, generator=generator)
        out[start:stop] = block.to(torch.bfloat16)
    return out


def write_pair(folder: Path, shape: Shape, layers: int | None = None) -> tuple[Path, Path]:
    """Write `folder/base` and `folder/finetuned` (sharded bf16 safetensors, config.json); skip what exists."""
    folders = (folder / "base", folder / "finetuned")
    for target, finetuned in zip(folders, (False, True), strict=True):
        if not (target / "model.safetensors.index.json").is_file():
            _write_checkpoint(target, shape, layers, finetuned)
    return folders


def _write_checkpoint(target: Path, shape: Shape, layers: int | None, finetuned: bool) -> None:
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(shape.config(layers), indent=2) + "\n")
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    for name, tensor_shape in shape.tensors(layers):
        tensor = _base(name, tensor_shape)
        if finetuned:
            tensor = _add_delta(name, tensor)
        if shard and shard_bytes + tensor.numel() * 2 > SHARD_BYTES:
            _write_shard(target, shard, weight_map)
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
    _write_shard(target, shard, weight_map)
    index = {"metadata": {"total_size": 2 * shape.parameters(layers)}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(target: Path, shard: dict[str, torch.Tensor], weight_map: dict[str, str]) -> None:
    file = f"model-{len(set(weight_map.values())):05d}.safetensors"
    save_file(shard, target / file, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, file))
