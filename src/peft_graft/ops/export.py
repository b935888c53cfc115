"""Export a SkillPack as a standard PEFT LoRA adapter, for servers that batch LoRAs (vLLM, LoRAX, TGI).

Each low-rank module ``Δ = U·diag(S)·Vᵀ`` becomes ``lora_A = Vᵀ`` and ``lora_B = U·diag(S)`` at the module's own rank,
with ``lora_alpha = r`` so the LoRA scaling is 1: the exported adapter computes the dequantized pack delta exactly.
The other parts of a pack (embedding / ``lm_head`` deltas in any form, dense deltas, norm and bias deltas) have no
LoRA form those servers accept: they are dropped with a warning, or, given the base model, merged into a copy of it
that the LoRA is then served on. Projections stored as group-quantized dense deltas (``forms="any"`` packs) are refused
unless they are merged that way: dropping them would drop much of the skill.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import ExportError
from ..pack.codec import QUANTIZED_PREFIX, decode_lowrank
from ..pack.folder import PackFolder, is_adapter_folder
from ..pack.layout import ADAPTER_WEIGHTS, PEFT_PREFIX, TOKENIZER_CONFIG
from ..utils.atomic import check_replaceable, is_model_folder, write_folder
from ..utils.extras import require_extra

logger = logging.getLogger(__name__)


@dataclass
class LoraExport:
    """What :func:`export_lora` wrote."""

    output_dir: str
    lora_modules: list[str] = field(default_factory=list)
    ranks: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    merged_base_dir: str | None = None

    def summary(self) -> str:
        lines = [
            f"LoRA adapter: {len(self.lora_modules)} modules, ranks {min(self.ranks.values(), default=0)}"
            f"-{max(self.ranks.values(), default=0)} -> {self.output_dir}"
        ]
        if self.merged:
            lines.append(f"merged into {self.merged_base_dir}: {', '.join(self.merged)}")
        if self.dropped:
            lines.append(f"dropped (no LoRA form): {', '.join(self.dropped)}")
        return "\n".join(lines)


def export_lora(
    pack: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    merged_base_dir: str | os.PathLike | None = None,
    merged_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> LoraExport:
    """Write the pack's low-rank deltas as a PEFT LoRA adapter in `output_dir`.

    With `base` and `merged_base_dir`, the pack's other deltas are merged into a copy of the base saved in
    `merged_base_dir` (serve the LoRA on that copy), in `merged_dtype` (default: the base's own dtype, which rounds
    the merged weights to it); without them, those deltas are dropped with a warning.
    """
    folder = PackFolder(pack)
    pack = folder.path
    output_dir = Path(output_dir)
    if (base is None) != (merged_base_dir is None):
        raise ExportError("pass both base= and merged_base_dir= to merge the non-LoRA deltas, or neither to drop them")
    for target in (output_dir, Path(merged_base_dir) if merged_base_dir else None):
        if target is not None and target.exists() and not overwrite:
            raise FileExistsError(
                f"{target} already exists; choose another folder or pass overwrite=True (--overwrite)"
            )
    config = folder.config
    report = LoraExport(str(output_dir))
    lora = _peft_lora_tensors(_lora_factors(folder, report, merging=merged_base_dir is not None))

    if merged_base_dir is not None:
        report.merged, report.dropped = report.dropped, []
        report.merged_base_dir = str(merged_base_dir)
        _write_merged_base(folder, Path(base), Path(merged_base_dir), set(report.lora_modules), merged_dtype, overwrite)
    elif report.dropped:
        logger.warning(
            "LoRA has no form for these deltas of %s, so the export drops them: %s. The exported adapter reproduces "
            "the pack only without them; pass base= and merged_base_dir= (--base / --merged-base) to merge them into "
            "a copy of the base instead.",
            pack,
            ", ".join(report.dropped),
        )

    _write_lora(output_dir, lora, config, report, overwrite)
    return report


# the ranks vLLM's --max-lora-rank accepts
_VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class EngineExport:
    """What :func:`export_vllm` wrote: a LoRA folder per pack, the base to serve them on, and the commands."""

    output_dir: str
    packs: dict[str, LoraExport]
    base: str
    vllm_command: list[str]
    gateway_command: list[str]

    def summary(self) -> str:
        import shlex

        dropped = sorted({d for report in self.packs.values() for d in report.dropped})
        lines = [f"{len(self.packs)} LoRA adapters in {self.output_dir}, served on {self.base}"]
        if dropped:
            lines.append(f"dropped (no LoRA form): {', '.join(dropped)}")
        lines += ["vLLM:    " + shlex.join(self.vllm_command), "gateway: " + shlex.join(self.gateway_command)]
        return "\n".join(lines)


def export_vllm(
    packs: Mapping[str, str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    router: str | os.PathLike | None = None,
    dtype: str = "bfloat16",
    port: int = 8000,
    overwrite: bool = False,
) -> EngineExport:
    """Write every pack as a LoRA folder ``output_dir/<name>`` that vLLM serves with ``--enable-lora``, plus
    ``launch.json`` and ``README.md`` with the exact ``vllm serve`` command (modules, ``--max-lora-rank``, dtype)
    and the ``peft-graft serve --upstream`` gateway command for `router` (the router folder whose packs these are).

    vLLM takes no embedding, ``lm_head``, norm or bias deltas. With `base`, those parts are merged into one shared
    copy of the base (``output_dir/base``), which is only right when every pack carries the same ones (otherwise
    refused, naming the first that differs); without `base` they are dropped, with a warning.
    """
    import shlex

    if not packs:
        raise ExportError("give at least one pack to export")
    output_dir = Path(output_dir)
    check_replaceable(output_dir, overwrite, None, "folder")
    folders = {name: PackFolder(folder) for name, folder in packs.items()}
    reports = {name: LoraExport(str(output_dir / name)) for name in folders}
    factors = {name: _lora_factors(folder, reports[name], merging=False) for name, folder in folders.items()}
    if base is not None:
        _check_shared(folders, reports)
    first = next(iter(folders.values()))
    serving_base = str(output_dir / "base") if base is not None else first.config.get("base_model_name_or_path")
    if not serving_base:
        raise ExportError("the packs record no base model: pass base= (--base) to name the model to serve them on")
    for name, report in reports.items():
        if report.dropped and base is None:
            logger.warning(
                "vLLM has no form for these deltas of %s, so the export drops them: %s", name, ", ".join(report.dropped)
            )
        if base is not None:
            report.merged, report.dropped, report.merged_base_dir = report.dropped, [], serving_base
    rank = max(r for report in reports.values() for r in report.ranks.values())
    max_rank = next((allowed for allowed in _VLLM_RANKS if allowed >= rank), None)
    if max_rank is None:
        raise ExportError(f"a pack has rank {rank}, above the largest rank vLLM serves ({_VLLM_RANKS[-1]})")
    vllm = ["vllm", "serve", serving_base, "--enable-lora", "--lora-modules"]
    vllm += [f"{name}={output_dir / name}" for name in folders]
    vllm += ["--max-lora-rank", str(max_rank), "--max-loras", str(len(folders)), "--dtype", dtype, "--port", str(port)]
    gateway = ["peft-graft", "serve", str(router or "ROUTER_FOLDER"), "--upstream", f"http://127.0.0.1:{port}"]
    gateway += ["--engine", "vllm", "--upstream-model", serving_base, "--port", str(port + 1)]
    result = EngineExport(str(output_dir), reports, serving_base, vllm, gateway)

    def write(staging: Path) -> None:
        for name, folder in folders.items():
            _write_lora(staging / name, _peft_lora_tensors(factors[name]), folder.config, reports[name], False)
        if base is not None:
            _write_merged_base(
                first,
                Path(base),
                staging / "base",
                set(reports[next(iter(folders))].lora_modules),
                getattr(torch, dtype),
                overwrite=False,
            )
        launch = {"vllm": vllm, "gateway": gateway, "max_lora_rank": max_rank, "dtype": dtype}
        (staging / "launch.json").write_text(json.dumps(launch, indent=2) + "\n", encoding="utf-8")
        (staging / "README.md").write_text(
            f"# {len(folders)} SkillPacks as vLLM LoRA adapters\n\n```bash\n{shlex.join(vllm)}\n"
            f"{shlex.join(gateway)}\n```\n",
            encoding="utf-8",
        )

    write_folder(output_dir, write, overwrite=overwrite, kind="folder")
    return result


def _check_shared(folders: Mapping[str, PackFolder], reports: Mapping[str, LoraExport]) -> None:
    """Every pack carries the same non-LoRA deltas (the same modules, byte-identical tensors), or refuse."""
    (first_name, first), *others = folders.items()
    shared = {m: t for m, t in first.modules().items() if m in reports[first_name].dropped}
    for name, folder in others:
        theirs = {m: t for m, t in folder.modules().items() if m in reports[name].dropped}
        differing = sorted(set(shared) ^ set(theirs)) or sorted(
            m
            for m in shared
            if shared[m].keys() != theirs[m].keys()
            or not all(torch.equal(shared[m][k], theirs[m][k]) for k in shared[m])
        )
        if differing:
            raise ExportError(
                f"{first_name} and {name} carry different {differing[0]} deltas, which vLLM cannot serve per adapter: "
                "one merged base would be wrong for one of them. Export without base= (--base) to drop those parts."
            )


# llama.cpp architectures of the model types a GGUF LoRA can target, and whether its converter permutes the rows of
# q_proj / k_proj (llama-family rotary layout): the LoRA's B must be permuted the same way.
_GGUF_ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def export_gguf(
    pack: str | os.PathLike,
    output_file: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> LoraExport:
    """Write the pack's low-rank deltas as a llama.cpp GGUF LoRA adapter (``llama-server --lora FILE``, Ollama's
    ``ADAPTER``), float32, named after the base's GGUF tensors.

    The tensor names and the rotary row order come from the base's ``config.json`` (`base`, default the folder the
    pack records). llama.cpp scales every pair by ``alpha / rank`` with one alpha per file; each B is pre-scaled so
    that every module keeps its exact delta. Parts with no LoRA form are dropped, as by :func:`export_lora`.
    """
    require_extra("gguf", "the GGUF export")
    import gguf
    import numpy as np

    folder = PackFolder(pack)
    output_file = Path(output_file)
    if output_file.exists() and not overwrite:
        raise FileExistsError(f"{output_file} already exists; choose another file or pass overwrite=True (--overwrite)")
    base = Path(base or folder.config.get("base_model_name_or_path") or "")
    if not (base / "config.json").is_file():
        raise ExportError(
            f"the GGUF export needs the base model's config.json for its tensor names; {base} has none: pass --base"
        )
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") not in _GGUF_ARCHITECTURES:
        raise ExportError(
            f"GGUF LoRA export supports {', '.join(_GGUF_ARCHITECTURES)} models, not {config.get('model_type')!r}"
        )
    architecture, permuted = _GGUF_ARCHITECTURES[config["model_type"]]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    kinds = {name: kind for kind, name in gguf.MODEL_ARCH_NAMES.items()}
    names = gguf.get_tensor_name_map(kinds[architecture], config["num_hidden_layers"])
    report = LoraExport(str(output_file))
    factors = _lora_factors(folder, report, merging=False)
    alpha = max(report.ranks.values())
    tensors = {}
    for module, (a, b) in factors.items():
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ExportError(f"{module} has no GGUF tensor name in llama.cpp's {architecture} layout")
        b = b * (report.ranks[module] / alpha)
        if permuted and module.endswith(("q_proj", "k_proj")):
            b = _rotary_rows(b, heads if module.endswith("q_proj") else kv_heads)
        tensors[f"{target}.lora_a"] = a.numpy().astype(np.float32)
        tensors[f"{target}.lora_b"] = b.numpy().astype(np.float32)
    if report.dropped:
        logger.warning(
            "a GGUF LoRA has no form for these deltas of %s, so the export drops them: %s",
            folder.path,
            ", ".join(report.dropped),
        )
    output_file.parent.mkdir(parents=True, exist_ok=True)
    staging = output_file.with_name(f".{output_file.name}.partial")
    writer = gguf.GGUFWriter(staging, architecture)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, tensor in tensors.items():
            writer.add_tensor(name, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(staging, output_file)
    return report


def _rotary_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a q / k projection in llama.cpp's rotary order: within each head, the two halves interleaved
    (the order its converter gives the base weights)."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


def _lora_factors(folder: PackFolder, report: LoraExport, *, merging: bool) -> dict[str, tuple]:
    """Per low-rank module, its LoRA pair ``(A = Vᵀ, B = U·diag(S))`` in float32; what has no LoRA form goes to
    ``report.dropped``. Group-quantized projections are refused unless `merging` (see :func:`export_lora`)."""
    by_module = folder.modules()
    quantized = sorted(m for m, tensors in by_module.items() if any(k.startswith(QUANTIZED_PREFIX) for k in tensors))
    if quantized and not merging:
        raise ExportError(
            f"{folder.path} stores {len(quantized)} projection(s) as group-quantized dense deltas "
            f"({', '.join(quantized[:3])}{', ...' if len(quantized) > 3 else ''}), which have no LoRA form: dropping "
            "them would lose the skill. Extract a LoRA-exportable pack with forms='lowrank' (peft-graft extract "
            "--forms lowrank), or pass base= and merged_base_dir= (--base / --merged-base) to merge them into a copy "
            "of the base."
        )
    # embeddings have no LoRA form those servers accept, whatever their form in the pack
    embeddings = {m["name"] for m in (folder.report or {}).get("modules", []) if m.get("role") == "embed"}
    factors = {}
    for module, tensors in sorted(by_module.items()):
        lowrank = {k: t for k, t in tensors.items() if k != "graft_bias"}
        if "graft_S" not in lowrank or module in embeddings:
            report.dropped.append(module)
            continue
        u, s, v = decode_lowrank(lowrank, torch.float32)
        factors[module] = (v.T.contiguous(), (u * s).contiguous())
        report.lora_modules.append(module)
        report.ranks[module] = int(s.shape[0])
        if "graft_bias" in tensors:
            report.dropped.append(f"{module} (bias)")
    if not factors:
        raise ExportError(f"{folder.path} has no low-rank deltas: there is nothing to export as LoRA")
    return factors


def _peft_lora_tensors(factors: Mapping[str, tuple]) -> dict[str, torch.Tensor]:
    """The LoRA pairs under PEFT's own adapter-file keys (a layout ours shares)."""
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b
    return tensors


