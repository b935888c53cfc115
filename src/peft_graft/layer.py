"""GRAFT tuner layers.

* :class:`GraftLinear` wraps ``nn.Linear`` or transformers' ``Conv1D`` with a low-rank delta ``U·diag(S)·Vᵀ``;
  the forward adds ``((x·V)·S)·Uᵀ`` and never builds the dense delta.
* :class:`GraftEmbedding` and :class:`GraftSparseLinear` (used for ``lm_head``) carry a sparse delta: flat indices
  plus values. A freshly initialized trainable delta is held dense and pruned to ``embed_density`` when saved.

Live adapter tensors are floats; the packed, quantized form exists only in files. A pack loaded from disk remembers
its packed tensors, so saving it again unchanged writes the same bytes.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compress import csr_row_pointers, scatter_dense
from .errors import PackFormatError
from .pack_format import PackingPolicy, decode_lowrank, decode_sparse, encode_lowrank, encode_sparse

BASE_ADAPTER = "__base__"
"""Name to put in ``adapter_names`` for rows that should run on the base model alone."""

# Scale of the random delta made with init_weights=False (tests only): visible, but far from dominating the base.
_RANDOM_DELTA_SCALE = 0.1


@dataclass(frozen=True)
class PackedDelta:
    """The packed tensors an adapter was loaded from, and the policy they were written with."""

    policy: PackingPolicy
    tensors: dict[str, torch.Tensor]


class GraftLayer(BaseTunerLayer):
    """State shared by all GRAFT layers: per-adapter containers in PEFT's layout."""

    adapter_layer_names = ("graft_U", "graft_S", "graft_V", "graft_values")
    other_param_names = ("graft_indices", "graft_dropout", "graft_packed")

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.graft_U = nn.ParameterDict({})
        self.graft_S = nn.ParameterDict({})
        self.graft_V = nn.ParameterDict({})
        self.graft_values = nn.ParameterDict({})
        self.graft_indices = BufferDict({}, persistent=True)
        self.graft_dropout = nn.ModuleDict({})
        self.graft_packed: dict[str, PackedDelta] = {}
        self._merge_restore: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._csr_cache: dict[str, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = _get_in_out_features(self.get_base_layer())


class _GraftModule(nn.Module, GraftLayer):
    """Forward, mixed-batch and merge logic common to every GRAFT layer.

    Subclasses define which adapters they hold (`_owns`), the delta's contribution to the output (`_delta_output`),
    the delta in the base weight's layout (`_weight_delta`), and how an adapter is packed and unpacked.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            if self.merged:
                raise ValueError("Cannot pass `adapter_names` while adapters are merged; call unmerge_adapter() first.")
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if self._owns(adapter):
                result = result + self._delta_output(adapter, x).to(result.dtype)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        if len(adapter_names) != x.shape[0]:
            raise ValueError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows; "
                "pass one adapter name per row"
            )
        result = self.base_layer(x, *args, **kwargs)
        rows_by_adapter: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            rows_by_adapter.setdefault(name, []).append(row)
        for name, rows in rows_by_adapter.items():
            if name == BASE_ADAPTER or not self._owns(name):
                continue
            index = torch.tensor(rows, device=x.device)
            delta = self._delta_output(name, x.index_select(0, index))
            result = result.index_add(0, index, delta.to(result.dtype))
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas to the base weight, remembering how to undo it bit-exactly."""
        for adapter in check_adapters_to_merge(self, adapter_names):
            if not self._owns(adapter):
                continue
            index, delta = self._weight_delta(adapter)
            self._merge_restore[adapter] = _merge_exactly(self._base_weight_data(), index, delta, safe_merge)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Undo all merges, last first; the base weight returns to its exact original bits."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            index, delta = self._weight_delta(adapter)
            _unmerge_exactly(self._base_weight_data(), index, delta, self._merge_restore.pop(adapter))

    def _base_weight_data(self) -> torch.Tensor:
        weight = self.get_base_layer().weight.data
        if not weight.is_contiguous():
            raise ValueError("GRAFT can only merge into a contiguous base weight")
        return weight

    def _owns(self, adapter: str) -> bool:
        raise NotImplementedError

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _weight_delta(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(flat_index, values)`` to add to the flattened base weight; index None means the whole weight."""
        raise NotImplementedError

    def pack_adapter(self, adapter: str, floats: dict[str, torch.Tensor], policy: PackingPolicy) -> dict[str, Any]:
        """Packed tensors (keys relative to this module) for the adapter's float tensors `floats`."""
        reused = self._reuse_loaded_pack(adapter, floats, policy)
        if reused is not None:
            return reused
        return {name: tensor.cpu() for name, tensor in self._encode(floats, policy).items()}

    def unpack_adapter(self, adapter: str, tensors: dict[str, torch.Tensor], policy: PackingPolicy) -> dict[str, Any]:
        """Decode packed tensors, once, into float tensors in the adapter's dtype, shaped like its containers."""
        dtype = next(
            getattr(self, name)[adapter].dtype for name in self.adapter_layer_names if adapter in getattr(self, name)
        )
        floats = self._decode(tensors, dtype)
        self._accept_decoded(adapter, floats)
        self.graft_packed[adapter] = PackedDelta(policy, {name: t.cpu() for name, t in tensors.items()})
        return floats

    def _reuse_loaded_pack(
        self, adapter: str, floats: dict[str, torch.Tensor], policy: PackingPolicy
    ) -> dict[str, torch.Tensor] | None:
        """The tensors this adapter was loaded from, if its floats still equal their decoding under `policy`."""
        packed = self.graft_packed.get(adapter)
        if packed is None or packed.policy != policy:
            return None
        dtype = next(tensor.dtype for tensor in floats.values() if tensor.is_floating_point())
        decoded = self._decode(packed.tensors, dtype)
        if decoded.keys() != floats.keys():
            return None
        for name, tensor in floats.items():
            if not torch.equal(decoded[name], tensor.detach().to(decoded[name].device)):
                return None
        return dict(packed.tensors)

    def _encode(self, floats: dict[str, torch.Tensor], policy: PackingPolicy) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _accept_decoded(self, adapter: str, floats: dict[str, torch.Tensor]) -> None:
        """Check decoded tensors against this layer (or resize its containers) before load_state_dict fills them."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return "graft." + super().__repr__()


class GraftLinear(_GraftModule):
    """``nn.Linear`` / ``Conv1D`` with a low-rank delta: U (out×r), S (r), V (in×r)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, rank: int) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, rank=rank, inference_mode=config.inference_mode)

    def update_layer(self, adapter_name: str, config, rank: int, inference_mode: bool = False) -> None:
        rank = min(rank, self.in_features, self.out_features)
        self.graft_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        bound = 1.0 / math.sqrt(self.in_features)
        v = torch.empty(self.in_features, rank).uniform_(-bound, bound)
        if config.init_weights:
            u = torch.zeros(self.out_features, rank)
        else:
            u = torch.randn(self.out_features, rank) * (_RANDOM_DELTA_SCALE / math.sqrt(rank))
        self.graft_U[adapter_name] = nn.Parameter(u)
        self.graft_S[adapter_name] = nn.Parameter(torch.ones(rank))
        self.graft_V[adapter_name] = nn.Parameter(v)
        self.graft_packed.pop(adapter_name, None)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def rank(self, adapter: str) -> int:
        return self.graft_S[adapter].shape[0]

    def _owns(self, adapter: str) -> bool:
        return adapter in self.graft_S

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        u, s, v = self.graft_U[adapter], self.graft_S[adapter], self.graft_V[adapter]
        x = self._cast_input_dtype(x, u.dtype)
        return ((self.graft_dropout[adapter](x) @ v) * s) @ u.T

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The dense delta in the base weight's layout ((out, in) for Linear, (in, out) for Conv1D)."""
        u, s, v = self.graft_U[adapter], self.graft_S[adapter], self.graft_V[adapter]
        delta = (u * s) @ v.T
        return delta.T if self.fan_in_fan_out else delta

    def _weight_delta(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, self.get_delta_weight(adapter)

    def _encode(self, floats: dict[str, torch.Tensor], policy: PackingPolicy) -> dict[str, torch.Tensor]:
        return encode_lowrank(
            floats["graft_U"], floats["graft_S"], floats["graft_V"], policy.precision_bands, policy.group_size
        )

    def _accept_decoded(self, adapter: str, floats: dict[str, torch.Tensor]) -> None:
        expected = (self.out_features, self.in_features, self.rank(adapter))
        found = (floats["graft_U"].shape[0], floats["graft_V"].shape[0], floats["graft_S"].shape[0])
        if found != expected:
            raise PackFormatError(
                f"the pack stores a rank-{found[2]} delta of shape {found[:2]}, but this layer expects rank "
                f"{expected[2]} and shape {expected[:2]}; r / rank_pattern in adapter_config.json must match "
                "the weights, and the pack must belong to this base model"
            )

    def _decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        u, s, v = decode_lowrank(tensors, dtype)
        return {"graft_U": u, "graft_S": s, "graft_V": v}


class _SparseGraftModule(_GraftModule):
    """A sparse delta over a (rows, cols) matrix laid out like the base weight."""

    delta_shape: tuple[int, int]

    def update_layer(self, adapter_name: str, config, inference_mode: bool = False) -> None:
        self.graft_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        rows, cols = self.delta_shape
        if config.init_weights:
            # Trainable from zero: which entries matter is unknown until training, so hold it dense.
            self.set_sparse_delta(adapter_name, torch.zeros(rows, cols), None)
        else:
            count = max(1, math.ceil(config.embed_density * rows * cols))
            indices = torch.randperm(rows * cols)[:count].sort().values
            self.set_sparse_delta(adapter_name, torch.randn(count) * _RANDOM_DELTA_SCALE, indices)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_sparse_delta(self, adapter: str, values: torch.Tensor, indices: torch.Tensor | None) -> None:
        """Install a delta: dense (rows, cols) `values`, or 1-D `values` at flat row-major `indices`.

        Keeps the device, dtype and trainability of the adapter's current tensors, if it has any.
        """
        current = self.graft_values.get(adapter)
        device = current.device if current is not None else values.device
        dtype = current.dtype if current is not None else values.dtype
        requires_grad = current.requires_grad if current is not None else True
        if device.type == "meta":
            values = torch.empty(values.shape, dtype=dtype, device=device)
        self.graft_values[adapter] = nn.Parameter(values.to(device=device, dtype=dtype), requires_grad=requires_grad)
        if indices is None:
            if adapter in self.graft_indices:
                del self.graft_indices[adapter]
        else:
            self.graft_indices[adapter] = indices.to(device=device, dtype=torch.int64)
        self.graft_packed.pop(adapter, None)

    def _owns(self, adapter: str) -> bool:
        return adapter in self.graft_values

    def _indices(self, adapter: str) -> torch.Tensor | None:
        """Flat indices of a sparse adapter, or None while it is held dense."""
        return self.graft_indices[adapter] if adapter in self.graft_indices else None  # noqa: SIM401 (no .get)

    def _csr(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR row pointers and column indices of a sparse adapter, cached until its indices change."""
        indices = self.graft_indices[adapter]
        key = (indices.data_ptr(), indices._version, indices.device)
        cached = self._csr_cache.get(adapter)
        if cached is None or cached[0] != key:
            rows, cols = self.delta_shape
            cached = (key, csr_row_pointers(indices, rows, cols), indices % cols)
            self._csr_cache[adapter] = cached
        return cached[1], cached[2]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        indices, values = self._indices(adapter), self.graft_values[adapter]
        return values if indices is None else scatter_dense(indices, values, self.delta_shape)

    def _weight_delta(self, adapter: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        return self._indices(adapter), self.graft_values[adapter]

    def _encode(self, floats: dict[str, torch.Tensor], policy: PackingPolicy) -> dict[str, torch.Tensor]:
        return encode_sparse(
            floats["graft_values"], floats.get("graft_indices"), self.delta_shape, policy.embed_density
        )

    def _accept_decoded(self, adapter: str, floats: dict[str, torch.Tensor]) -> None:
        # the number of kept entries is only known from the file, so the containers take its shape
        self.set_sparse_delta(adapter, floats["graft_values"], floats.get("graft_indices"))

    def _decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        values, indices = decode_sparse(tensors, self.delta_shape, dtype)
        return {"graft_values": values} if indices is None else {"graft_values": values, "graft_indices": indices}


class GraftEmbedding(_SparseGraftModule):
    """``nn.Embedding`` with a sparse delta over its (num_embeddings, embedding_dim) weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        base = self.get_base_layer()
        self.delta_shape = (base.num_embeddings, base.embedding_dim)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        if self._indices(adapter) is None:
            out = F.embedding(x, self.graft_values[adapter])
        else:
            out = self._gather_sparse_rows(adapter, x)
        embed_scale = self._get_embed_scale()
        return out if embed_scale is None else out * embed_scale.to(out.dtype)

    def _gather_sparse_rows(self, adapter: str, token_ids: torch.Tensor) -> torch.Tensor:
        """Rows `token_ids` of the sparse delta, built from the CSR segments of just those rows."""
        values = self.graft_values[adapter]
        row_pointers, columns = self._csr(adapter)
        flat_ids = token_ids.reshape(-1)
        starts = row_pointers[flat_ids]
        counts = row_pointers[flat_ids + 1] - starts
        token = torch.repeat_interleave(torch.arange(flat_ids.numel(), device=flat_ids.device), counts)
        segment_start = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        entry = torch.repeat_interleave(starts, counts) + torch.arange(token.numel(), device=flat_ids.device)
        entry = entry - segment_start
        out = values.new_zeros(flat_ids.numel(), self.delta_shape[1]).index_put((token, columns[entry]), values[entry])
        return out.view(*token_ids.shape, self.delta_shape[1])


class GraftSparseLinear(_SparseGraftModule):
    """``nn.Linear`` (the output embedding, ``lm_head``) with a sparse delta over its (out, in) weight."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config) -> None:
        super().__init__()
        GraftLayer.__init__(self, base_layer)
        self.delta_shape = (self.out_features, self.in_features)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def _delta_output(self, adapter: str, x: torch.Tensor) -> torch.Tensor:
        values = self.graft_values[adapter]
        x = self.graft_dropout[adapter](self._cast_input_dtype(x, values.dtype))
        if self._indices(adapter) is None:
            return F.linear(x, values)
        rows, cols = self.delta_shape
        row_pointers, columns = self._csr(adapter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            matrix = torch.sparse_csr_tensor(row_pointers, columns, values, size=(rows, cols), check_invariants=False)
        flat = x.reshape(-1, cols)
        return (matrix @ flat.T).T.reshape(*x.shape[:-1], rows)


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
