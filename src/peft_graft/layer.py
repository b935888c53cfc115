"""GRAFT tuner layers.

Every adapter of a layer holds a delta of the wrapped module's weight in one of three forms, plus an optional dense
delta of its bias:

* low-rank ``U·diag(S)·Vᵀ`` (``graft_U`` / ``graft_S`` / ``graft_V``): Linear and Conv1D; the forward adds
  ``((x·V)·S)·Uᵀ`` and never builds the dense delta;
* sparse (``graft_values`` at flat row-major ``graft_indices``): embeddings and the output embedding;
* dense (``graft_values`` alone, in the weight's logical shape): norms, and Linear layers whose factorization would be
  larger than the dense delta, or that a pack stores group-quantized (the file's form; live tensors are floats).

Embeddings (and a tied output embedding) take the low-rank form too: the forward gathers rows of ``U``.

Live adapter tensors are floats; the packed, quantized form exists only in files. A pack loaded from disk remembers
its packed tensors, so saving it again unchanged writes the same bytes. When loading, the file decides each module's
form, so a pack can mix them freely.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ._mixed_batch import BASE_ADAPTER, StackCache, current_row_adapters, row_adapters, row_slots
from .compress import csr_row_pointers, scatter_dense
from .errors import GraftConfigError

# Held while a GraftNorm runs its base norm, whose parameters it may swap for the call (see GraftNorm._forward_with).
_NORM_PARAMETER_LOCK = threading.Lock()

# Scale of the random delta made with init_weights=False (tests only): visible, but far from dominating the base.
_RANDOM_DELTA_SCALE = 0.1


class GraftLayer(BaseTunerLayer):
    """The GRAFT tuner layer: per-adapter deltas in PEFT's containers, and the forward, mixed-batch and merge logic.

    Concrete layers (``GraftLinear``, ``GraftEmbedding``, ``GraftNorm``) set `delta_shape` (the weight's logical
    shape) and define the delta's contribution to the output (`_delta_output`). Nothing here reads or writes pack
    files: ``peft_graft.pack.adapter_io`` turns an adapter into pack tensors and back, through `set_delta`.
    """

    adapter_layer_names = ("graft_U", "graft_S", "graft_V", "graft_values", "graft_bias")
    # graft_packed is pack.adapter_io's per-adapter record of the tensors an adapter was loaded from; it is listed
    # here so that PEFT's own delete_adapter drops it with the adapter.
    other_param_names = ("graft_indices", "graft_dropout", "graft_packed", "graft_dense_rows_from", "graft_tied")

    delta_shape: tuple[int, ...]
    # Sparse-role layers (embeddings, lm_head) are magnitude-pruned to embed_density when a trained delta is saved.
    prune_on_save = False
    # Layout of the base weight relative to `delta_shape`: Conv1D stores (in, out).
    transposed_weight = False

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.graft_U = nn.ParameterDict({})
        self.graft_S = nn.ParameterDict({})
        self.graft_V = nn.ParameterDict({})
        self.graft_values = nn.ParameterDict({})
        self.graft_bias = nn.ParameterDict({})
        self.graft_indices = BufferDict({}, persistent=True)
        self.graft_dropout = nn.ModuleDict({})
        self.graft_packed: dict[str, Any] = {}
        # sparse adapters of grown vocabularies: rows from here on are stored as a dense block
        self.graft_dense_rows_from: dict[str, int] = {}
        # adapters whose weight delta is the delta of another (tied) layer, e.g. lm_head tied to embed_tokens
        self.graft_tied: dict[str, None] = {}
        self._merge_restore: dict[str, list[tuple[str, tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._csr_cache: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        # the factors (or norm shifts) of the last one-token mixed batch, stacked; see GraftLinear
        self._stack_cache = StackCache()
        # GraftNorm: whether the base norm broadcasts per-row parameters (None: not tried yet)
        self._rows_broadcast: bool | None = None
        self._disable_adapters = False
        self.merged_adapters = []

    # ----- which adapters and which form -------------------------------------------------------------------

    def _source(self) -> GraftLayer:
        """The layer that holds the weight deltas of tied adapters (itself unless tied)."""
        return self.__dict__.get("_tied_source", self)

    def owns(self, adapter: str) -> bool:
        """Whether this layer holds a delta (of its weight, through a tied layer, or of its bias) for `adapter`."""
        if adapter in self.graft_tied:
            return self._source().owns(adapter)
        # graft_U and graft_V never come without graft_S
        return adapter in self.graft_S or adapter in self.graft_values or adapter in self.graft_bias

    def delta_parts(self, adapter: str) -> dict[str, torch.Tensor]:
        """The weight-delta tensors of an adapter (the tied source's, if tied), named like the containers."""
        layer = self._source() if adapter in self.graft_tied else self
        names = ("graft_U", "graft_S", "graft_V", "graft_values", "graft_indices")
        return {name: getattr(layer, name)[adapter] for name in names if adapter in getattr(layer, name)}

    def _indices(self, adapter: str) -> torch.Tensor | None:
        return self.delta_parts(adapter).get("graft_indices")

    def adapter_dtype(self, adapter: str) -> torch.dtype:
        return next(getattr(self, n)[adapter].dtype for n in self.adapter_layer_names if adapter in getattr(self, n))

    # ----- forward ---------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus the active adapters' deltas (or each row's own, in a mixed batch)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            adapter_names = current_row_adapters()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._forward_with(x, [a for a in self.active_adapters if self.owns(a)], *args, **kwargs)

    def _forward_with(self, x: torch.Tensor, adapters: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base output plus the given adapters' deltas."""
        result = self.base_layer(x, *args, **kwargs)
        for adapter in adapters:
            result = result + self._delta_output(adapter, x).to(result.dtype)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Each row with its own adapter. Merged adapters are already in the weights: a row gets the deltas of the
        adapter it names minus those of the merged ones it does not name, so rows stay exact in merged mode too."""
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows; "
                "pass one adapter name per row"
            )
        result = self.base_layer(x, *args, **kwargs)
        merged = [adapter for adapter in self.merged_adapters if self.owns(adapter)]
        rows_by_adapter: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_by_adapter.setdefault(name, []).append(row)
        for name, rows in rows_by_adapter.items():
            wanted = [name] if name != BASE_ADAPTER and self.owns(name) else []
            add = [adapter for adapter in wanted if adapter not in merged]
            remove = [adapter for adapter in merged if adapter not in wanted]
            if add or remove:
                # one pack for the whole batch (a lone request): no gather and scatter, which cost as much as the delta
                index = None if len(rows) == x.shape[0] else torch.tensor(rows, device=x.device)
                result = self._apply_to_rows(result, x, index, add, remove, *args, **kwargs)
        return result

    def _apply_to_rows(self, result, x, index, add, remove, *args, **kwargs) -> torch.Tensor:
        """`result` with the deltas of `add` added and those of `remove` taken away, on the rows in `index` (every
        row where it is None)."""
        rows = x if index is None else x.index_select(0, index)
        delta = _signed_sum([self._delta_output(a, rows) for a in add], [self._delta_output(a, rows) for a in remove])
        if index is None:
            return result + delta.to(result.dtype)
        return result.index_add(0, index, delta.to(result.dtype))

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ----- merge -----------------------------------------------------------------------------------------

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas to the base weights, remembering how to undo it bit-exactly.

        A tied adapter only records the merge: its source layer adds the shared delta to the shared weight once.
        """
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self.owns(adapter):
                continue
            records = []
            for name, index, delta in self.merge_parts(adapter):
                target = getattr(self.get_base_layer(), name).data
                records.append((name, _merge_exactly(_contiguous(target), index, delta, safe_merge)))
            self._merge_restore[adapter] = records
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo all merges, last first; the base weights return to their exact original bits."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            records = dict(self._merge_restore.pop(adapter))
            for name, index, delta in self.merge_parts(adapter):
                target = getattr(self.get_base_layer(), name).data
                _unmerge_exactly(_contiguous(target), index, delta, records[name])

    def merge_parts(self, adapter: str) -> list[tuple[str, torch.Tensor | None, torch.Tensor]]:
        """``(base parameter name, flat index or None, delta values)`` to add, in the base parameter's layout."""
        parts = []
        if adapter not in self.graft_tied:
            indices = self._indices(adapter)
            if indices is not None:
                parts.append(("weight", indices, self.delta_parts(adapter)["graft_values"]))
            else:
                parts.append(("weight", None, self.get_delta_weight(adapter)))
        if adapter in self.graft_bias:
            parts.append(("bias", None, self.graft_bias[adapter]))
        return parts

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense delta of the weight, in the base weight's layout."""
        parts = self.delta_parts(adapter)
        if "graft_S" in parts:
            delta = (parts["graft_U"] * parts["graft_S"]) @ parts["graft_V"].T
        elif "graft_indices" in parts:
            delta = scatter_dense(parts["graft_indices"], parts["graft_values"], self.delta_shape)
        else:
            delta = parts["graft_values"]
        return delta.T if self.transposed_weight else delta

    # ----- install, pack and unpack ----------------------------------------------------------------------

    def _adapter_device_dtype(self, adapter: str, like: torch.Tensor) -> tuple[torch.device, torch.dtype, bool]:
        """Where new tensors of an adapter go: its current tensors' device/dtype/trainability, else the given one's."""
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter in container:
                current = container[adapter]
                return current.device, current.dtype, current.requires_grad
        return like.device, like.dtype, True

    def set_delta(
        self,
        adapter: str,
        *,
        lowrank: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        values: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        dense_rows_from: int | None = None,
    ) -> None:
        """Install an adapter's delta: `lowrank` (U, S, V), or `values` (+ flat `indices` when sparse), plus `bias`.

        Keeps the device, dtype and trainability of the adapter's current tensors (meta stays meta), and replaces
        whatever form the adapter had before.
        """
        first = lowrank[0] if lowrank is not None else values if values is not None else bias
        device, dtype, requires_grad = self._adapter_device_dtype(adapter, first)

        def parameter(tensor: torch.Tensor) -> nn.Parameter:
            if device.type == "meta":
                tensor = torch.empty(tensor.shape, dtype=dtype, device=device)
            return nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=requires_grad)

        for name in (*self.adapter_layer_names, "graft_indices"):
            container = getattr(self, name)
            if adapter in container:
                del container[adapter]
        self.graft_dense_rows_from.pop(adapter, None)
        self.graft_packed.pop(adapter, None)
        self._forget_caches()
        if lowrank is not None:
            self.graft_U[adapter], self.graft_S[adapter], self.graft_V[adapter] = (parameter(t) for t in lowrank)
        if values is not None:
            self.graft_values[adapter] = parameter(values)
        if indices is not None:
            self.graft_indices[adapter] = indices.to(device=device, dtype=torch.int64)
        if bias is not None:
            self.graft_bias[adapter] = parameter(bias)
        if dense_rows_from is not None:
            self.graft_dense_rows_from[adapter] = dense_rows_from

    def grow_rows(self, rows: int) -> None:
        """Follow the base weight growing to `rows` rows (added tokens): dense deltas get zero rows."""
        self.delta_shape = (rows, *self.delta_shape[1:])
        if isinstance(self.get_base_layer(), nn.Embedding):
            self.in_features = rows
        else:
            self.out_features = rows
        for adapter in list(self.graft_values.keys()):
            values = self.graft_values[adapter]
            if adapter not in self.graft_indices and values.shape[0] < rows:
                padding = values.data.new_zeros(rows - values.shape[0], *values.shape[1:])
                self.graft_values[adapter] = nn.Parameter(
                    torch.cat([values.data, padding]), requires_grad=values.requires_grad
                )
        self._forget_caches()

    def tie_to(self, source: GraftLayer, adapter: str) -> None:
        """Make `adapter`'s weight delta here the one held by `source` (tied weights): stored and merged once."""
        if tuple(source.delta_shape) != tuple(self.delta_shape):
            raise GraftConfigError(
                f"cannot tie a {tuple(self.delta_shape)} delta to a {tuple(source.delta_shape)} one: "
                "target_modules_to_tie must name modules that share the input embedding's weight"
            )
        object.__setattr__(self, "_tied_source", source)  # a plain reference, not a submodule
        for name in ("graft_U", "graft_S", "graft_V", "graft_values", "graft_indices"):
            container = getattr(self, name)
            if adapter in container:
                del container[adapter]
        self.graft_tied[adapter] = None
        self._forget_caches()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget_caches()

    def _forget_caches(self) -> None:
        """Drop what was derived from adapter tensors; called whenever an adapter's tensors are replaced."""
        self._csr_cache.clear()
        self._stack_cache.clear()

    def __repr__(self) -> str:
        return "graft." + nn.Module.__repr__(self)


class GraftLinear(nn.Module, GraftLayer):
    """``nn.Linear`` / ``Conv1D``: a low-rank delta when created for training, any form when loaded.

    With ``sparse_role=True`` (the output embedding) a trainable delta starts dense and is pruned when saved.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, rank: int, sparse_role: bool = False) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())
        self.delta_shape = (self.out_features, self.in_features)
        self.transposed_weight = self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.prune_on_save = sparse_role
        self.update_layer(adapter_name, config, rank=rank, inference_mode=config.inference_mode)

    # nn.Module's own forward and __repr__ come before GraftLayer's in the method resolution order
    forward = GraftLayer.forward
    __repr__ = GraftLayer.__repr__

    def update_layer(self, adapter_name: str, config, rank: int, inference_mode: bool = False) -> None:
        """Add (or reset) an adapter: a low-rank delta at `rank`, or a dense trainable one in the sparse role."""
        self.graft_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if self.prune_on_save:
            _init_sparse_role_delta(self, adapter_name, config)
        else:
            rank = min(rank, self.in_features, self.out_features)
            bound = 1.0 / math.sqrt(self.in_features)
            v = torch.empty(self.in_features, rank).uniform_(-bound, bound)
            if config.init_weights:
                u = torch.zeros(self.out_features, rank)
            else:
                u = torch.randn(self.out_features, rank) * (_RANDOM_DELTA_SCALE / math.sqrt(rank))
            self.set_delta(adapter_name, lowrank=(u, torch.ones(rank), v))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def rank(self, adapter: str) -> int:
        return self.graft_S[adapter].shape[0]

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """PEFT's convert_to_lora can take this adapter: a weight delta only (LoRA holds no bias delta)."""
        return adapter_name not in self.graft_bias and (adapter_name in self.graft_tied or self.owns(adapter_name))

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        has_weight_delta = adapter in self.graft_tied or adapter in self.graft_S or adapter in self.graft_values
        out = self._weight_delta_output(adapter, x) if has_weight_delta else None
        if adapter in self.graft_bias:
            bias = self.graft_bias[adapter]
            out = bias.expand(*x.shape[:-1], -1) if out is None else out + bias
        return out

    def _weight_delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        if adapter in self.graft_S:  # the common case first, with as few lookups as possible: this runs per layer
            v = self.graft_V[adapter]
            x = self._cast_input_dtype(x, v.dtype)
            if self.training:
                x = self.graft_dropout[adapter](x)
            return ((x @ v) * self.graft_S[adapter]) @ self.graft_U[adapter].T
        parts = self.delta_parts(adapter)
        if "graft_S" in parts:  # tied to a low-rank embedding delta
            x = self._cast_input_dtype(x, parts["graft_V"].dtype)
            return ((x @ parts["graft_V"]) * parts["graft_S"]) @ parts["graft_U"].T
        values = parts["graft_values"]
        x = self._cast_input_dtype(x, values.dtype)
        if self.training:
            x = self.graft_dropout[adapter](x)
        if "graft_indices" not in parts:
            return F.linear(x, values)
        rows, cols = self.delta_shape
        row_pointers, columns = _csr(self._source() if adapter in self.graft_tied else self, adapter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(row_pointers, columns, values, size=(rows, cols), check_invariants=False)
        return (matrix @ x.reshape(-1, cols).T).T.reshape(*x.shape[:-1], rows)

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Rows with one token each (decoding) run all their packs in one product per layer; see `_stacked_factors`.

        With a single token per row the per-pack products are too small to keep the CPU or GPU busy, so their count,
        not their size, sets the time; longer rows are cheaper grouped by pack, without the other packs' work.
        """
        one_token_per_row = x.shape[0] > 1 and x.numel() == x.shape[0] * self.in_features
        stacked = None
        if one_token_per_row and len(adapter_names) == x.shape[0] and not (self.merged or self.training):
            stacked = self._stacked_factors(adapter_names)
        if stacked is None:
            return super()._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        v_stacked, u_stacked, row_scales = stacked
        result = self.base_layer(x, *args, **kwargs)
        rows = self._cast_input_dtype(x.reshape(x.shape[0], -1), v_stacked.dtype)
        delta = ((rows @ v_stacked) * row_scales) @ u_stacked.T
        return result + delta.view(result.shape).to(result.dtype)

    def _stacked_factors(self, adapter_names: list[str]) -> tuple[torch.Tensor, ...] | None:
        """The V and U of the rows' packs side by side, and per row its pack's singular values (zero elsewhere).

        None when a row's pack here is not a plain low-rank delta, or a factor needs gradients. The stack is a copy
        of those packs' factors, cached until the row layout changes or a factor is replaced or modified.
        """
        layout = tuple(adapter_names)
        cached = self._stack_cache.get(layout)
        if cached is not None:
            return cached
        names = row_adapters(adapter_names, self.owns)
        if not names or any(a not in self.graft_S or a in self.graft_bias for a in names):
            return None
        factors = [(self.graft_U[a], self.graft_S[a], self.graft_V[a]) for a in names]
        if torch.is_grad_enabled() and any(t.requires_grad for trio in factors for t in trio):
            return None
        v_stacked = torch.cat([v for _, _, v in factors], dim=1)
        u_stacked = torch.cat([u for u, _, _ in factors], dim=1)
        # one row per pack holding its singular values in its own columns; row 0 (no delta) stays zero
        scales = v_stacked.new_zeros(len(names) + 1, v_stacked.shape[1])
        start = 0
        for slot, (_, s, _) in enumerate(factors, start=1):
            scales[slot, start : start + s.shape[0]] = s
            start += s.shape[0]
        row_scales = scales[row_slots(adapter_names, names, scales.device)]
        stacked = (v_stacked, u_stacked, row_scales)
        self._stack_cache.put(layout, [t for trio in factors for t in trio], stacked)
        return stacked


class GraftEmbedding(nn.Module, GraftLayer):
    """``nn.Embedding`` with a sparse, low-rank or (while training from zero) dense delta of its weight."""

    prune_on_save = True

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, rank: int) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        base = self.get_base_layer()
        self.delta_shape = (base.num_embeddings, base.embedding_dim)
        self.in_features, self.out_features = self.delta_shape
        self.update_layer(adapter_name, config, rank=rank, inference_mode=config.inference_mode)

    forward = GraftLayer.forward
    __repr__ = GraftLayer.__repr__

    def update_layer(self, adapter_name: str, config, rank: int, inference_mode: bool = False) -> None:
        """Add (or reset) an adapter: a dense trainable delta (pruned when saved). `rank` does not apply here."""
        self.graft_dropout[adapter_name] = nn.Identity()
        _init_sparse_role_delta(self, adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        parts = self.delta_parts(adapter)
        if "graft_S" in parts:  # rows of U, then through S·Vᵀ: never the dense delta
            out = (F.embedding(x, parts["graft_U"]) * parts["graft_S"]) @ parts["graft_V"].T
        elif "graft_indices" in parts:
            out = _gather_sparse_rows(self, adapter, x)
        else:
            out = F.embedding(x, parts["graft_values"])
        embed_scale = self._get_embed_scale()
        return out if embed_scale is None else out * embed_scale.to(out.dtype)


# the container of each norm parameter's deltas
_NORM_DELTAS = {"weight": "graft_values", "bias": "graft_bias"}


class GraftNorm(nn.Module, GraftLayer):
    """A norm (or any module with a 1-D ``weight``, and maybe ``bias``) with dense deltas of its parameters.

    A norm is not linear in its weight's input, so the forward runs the module with ``weight + delta`` instead of
    adding an output delta.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, rank: int) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        weight = self.get_base_layer().weight
        self.delta_shape = tuple(weight.shape)
        self.in_features = self.out_features = weight.shape[-1]
        self.update_layer(adapter_name, config, rank=rank, inference_mode=config.inference_mode)

    __repr__ = GraftLayer.__repr__

    def update_layer(self, adapter_name: str, config, rank: int, inference_mode: bool = False) -> None:
        """Add (or reset) an adapter: dense deltas of the norm's weight (and bias). `rank` does not apply here."""
        self.graft_dropout[adapter_name] = nn.Identity()
        make = torch.zeros if config.init_weights else (lambda *shape: torch.randn(*shape) * _RANDOM_DELTA_SCALE)
        bias = self.get_base_layer().bias if hasattr(self.get_base_layer(), "bias") else None
        self.set_delta(adapter_name, values=make(*self.delta_shape), bias=None if bias is None else make(*bias.shape))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: parameters are passed functionally (see _call_with), no lock
            return GraftLayer.forward(self, x, *args, **kwargs)
        # every call of the base norm runs under the lock, so none can see another thread's swapped parameters
        with _NORM_PARAMETER_LOCK:
            return GraftLayer.forward(self, x, *args, **kwargs)

    def _forward_with(
        self, x: torch.Tensor, adapters: list[str], *args: Any, remove: Sequence[str] = (), **kwargs: Any
    ) -> torch.Tensor:
        base = self.get_base_layer()
        parameters = {}
        for name, container_name in _NORM_DELTAS.items():
            container = getattr(self, container_name)
            shift = _signed_sum(
                [container[a] for a in adapters if a in container], [container[a] for a in remove if a in container]
            )
            if shift is not None:
                original = getattr(base, name)
                parameters[name] = original + shift.to(original.dtype)
        return self._call_with(parameters, x, *args, **kwargs)

    def _call_with(self, parameters: dict[str, torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any):
        """The base norm's output with some parameters replaced, for this call only (under the lock).

        torch.func.functional_call does the same, but costs about as much as the norm itself, twice per block.
        """
        if not parameters:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        if torch.compiler.is_compiling():  # torch.compile traces functional_call; it cannot trace the swap
            return torch.func.functional_call(base, parameters, (x, *args), kwargs, strict=False)
        saved = {name: base._parameters[name] for name in parameters}
        base._parameters.update(parameters)
        try:
            return self.base_layer(x, *args, **kwargs)
        finally:
            base._parameters.update(saved)

    def _apply_to_rows(self, result, x, index, add, remove, *args, **kwargs) -> torch.Tensor:
        if index is None:
            return self._forward_with(x, add, *args, remove=remove, **kwargs).to(result.dtype)
        rows = self._forward_with(x.index_select(0, index), add, *args, remove=remove, **kwargs)
        return result.index_copy(0, index, rows.to(result.dtype))

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """One call of the norm with per-row parameters (shape ``(rows, 1, …, features)``) where the norm broadcasts
        them, which the RMSNorms of transformers do; one call per pack otherwise.

        Whether a norm broadcasts is found on its first mixed batch, by comparing both ways on that batch.
        """
        grouped = super()._mixed_batch_forward
        if self._rows_broadcast is False or self.merged or len(adapter_names) != x.shape[0] or x.dim() < 2:
            return grouped(x, *args, adapter_names=adapter_names, **kwargs)
        shifts = self._row_shifts(adapter_names, x.dim())
        if shifts is None:
            return grouped(x, *args, adapter_names=adapter_names, **kwargs)
        base = self.get_base_layer()
        parameters = {name: getattr(base, name) + shift.to(getattr(base, name).dtype) for name, shift in shifts.items()}
        if self._rows_broadcast:
            return self._call_with(parameters, x, *args, **kwargs)
        expected = grouped(x, *args, adapter_names=adapter_names, **kwargs)
        try:
            output = self._call_with(parameters, x, *args, **kwargs)
        except RuntimeError:  # e.g. F.layer_norm insists on a weight of the normalized shape
            self._rows_broadcast = False
        else:
            self._rows_broadcast = output.shape == expected.shape and torch.allclose(
                output.float(), expected.float(), rtol=1e-4, atol=1e-6
            )
        return expected

    def _row_shifts(self, adapter_names: list[str], dims: int) -> dict[str, torch.Tensor] | None:
        """Per row, its pack's weight (and bias) delta shaped to broadcast over the row; None if no row has one."""
        layout = (tuple(adapter_names), dims)
        cached = self._stack_cache.get(layout)
        if cached is not None:
            return {name: shift for name, shift in zip(("weight", "bias"), cached, strict=True) if shift is not None}
        names = row_adapters(adapter_names, self.owns)
        deltas = [self.graft_values[a] for a in names if a in self.graft_values]
        biases = [self.graft_bias[a] for a in names if a in self.graft_bias]
        if not names or (torch.is_grad_enabled() and any(t.requires_grad for t in deltas + biases)):
            return None
        shifts = {}
        for name, present in (("weight", deltas), ("bias", biases)):
            if present:
                container, zero = getattr(self, _NORM_DELTAS[name]), present[0].new_zeros(present[0].shape)
                table = torch.stack([zero] + [container.get(a, zero) for a in names])
                rows = table[row_slots(adapter_names, names, table.device)]
                shifts[name] = rows.view(len(adapter_names), *([1] * (dims - 2)), -1)
        self._stack_cache.put(layout, deltas + biases, (shifts.get("weight"), shifts.get("bias")))
        return shifts


def graft_layers(model: nn.Module) -> Iterator[tuple[str, GraftLayer]]:
    """``(module name, layer)`` of every GRAFT layer of a model (FSDP's wrapper prefix removed)."""
    for name, module in model.named_modules():
        if isinstance(module, GraftLayer):
            yield name.removeprefix("_fsdp_wrapped_module."), module


def _signed_sum(added: list[torch.Tensor], removed: list[torch.Tensor]) -> torch.Tensor | None:
    """``Σ added − Σ removed`` without the extra operations ``sum()`` adds (its 0 start, a ``- 0``); None if both
    are empty. These run once per layer per forward, where each saved operation counts."""
    total = None
    for tensor in added:
        total = tensor if total is None else total + tensor
    for tensor in removed:
        total = -tensor if total is None else total - tensor
    return total


def _init_sparse_role_delta(layer: GraftLayer, adapter: str, config) -> None:
    shape = layer.delta_shape
    if config.init_weights:
        # trainable from zero: which entries matter is unknown until training, so hold it dense
        layer.set_delta(adapter, values=torch.zeros(shape))
        return
    numel = math.prod(shape)
    count = max(1, math.ceil(config.embed_density * numel))
    indices = torch.randperm(numel)[:count].sort().values
    layer.set_delta(adapter, values=torch.randn(count) * _RANDOM_DELTA_SCALE, indices=indices)


def _csr(layer: GraftLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers and column indices of a sparse adapter, cached until its indices change."""
    indices = layer.graft_indices[adapter]
    key = (indices.data_ptr(), indices._version, indices.device, indices.numel(), layer.delta_shape)
    cached = layer._csr_cache.get(adapter)
    if cached is None or cached[0] != key:
        rows, cols = layer.delta_shape
        cached = (key, csr_row_pointers(indices, rows, cols), indices % cols)
        layer._csr_cache[adapter] = cached
    return cached[1], cached[2]


def _gather_sparse_rows(layer: GraftLayer, adapter: str, token_ids: torch.Tensor) -> torch.Tensor:
    """Rows `token_ids` of a sparse delta, built from the CSR segments of just those rows."""
    values = layer.graft_values[adapter]
    row_pointers, columns = _csr(layer, adapter)
    flat_ids = token_ids.reshape(-1)
    starts = row_pointers[flat_ids]
    counts = row_pointers[flat_ids + 1] - starts
    token = torch.repeat_interleave(torch.arange(flat_ids.numel(), device=flat_ids.device), counts)
    segment_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    entry = torch.repeat_interleave(starts, counts) + torch.arange(token.numel(), device=flat_ids.device)
    entry = entry - segment_start
    cols = layer.delta_shape[1]
    out = values.new_zeros(flat_ids.numel(), cols).index_put((token, columns[entry]), values[entry])
    return out.view(*token_ids.shape, cols)


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise ValueError("GRAFT can only merge into contiguous base weights")
    return tensor


def _merge_exactly(
    weight: torch.Tensor, index: torch.Tensor | None, delta: torch.Tensor, check_finite: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add `delta` to the flattened `weight` (at `index`, or everywhere) in float32, rounding once.

    Returns the positions and original values of the entries where subtracting the delta again would not give back
    the original bits, so that unmerging is exact.
    """
    flat = weight.view(-1)
    delta = delta.detach().reshape(-1).to(device=flat.device, dtype=torch.float32)
    original = flat.clone() if index is None else flat[index]
    merged = (original.float() + delta).to(flat.dtype)
    if check_finite and not bool(torch.isfinite(merged).all()):
        raise ValueError("NaNs or Infs detected in the merged weights; the adapter seems to be broken")
    mismatch = ((merged.float() - delta).to(flat.dtype) != original).nonzero().squeeze(1)
    positions = mismatch if index is None else index[mismatch]
    if index is None:
        flat.copy_(merged)
    else:
        flat[index] = merged
    return positions, original[mismatch]


def _unmerge_exactly(
    weight: torch.Tensor,
    index: torch.Tensor | None,
    delta: torch.Tensor,
    restore: tuple[torch.Tensor, torch.Tensor],
) -> None:
    flat = weight.view(-1)
    delta = delta.detach().reshape(-1).to(device=flat.device, dtype=torch.float32)
    current = flat if index is None else flat[index]
    unmerged = (current.float() - delta).to(flat.dtype)
    if index is None:
        flat.copy_(unmerged)
    else:
        flat[index] = unmerged
    positions, values = restore
    flat[positions] = values
