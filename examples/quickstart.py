"""Quickstart: a GRAFT adapter saved as a packed SkillPack and loaded back with plain PEFT calls.

    python examples/quickstart.py                                  # a tiny random Llama, fully offline
    python examples/quickstart.py --model path/or/hub-id --targets q_proj v_proj

It attaches a random (non-zero) delta so that there is something to compress, saves it with the default
8/4/2-bit bands, reloads it into a fresh base, and reports the pack size and how far the reloaded logits are from
the in-memory ones. Then it runs one mixed batch with a second pack.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import peft_graft  # registers PeftType.GRAFT with PEFT
from peft_graft import BASE_ADAPTER, GraftConfig


def load_base(model: str | None) -> torch.nn.Module:
    if model is not None:
        return AutoModelForCausalLM.from_pretrained(model).eval()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def save_random_pack(
    base: torch.nn.Module, folder: Path, seed: int, targets: list[str], rank: int, ids
) -> torch.Tensor:
    """Attach a random GRAFT delta, save it packed, detach it again; return the in-memory logits."""
    torch.manual_seed(seed)
    model = get_peft_model(base, GraftConfig(target_modules=targets, r=rank, init_weights=False)).eval()
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(folder)
    model.unload()
    return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local folder or Hub id of a causal LM (default: a tiny random Llama)")
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--rank", type=int, default=32)
    args = parser.parse_args()

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    workdir = Path(tempfile.mkdtemp(prefix="graft-quickstart-"))

    base = load_base(args.model)
    with torch.no_grad():
        base_logits = base(ids).logits
    reference = save_random_pack(base, workdir / "skill-a", 1, args.targets, args.rank, ids)
    save_random_pack(base, workdir / "skill-b", 2, args.targets, args.rank, ids)

    pack = PeftModel.from_pretrained(load_base(args.model), workdir / "skill-a", adapter_name="skill-a")
    pack.load_adapter(workdir / "skill-b", adapter_name="skill-b")
    pack.set_adapter("skill-a")
    with torch.no_grad():
        reloaded = pack(ids).logits
        mixed = pack(ids, adapter_names=["skill-a", "skill-b", BASE_ADAPTER, "skill-a"]).logits

    pack_bytes = (workdir / "skill-a" / "adapter_model.safetensors").stat().st_size
    fp16_bytes = sum(
        2 * layer.rank("skill-a") * (layer.in_features + layer.out_features + 1)
        for layer in pack.modules()
        if isinstance(layer, peft_graft.GraftLinear) and "skill-a" in layer.graft_S
    )
    effect = float((reference - base_logits).norm())
    error = float((reloaded - reference).norm())
    print(f"pack folder:            {workdir / 'skill-a'}")
    print(f"pack size:              {pack_bytes / 1024:.1f} KiB ({pack_bytes / fp16_bytes:.3f}x the fp16 factors)")
    print(f"reload error:           {error / effect:.4f} of the adapter's effect on the logits")
    print(f"mixed batch row 0 == skill-a alone: {bool(torch.allclose(mixed[0], reloaded[0], atol=1e-5))}")


if __name__ == "__main__":
    main()
