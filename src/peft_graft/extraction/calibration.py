"""Calibrated extraction: walk the base model decoder layer by decoder layer, as sequential GPTQ does, holding one.

The model is a skeleton whose parameters live on the meta device (its buffers, e.g. rotary frequencies, are real).
Only what runs before the first decoder layer (the input embeddings) is loaded whole, with its compressed delta
applied. Then, for each decoder layer: its weights are read from the fine-tune, the calibration inputs run through it
while hooks accumulate ``H = XᵀX`` of each projection's inputs (never activations), its deltas are compressed with
GPTQ on those Hessians, its weights are set to ``base + compressed delta`` and the inputs run through it again to
make the next layer's inputs, and its weights go back to the meta device. At most one decoder layer is ever real.

The inputs between layers are kept as bfloat16 files in the work folder, one per calibration batch, and read one batch
at a time: ``samples × tokens × hidden × 2`` bytes on disk per layer (128 × 256 × 4096 × 2 = 256 MiB for an 8B model),
``batch_size × tokens × hidden × 4`` bytes in memory. They also let a stopped run resume at its next layer.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..pack.codec import decode_module
from .compressor import compress_unit
from .devices import DevicePool
from .report import ModuleReport
from .roles import ModuleSpec, decoder_layers
from .staging import Staging


def extract_calibrated(
    compressors: DevicePool,
    units: list[list[ModuleSpec]],
    staging: Staging,
    base_folder: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    progress: bool,
) -> list[ModuleReport]:
    """Compress every unit, the decoder layers with GPTQ on their own calibration inputs (a layer's modules spread
    over the pool's devices; the walk runs on `device`, the first); returns the reports."""
    deltas = compressors.primary.deltas
    reports: list[ModuleReport] = []
    for position, unit in enumerate(units):  # embeddings, final norm, lm_head: data-free
        if unit[0].layer_index is None:
            reports += compress_unit(compressors, staging, position, unit, {})

    model = skeleton(base_folder)
    layers_name, layers = decoder_layers(model)
    head = model.get_output_embeddings()
    for name, parameter in list(model.named_parameters()):
        if name.startswith(f"{layers_name}.") or (head is not None and parameter is head.weight and not _tied(model)):
            continue
        _set_outside_parameter(model, name, deltas, staging, units, device)
    _buffers_to(model, device)
    calls = _first_layer_calls(model, layers[0], batches, device)
    # From here the walk needs only the decoder layers: the embedding alone is 2 GB in float32 at 8B.
    for name, parameter in list(model.named_parameters(remove_duplicate=False)):
        if not name.startswith(f"{layers_name}.") and parameter.device.type != "meta":
            _set(model, name, torch.empty_like(parameter, device="meta"))
    masks = [mask.to(device) for _, mask in batches]

    layer_units = [(position, unit) for position, unit in enumerate(units) if unit[0].layer_index is not None]
    first = 0
    while first < len(layer_units) and staging.finished(layer_units[first][0]) is not None:
        reports += staging.finished(layer_units[first][0])
        first += 1
    if first == len(layer_units):
        return reports
    if first > 0 and not staging.has_inputs(layer_units[first][0], len(calls)):
        raise RuntimeError(f"the work folder {staging.path} lost the calibration inputs of its next layer; start over")
    if first == 0:
        for index, (args, kwargs) in enumerate(calls):
            staging.write_input(layer_units[0][0], index, _hidden_of(args, kwargs))
        staging.inputs_complete(layer_units[0][0], len(calls))
    calls = [_without_hidden(args, kwargs) for args, kwargs in calls]

    walk = tqdm(layer_units[first:], desc="extracting (calibrated)", unit="layer", disable=not progress)
    for step, (position, unit) in enumerate(walk, start=first):
        index = unit[0].layer_index
        layer = layers[index]
        prefix = f"{layers_name}.{index}."
        materialize(layers, index, prefix, deltas.finetuned, device)  # capture with the fine-tuned layer
        collector = _HessianCollector(
            {
                spec.name: model.get_submodule(spec.name)
                for spec in unit
                if spec.role in ("attn", "mlp") and spec.kind in ("linear", "conv1d")
            }
        )
        with torch.no_grad(), collector:
            for batch, (args, kwargs) in enumerate(calls):
                collector.mask = masks[batch]
                hidden = staging.read_input(position, batch).to(device, torch.float32)
                call_args, call_kwargs = _with_hidden(args, kwargs, hidden)
                layer(*call_args, **call_kwargs)
        release(layer)  # not needed while its modules compress (GPTQ's peak): _set_compressed_layer reloads it
        reports += compress_unit(compressors, staging, position, unit, collector.hessians)
        del collector
        _set_compressed_layer(layer, prefix, unit, deltas, staging, position, device)
        following = layer_units[step + 1][0] if step + 1 < len(layer_units) else None
        if following is not None:
            with torch.no_grad():
                for batch, (args, kwargs) in enumerate(calls):
                    hidden = staging.read_input(position, batch).to(device, torch.float32)
                    call_args, call_kwargs = _with_hidden(args, kwargs, hidden)
                    output = layer(*call_args, **call_kwargs)
                    staging.write_input(following, batch, _hidden(output))
            staging.inputs_complete(following, len(calls))
        staging.drop_inputs(position)
        release(layer)
    return reports


def skeleton(folder: str) -> nn.Module:
    """The model of a checkpoint folder with every parameter on the meta device and its buffers real (float32).

    Parameters are moved to the meta device as modules register them, as accelerate's ``init_empty_weights`` does, so
    no weight is allocated, while buffers computed in constructors (rotary frequencies, scales) stay valid.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register_on_meta
    try:
        model = AutoModelForCausalLM.from_config(config)
    finally:
        nn.Module.register_parameter = register
    model.config.use_cache = False
    return model.eval()


def materialize(layers: nn.ModuleList, index: int, prefix: str, reader, device: torch.device) -> None:
    """Load decoder layer `index`'s parameters from a checkpoint (keys under `prefix`), in float32 on `device`."""
    for name, _ in list(layers[index].named_parameters()):
        _set(layers[index], name, reader.get(prefix + name).to(device, torch.float32))


def release(layer: nn.Module) -> None:
    """Put a decoder layer's parameters back on the meta device."""
    for name, parameter in list(layer.named_parameters()):
        _set(layer, name, torch.empty_like(parameter, device="meta"))


def _set(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    module._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _buffers_to(model: nn.Module, device: torch.device) -> None:
    """Real buffers onto `device`, floating ones in float32 (the layer walk computes in float32)."""
    for module in model.modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.device.type != "meta":
                dtype = torch.float32 if buffer.is_floating_point() else buffer.dtype
                module._buffers[name] = buffer.to(device, dtype)


def _compressed_delta(spec: ModuleSpec, tensors: dict[str, torch.Tensor], shape, device) -> tuple:
    """A module's weight delta (in its stored layout) and bias delta, decoded from its staged pack tensors."""
    if not tensors:
        return None, None
    logical = (shape[1], shape[0]) if spec.transposed else tuple(shape)
    decoded = decode_module({k: t.to(device) for k, t in tensors.items()}, logical).tensors
    weight = None
    if "graft_S" in decoded:
        weight = (decoded["graft_U"] * decoded["graft_S"]) @ decoded["graft_V"].T
    elif "graft_indices" in decoded:
        flat = torch.zeros(math.prod(logical), device=device)
        flat[decoded["graft_indices"]] = decoded["graft_values"]
        weight = flat.view(logical)
    elif "graft_values" in decoded:
        weight = decoded["graft_values"].reshape(logical)
    if weight is not None and spec.transposed:
        weight = weight.T
    return weight, decoded.get("graft_bias")


def _set_compressed_layer(layer, prefix, unit, deltas, staging: Staging, position, device) -> None:
    """Set a decoder layer's parameters to base + compressed delta (as the pack will make them)."""
    staged = staging.unit_tensors(position)
    specs = {spec.weight: spec for spec in unit} | {spec.bias: spec for spec in unit if spec.bias}
    for name, _ in list(layer.named_parameters()):
        key = prefix + name
        value = deltas.base.get(key).to(device, torch.float32)
        spec = specs.get(key)
        if spec is not None:
            weight, bias = _compressed_delta(
                spec, staged.get(spec.name, {}), deltas.finetuned.shape(spec.weight), device
            )
            delta = weight if key == spec.weight else bias
            if delta is not None:
                value = value + delta.to(value.dtype)
        _set(layer, name, value)


def _set_outside_parameter(model, name, deltas, staging: Staging, units, device) -> None:
    """Load a parameter outside the decoder layers (e.g. the input embedding) as base + compressed delta; rows a
    fine-tune added (grown vocabulary) start from zero, as when a pack grows the base."""
    rows = deltas.finetuned.shape(name)
    base = deltas.base.get(name).to(device, torch.float32)
    value = torch.zeros(rows, device=device) if tuple(base.shape) != tuple(rows) else base
    if value is not base:
        value[: base.shape[0]] = base
    for position, unit in enumerate(units):
        spec = unit[0]
        if spec.layer_index is None and name in (spec.weight, spec.bias):
            tensors = staging.unit_tensors(position).get(spec.name, {})
            if name == spec.weight and "graft_indices" in tensors and not spec.transposed:
                # a pruned embedding: its entries added in place, never a dense copy of its delta (2 GB at 8B)
                decoded = decode_module({k: t.to(device) for k, t in tensors.items()}, tuple(rows)).tensors
                value.view(-1).index_add_(0, decoded["graft_indices"].long(), decoded["graft_values"].to(value.dtype))
                continue
            weight, bias = _compressed_delta(spec, tensors, deltas.finetuned.shape(spec.weight), device)
            delta = weight if name == spec.weight else bias
            if delta is not None:
                value.add_(delta.to(value.dtype))
    _set(model, name, value)


class _HessianCollector:
    """Forward hooks accumulating ``H = XᵀX`` of each module's inputs over the non-padding tokens.

    Modules fed the very same input tensor (q/k/v, gate/up in Llama) share one Hessian: the hook that fires right
    after another on the same tensor is recorded as its alias in the first batch and skipped from then on. Each
    Hessian grows in place (``addmm_``), so accumulating never holds a second one.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.hessians: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self._handles = []
        self._aliases: dict[str, str] = {}
        self._previous: tuple[torch.Tensor, str] | None = None

    def __enter__(self) -> _HessianCollector:
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._previous = None
        for name, source in self._aliases.items():
            self.hessians[name] = self.hessians[source]

    def _hook(self, name: str):
        def hook(module, args, output):
            previous, self._previous = self._previous, (args[0], name)
            if name in self._aliases:
                return
            if name not in self.hessians and previous is not None and previous[0] is args[0]:
                self._aliases[name] = self._aliases.get(previous[1], previous[1])
                return
            x = args[0].detach().float()
            x = x[self.mask] if self.mask is not None and x.dim() == 3 else x.reshape(-1, x.shape[-1])
            if name in self.hessians:
                self.hessians[name].addmm_(x.T, x)
            else:
                self.hessians[name] = x.T @ x

        return hook


class _StopForward(Exception):
    pass


def _first_layer_calls(model, first_layer, batches, device) -> list[tuple[tuple, dict]]:
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
                    model(input_ids=input_ids.to(device), attention_mask=mask.long().to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _without_hidden(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A layer call's other arguments; the hidden states are read from the work folder per layer."""
    if args:
        return (None, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": None}


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The same layer call with new hidden states (passed positionally or as ``hidden_states=``)."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def tokenized_batches(base_folder, finetuned, texts, length, batch_size) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The calibration texts as (input ids, attention mask) batches, by the base's tokenizer (else the fine-tune's)."""
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


def token_frequencies(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Each token id's share of the calibration tokens (padding excluded): what planning weights embedding rows by
    (`plan.row_weights`)."""
    vocab = 1 + max(int(ids.max()) for ids, _ in batches)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for ids, mask in batches:
        counts += torch.bincount(ids[mask], minlength=vocab).double()
    return counts / counts.sum()


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