def _write_lora(output_dir: Path, tensors, pack_config: dict, report: LoraExport, overwrite: bool) -> None:
    from peft import LoraConfig

    ranks = report.ranks
    rank = max(ranks.values())
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(ranks),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: r for m, r in ranks.items() if r != rank},
        lora_dropout=0.0,
        bias="none",
        task_type=pack_config.get("task_type") or "CAUSAL_LM",
        base_model_name_or_path=report.merged_base_dir or pack_config.get("base_model_name_or_path"),
        revision=None if report.merged_base_dir else pack_config.get("revision"),
        inference_mode=True,
    )

    def write(staging: Path) -> None:
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        lora_config.save_pretrained(str(staging))

    write_folder(output_dir, write, overwrite=overwrite, replaceable=is_adapter_folder, kind="PEFT adapter folder")


def _write_merged_base(pack: PackFolder, base: Path, target: Path, lowrank: set[str], dtype, overwrite: bool) -> None:
    """The base with every non-low-rank delta of the pack merged in (vocabulary grown if the pack adds tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..layer import graft_layers

    model = AutoModelForCausalLM.from_pretrained(base)
    dtype = dtype or next(model.parameters()).dtype
    peft_model = PeftModel.from_pretrained(model.float(), str(pack.path))
    for name, module in graft_layers(peft_model.get_base_model()):
        if name not in lowrank and not module.graft_tied:
            module.merge()
    merged = peft_model.unload().to(dtype)
    tokenizer_source = pack.path if pack.has_tokenizer else base

    def write(staging: Path) -> None:
        merged.save_pretrained(staging)
        if (Path(tokenizer_source) / TOKENIZER_CONFIG).is_file():
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(staging)

    write_folder(target, write, overwrite=overwrite, replaceable=is_model_folder, kind="model folder")


__all__ = ["EngineExport", "LoraExport", "export_gguf", "export_lora", "export_vllm"]
