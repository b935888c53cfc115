"""Calibrated extraction: walk the base model decoder layer by decoder layer, as sequential GPTQ does.

A layer's module inputs are captured with hooks (accumulating ``H = XᵀX``, not activations) while the layer runs with
its fine-tuned weights, its deltas are compressed with GPTQ on those Hessians, and the next layer's inputs come from
the layer running with ``base + compressed delta``.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointReader
from .compressor import Compressed, Compressor
from .roles import ModuleSpec, decoder_layers


def extract_calibrated(
    compressor: Compressor,
    specs: list[ModuleSpec],
    base_folder: str,
    finetuned: CheckpointReader,
    texts: list[str],
    length: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Compressed | None]:
    """Sequential, layer-by-layer extraction with GPTQ (see the module docstring)."""
    from transformers import AutoModelForCausalLM

    from ..model import grow_vocabulary

    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    model.config.use_cache = False
    if compressor.grown_rows:
        grow_vocabulary(model, max(finetuned.shape(s.weight)[0] for s in specs if s.name in compressor.grown_rows))
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters(remove_duplicate=False))
    batches = _tokenized_batches(base_folder, finetuned, texts, length, batch_size)
    _, layers = decoder_layers(model)
    compressed: dict[str, Compressed | None] = {}

    def apply(spec: ModuleSpec, item: Compressed | None) -> None:
        """Set the in-memory module to base + compressed delta (the base stays readable from disk)."""
        weight = parameters[spec.weight].data
        bias = parameters[spec.bias].data if spec.bias is not None else None
        for key, target in ((spec.weight, weight), (spec.bias, bias)):
            if key is None:
                continue
            stored = compressor.base.get(key).float()
            target.zero_()  # rows a fine-tune added (grown vocabulary) start from zero
            target[: stored.shape[0]] = stored
        if item is not None:
            item.apply_to(weight, bias, spec.transposed)

    for spec in (s for s in specs if s.layer_index is None):  # embeddings, final norm, lm_head: data-free
        compressed[spec.name] = compressor.compress(spec)
        if spec.kind != "parameter":
            apply(spec, compressed[spec.name])

    masks = [mask for _, mask in batches]
    inputs = _first_layer_inputs(model, layers[0], batches)
    for index, layer in enumerate(tqdm(layers, desc="extracting (calibrated)", unit="layer", disable=not progress)):
        layer_specs = [s for s in specs if s.layer_index == index]
        for spec in layer_specs:  # capture with the fine-tuned layer: the pack should reproduce its activations
            for key in (spec.weight, spec.bias):
                if key is not None:
                    parameters[key].data.copy_(compressor.finetuned.get(key).float())
        collector = _HessianCollector(
            {
                s.name: modules[s.name]
                for s in layer_specs
                if s.role in ("attn", "mlp") and s.kind in ("linear", "conv1d")
            }
        )
        with torch.no_grad(), collector:
            for (args, kwargs), mask in zip(inputs, masks, strict=True):
                collector.mask = mask
                layer(*args, **kwargs)
        for spec in layer_specs:
            compressed[spec.name] = compressor.compress(spec, collector.hessians.get(spec.name))
            apply(spec, compressed[spec.name])
        with torch.no_grad():
            inputs = [_with_hidden(args, kwargs, _hidden(layer(*args, **kwargs))) for args, kwargs in inputs]
    return compressed


class _HessianCollector:
    """Forward hooks accumulating ``H = XᵀX`` of each module's inputs over the non-padding tokens."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.hessians: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._handles = []

    def __enter__(self) -> _HessianCollector:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, args, output):
            x = args[0].detach().float()
            x = x[self.mask] if self.mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1])
            contribution = x.T @ x
            self.hessians[name] = self.hessians[name] + contribution if name in self.hessians else contribution

        return hook


class _StopForward(Exception):
    pass


def _first_layer_inputs(model, first_layer, batches) -> list[tuple[tuple, dict]]:
    """The positional and keyword arguments the first decoder layer receives for each calibration batch."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "use_cache")}))
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for input_ids, mask in batches:
                with contextlib.suppress(_StopForward):
                    model(input_ids=input_ids, attention_mask=mask.long(), use_cache=False)
    finally:
        handle.remove()
    return captured


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same layer call with new hidden states (passed positionally or as ``hidden_states=``)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _tokenized_batches(base_folder, finetuned, texts, length, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoTokenizer

    source = base_folder if any(Path(base_folder).glob("tokenizer*")) else str(finetuned.folder)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=length
        )
        batches.append((encoded["input_ids"], encoded["attention_mask"].bool()))
    return batches


def load_texts(source, limit: int | None = None, what: str = "calibration") -> list[str]:
    """Non-empty texts from a list, a datasets.Dataset (``text`` column) or a .jsonl (``{"text": ...}`` per line) /
    .txt (one text per line) path; at most `limit`."""
    calibration = source
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
            texts = [row["text"] if isinstance(row, dict) else str(row) for row in rows]
        else:
            texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif hasattr(calibration, "column_names"):
        if "text" not in calibration.column_names:
            raise ValueError(f"the {what} dataset needs a 'text' column; it has {calibration.column_names}")
        texts = list(calibration["text"])
    else:
        texts = [str(text) for text in calibration]
    texts = [text for text in texts if text.strip()][:limit]
    if not texts:
        raise ValueError(f"the {what} data holds no text")
    return texts
