"""Routers that pick one SkillPack per query (GraftLLM's top-1 routing).

* :class:`GraftRouter`: the paper's classifier, a small feed-forward network over a query embedding, trained from a
  few dozen labelled prompts per pack. Its default embedding is the mean-pooled last hidden state of the *base*
  model (no pack applied), computed with the model the packs already sit on, so no second model is loaded.
* :class:`ManualRouter`: the paper's manual task-type assignment, a mapping (or function) from task type to pack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .._mixed_batch import BASE_ADAPTER, rows_named
from ..errors import RoutingError


class QueryEmbedder(Protocol):
    """Anything that turns a batch of queries into one vector per query."""

    def __call__(self, texts: Sequence[str]) -> torch.Tensor: ...


# The share of decoder layers the router's embedding runs by default. Measured on SmolLM2-135M (30 layers), ten
# reasoning-gym tasks, 40 training prompts each: held-out routing accuracy is already 100 % after layer 1 (README,
# Routing). A quarter of the layers costs a quarter of the forward, with a margin for skills that differ in meaning
# more than in form.
ROUTING_DEPTH = 0.25


class BaseModelEmbedder:
    """Mean-pooled hidden state of the base model, with every pack switched off for these rows only.

    `layers` is how deep the query goes: a number of decoder layers, a share of them (the default, a quarter), or
    ``None`` for all. Only those layers run (then the final norm): a query's task shows early in the network, and the
    router's cost per query is that share of a forward. Routers saved with an earlier version (no ``layers`` in their
    spec) embed with every layer, as they were trained. The packs stay loaded: rows are marked ``__base__`` for this
    call (per thread), so concurrent requests that do use packs are unaffected.
    """

    spec_type = "base_mean_pool"

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_length: int = 256,
        batch_size: int = 32,
        layers: int | float | None = ROUTING_DEPTH,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self._decoder: nn.Module | None = None  # the decoder, cut to `layers` (built on first use)
        self.layers = layers

    @property
    def layers(self) -> int | float | None:
        return self._layers

    @layers.setter
    def layers(self, value: int | float | None) -> None:
        count = isinstance(value, int) and value >= 1
        if not (value is None or count or (isinstance(value, float) and 0 < value <= 1)):
            raise RoutingError(f"layers must be a count >= 1, a share in (0, 1], or None (all), got {value!r}")
        self._layers, self._decoder = value, None

    @property
    def spec(self) -> dict[str, Any]:
        spec = {"type": self.spec_type, "max_length": self.max_length}
        count = self._layer_count()
        if count is not None:
            spec["layers"] = count
        return spec

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            raise RoutingError("there are no queries to embed")
        vectors = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
            )
            vectors.append(self.embed_tokens(encoded["input_ids"], encoded["attention_mask"]))
        return torch.cat(vectors)

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of already tokenized queries (any padding side)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        with rows_named([BASE_ADAPTER] * input_ids.shape[0]), torch.no_grad():
            hidden = self._hidden_state(input_ids, mask).float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def _base_decoder(self) -> nn.Module | None:
        """The decoder under the language-model head (None for a model without that split)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder = getattr(model, "base_model", None)
        return decoder if isinstance(decoder, nn.Module) and decoder is not model else None

    def _layer_count(self) -> int | None:
        """`layers` as a number of decoder layers (None: all, or a share of a model with no decoder to cut)."""
        if self._layers is None or isinstance(self._layers, int):
            return self._layers
        decoder = self._base_decoder()
        if decoder is None:
            return None
        return max(1, math.ceil(self._layers * len(_layer_stack(decoder)[1])))

    def _hidden_state(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's (normed) hidden states after `layers` layers. The decoder is run without the language-model
        head, whose logits over the vocabulary would cost a sixth of the forward for nothing."""
        decoder = self._base_decoder()
        count = self._layer_count()
        if decoder is None:
            if count is not None:
                raise RoutingError(f"layers={count} needs a model with a separate decoder (model.base_model)")
            return self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        if count is not None:
            if self._decoder is None:
                self._decoder = _first_layers(decoder, count)
            decoder = self._decoder
        return decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state


def _layer_stack(decoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's list of layers (``layers`` in Llama-style models, ``h`` in GPT-2) and its attribute name."""
    for name, child in decoder.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            return name, child
    raise RoutingError(f"{type(decoder).__name__} has no list of decoder layers to cut")


def _first_layers(decoder: nn.Module, count: int) -> nn.Module:
    """A shallow copy of `decoder` whose layer list holds only its first `count` layers. The copy shares every
    weight and leaves `decoder` untouched, so generation may run on the full model in another thread meanwhile."""
    import copy

    name, stack = _layer_stack(decoder)
    if not 1 <= count <= len(stack):
        raise RoutingError(f"layers must be between 1 and {len(stack)} (the decoder's layers), got {count}")
    cut = copy.copy(decoder)
    cut._modules = dict(decoder._modules)  # copy.copy shares the children's dict: replace the list in the copy only
    cut._modules[name] = nn.ModuleList(list(stack)[:count])
    return cut


class GraftRouter(nn.Module):
    """A feed-forward classifier from query embeddings to one of `labels`, trained with a plain torch loop.

    Embeddings are standardized with the training set's mean and spread. Labels can be masked (a removed pack is
    never predicted) without retraining.
    """

    def __init__(self, embedding_dim: int, labels: Sequence[str], hidden_size: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if not labels:
            raise RoutingError("a router needs at least one label")
        if len(set(labels)) != len(labels):
            raise RoutingError(f"router labels must be unique, got {list(labels)}")
        self.labels = list(labels)
        self.embedding_dim, self.hidden_size, self.dropout = embedding_dim, hidden_size, dropout
        self.network = nn.Sequential(
            nn.Linear(embedding_dim, hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, len(labels)),
        )
        self.register_buffer("mean", torch.zeros(embedding_dim))
        self.register_buffer("scale", torch.ones(embedding_dim))
        self.register_buffer("active", torch.ones(len(labels), dtype=torch.bool))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        logits = self.network((embeddings.float() - self.mean) / self.scale)
        return logits.masked_fill(~self.active, float("-inf"))

    def fit(
        self,
        embeddings: torch.Tensor,
        targets: torch.Tensor,
        *,
        steps: int = 300,
        learning_rate: float = 3e-3,
        weight_decay: float = 1e-2,
        seed: int = 0,
    ) -> list[float]:
        """Train on (embedding, label index) pairs, full batch; returns the losses."""
        if embeddings.shape[0] != targets.shape[0] or embeddings.shape[0] == 0:
            raise RoutingError("fit needs as many targets as embeddings, and at least one of each")
        torch.manual_seed(seed)
        self.mean.copy_(embeddings.float().mean(0))
        self.scale.copy_(embeddings.float().std(0, unbiased=False).clamp(min=1e-6))
        optimizer = torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.train()
        losses = []
        for _ in range(steps):
            loss = nn.functional.cross_entropy(self(embeddings), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        self.eval()
        if not math.isfinite(losses[-1]):
            raise RoutingError("router training diverged; lower the learning rate")
        return losses

    def predict(self, embeddings: torch.Tensor) -> list[tuple[str, float]]:
        """Top-1 label and its probability for each embedding."""
        weight = next(self.parameters())
        with torch.no_grad():  # the embeddings come from the base model, which may sit elsewhere
            probabilities = self(embeddings.to(weight.device, weight.dtype)).softmax(-1)
        best = probabilities.max(-1)
        return [(self.labels[int(i)], float(p)) for p, i in zip(best.values, best.indices, strict=True)]

    def config(self) -> dict[str, Any]:
        return {
            "embedding_dim": self.embedding_dim,
            "hidden_size": self.hidden_size,
            "dropout": self.dropout,
            "labels": self.labels,
        }

    @property
    def output_layer(self) -> nn.Linear:
        """The last layer: one output row per label."""
        return self.network[-1]

    def with_label(self, label: str) -> GraftRouter:
        """A copy with one more label, masked (never predicted) until the router is refitted with examples for it."""
        grown = GraftRouter(self.embedding_dim, [*self.labels, label], self.hidden_size, self.dropout)
        with torch.no_grad():
            self._copy_into(grown, list(range(len(self.labels))))
            grown.active[-1] = False
        return grown.eval()

    def without_label(self, label: str) -> GraftRouter:
        """A copy without `label`; the other labels keep their outputs exactly."""
        keep = [index for index, name in enumerate(self.labels) if name != label]
        shrunk = GraftRouter(self.embedding_dim, [self.labels[i] for i in keep], self.hidden_size, self.dropout)
        with torch.no_grad():
            self._copy_into(shrunk, keep)
        return shrunk.eval()

    def _copy_into(self, other: GraftRouter, rows: list[int]) -> None:
        """Copy everything into `other`, whose first len(rows) labels are this router's labels `rows`."""
        for name in ("mean", "scale"):
            getattr(other, name).copy_(getattr(self, name))
        for mine, theirs in zip(self.network[:-1].parameters(), other.network[:-1].parameters(), strict=True):
            theirs.copy_(mine)
        index = torch.tensor(rows, dtype=torch.long)
        count = len(rows)
        other.output_layer.weight[:count] = self.output_layer.weight[index]
        other.output_layer.bias[:count] = self.output_layer.bias[index]
        other.active[:count] = self.active[index]
        if other.output_layer.weight.shape[0] > count:  # a new label starts at zero, and masked
            other.output_layer.weight[count:] = 0
            other.output_layer.bias[count:] = 0


class ManualRouter:
    """Task type → pack, from a mapping or a function (deterministic; the paper's manual assignment)."""

    def __init__(self, assignment: Mapping[str, str] | Callable[[str], str]) -> None:
        self.assignment = assignment

    def __call__(self, task_type: str) -> str:
        if callable(self.assignment):
            return self.assignment(task_type)
        if task_type not in self.assignment:
            known = ", ".join(sorted(self.assignment))
            raise RoutingError(f"no pack is assigned to task type {task_type!r}; known task types: {known}")
        return self.assignment[task_type]
