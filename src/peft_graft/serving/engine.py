"""The embedded serving engine: continuous batching of generation requests over one PEFT model, each row with its own
pack (a mixed batch), one shared KV cache, and sampling per row.

One scheduler thread owns the model. Each step it admits waiting requests (their prompts prefilled together,
left-padded), appends their cache rows to the running batch, decodes one token for every running row, and retires the
rows that finished or were cancelled. Padding is masked and every row keeps its own position ids, so what a row
generates does not depend on what runs beside it: a greedy request gets the tokens it would get alone.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._mixed_batch import BASE_ADAPTER
from ..errors import GenerationParameterError, ServerBusyError, UnknownModelError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (OpenAI's meanings and ranges). ``temperature=0`` is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0.0 <= self.temperature <= 2.0,
            "top_p": 0.0 < self.top_p <= 1.0,
            "top_k": self.top_k >= 0,
            "presence_penalty": -2.0 <= self.presence_penalty <= 2.0,
            "frequency_penalty": -2.0 <= self.frequency_penalty <= 2.0,
            "stop": len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop),
        }
        for name, valid in checks.items():
            if not valid:
                raise GenerationParameterError(
                    f"{name}={getattr(self, name)!r} is out of range (max_tokens >= 1, temperature in [0, 2], "
                    "top_p in (0, 1], top_k >= 0, penalties in [-2, 2], at most 4 non-empty stop strings)",
                    field=name,
                )

    @property
    def greedy(self) -> bool:
        # below 1e-5 (vLLM's threshold too) dividing the logits by the temperature overflows: that is greedy anyway
        return self.temperature < 1e-5 or self.top_k == 1


@dataclass(frozen=True)
class TokenEvent:
    """A generated token and the text it adds (empty while held back: an unfinished character or a possible stop)."""

    token_id: int
    text: str


@dataclass(frozen=True)
class FinishEvent:
    """The request is done: ``finish_reason`` is ``"stop"`` (end of turn or a stop string) or ``"length"``."""

    finish_reason: str
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    error: BaseException


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass(eq=False)  # rows are compared by identity (the queue removes the very row cancelled)
class _Row:
    """One request in the engine: its prompt, pack, sampling state, and what it generated so far."""

    prompt: list[int]
    adapter: str
    params: SamplingParams
    listener: Callable[[Event], None]
    generator: torch.Generator
    decoder: IncrementalDecoder
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already sent
    position: int = 0  # real tokens in the cache (prompt + fed), the next token's position id
    cancelled: bool = False
    done: bool = False

    def send(self, event: Event) -> None:
        try:
            self.listener(event)
        except Exception:  # a broken listener must not stop the engine
            logger.exception("a generation listener failed; its request is dropped")
            self.cancelled = True


class GenerationHandle:
    """A submitted request. Its events reach the listener from the engine's thread; :meth:`cancel` drops the row at
    the next step (e.g. when the client went away)."""

    def __init__(self, row: _Row, engine: GenerationEngine) -> None:
        self._row, self._engine = row, engine

    def cancel(self) -> None:
        self._row.cancelled = True
        self._engine._drop(self._row)

    @property
    def done(self) -> bool:
        return self._row.done


class GenerationEngine:
    """Continuous batching over `model` (a PeftModel with GRAFT packs, or any causal LM when every request names
    ``"__base__"``).

    `max_batch` rows decode together; up to `max_queue` more wait, and a request beyond that raises
    :class:`~peft_graft.ServerBusyError`. Close the engine (or use it as a context manager) to stop its thread.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 16, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 0:
            raise GenerationParameterError("max_batch must be >= 1 and max_queue >= 0", field="max_batch")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        config = model.config
        self._config = config
        self.max_length = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.adapters = frozenset(getattr(model, "peft_config", {}))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_token_ids), 0)
        self._pad = int(pad)
        self.max_batch = max_batch if _full_attention_cache(config) else 1
        if self.max_batch != max_batch:
            logger.warning("this model's cache has sliding-window layers: the engine runs one request at a time")
        self._waiting: deque[_Row] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._condition = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="peft-graft-engine", daemon=True)
        self._thread.start()

    # ----- requests -----------------------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        adapter: str,
        params: SamplingParams,
        listener: Callable[[Event], None],
    ) -> GenerationHandle:
        """Queue one request; its events go to `listener` (called from the engine thread: keep it short)."""
        prompt = [int(t) for t in prompt_ids]
        if adapter != BASE_ADAPTER and adapter not in self.adapters:
            raise UnknownModelError(
                f"no pack named {adapter!r} is loaded; loaded: {', '.join(sorted(self.adapters)) or 'none'}",
                model=adapter,
            )
        if not prompt:
            raise GenerationParameterError("the prompt is empty", field="prompt")
        if self.max_length is not None and len(prompt) + params.max_tokens > self.max_length:
            raise GenerationParameterError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_length} tokens: shorten the prompt or lower max_tokens",
                field="max_tokens",
            )
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        row = _Row(prompt, adapter, params, listener, generator, IncrementalDecoder(self.tokenizer))
        with self._condition:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._rows)):
                raise ServerBusyError(
                    f"the queue is full ({self.max_queue} requests wait for {self.max_batch} running): retry later"
                )
            self._waiting.append(row)
            self._condition.notify()
        return GenerationHandle(row, self)

    def generate(self, prompt_ids: Sequence[int], adapter: str, params: SamplingParams) -> FinishEvent:
        """Submit and wait: the finished request (raises what failed it)."""
        finished = threading.Event()
        result: list[Event] = []

        def listen(event: Event) -> None:
            if isinstance(event, (FinishEvent, ErrorEvent)):
                result.append(event)
                finished.set()

        self.submit(prompt_ids, adapter, params, listen)
        finished.wait()
        if isinstance(result[0], ErrorEvent):
            raise result[0].error
        return result[0]

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting now."""
        return {"running": len(self._rows), "waiting": len(self._waiting)}

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._thread.join()
        for row in [*self._rows, *self._waiting]:
            row.send(ErrorEvent(RuntimeError("the engine was closed")))
        self._rows, self._waiting = [], deque()

    def __enter__(self) -> GenerationEngine:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _drop(self, row: _Row) -> None:
        """A cancelled request leaves the queue at once (its place is free); a running one at the next step."""
        with self._condition:
            if row in self._waiting:
                self._waiting.remove(row)
            self._condition.notify()

    # ----- the scheduler ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._closed and not self._waiting and not self._rows:
                    self._condition.wait()
                if self._closed:
                    return
                admitted = []
                while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                    row = self._waiting.popleft()
                    if not row.cancelled:
                        admitted.append(row)
            try:
                with torch.no_grad():
                    if admitted:
                        self._admit(admitted)
                    if self._rows:
                        self._decode()
            except Exception as error:  # a failed step fails the requests in it; the engine goes on
                logger.exception("a generation step failed")
                for row in {id(r): r for r in [*self._rows, *admitted]}.values():
                    row.done = True
                    row.send(ErrorEvent(error))
                self._rows, self._cache, self._mask = [], None, None

    def _admit(self, rows: list[_Row]) -> None:
        """Prefill the new prompts together and append their cache rows to the running batch."""
        from transformers import DynamicCache

        width = max(len(row.prompt) for row in rows)
        ids = torch.tensor([[self._pad] * (width - len(r.prompt)) + r.prompt for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt)) + [1] * len(r.prompt) for r in rows], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._config)
        logits = self._forward(ids, mask, positions, cache, [row.adapter for row in rows])
        for row in rows:
            row.position = len(row.prompt)
        self._cache, self._mask = _append_rows(self._cache, self._mask, cache, mask)
        self._rows += rows
        self._accept(rows, logits)

    def _decode(self) -> None:
        """One token for every running row (each feeds the token it chose last)."""
        rows = self._rows
        ids = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)
        positions = torch.tensor([[row.position] for row in rows], device=self.device)
        logits = self._forward(ids, self._mask, positions, self._cache, [row.adapter for row in rows])
        for row in rows:
            row.position += 1
        self._accept(rows, logits)

    def _forward(self, ids, mask, positions, cache, adapters: list[str]) -> torch.Tensor:
        extra = {"adapter_names": adapters} if self.adapters else {}
        output = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        return output.logits[:, -1].float()

    def _accept(self, rows: list[_Row], logits: torch.Tensor) -> None:
        for index, row in enumerate(rows):
            if row.cancelled:
                continue
            try:
                token = _choose(logits[index], row)
            except RuntimeError as error:  # this row's sampling failed: fail it alone, not its batch
                row.done = True
                row.send(ErrorEvent(error))
                continue
            row.tokens.append(token)
            self._emit(row, token)
        self._retire()

    def _emit(self, row: _Row, token: int) -> None:
        """Send the text `token` adds, holding back an unfinished character or a possible stop string's start."""
        eos = token in self.eos_token_ids and not row.params.ignore_eos
        if not eos:
            row.decoder.add(token)
        reason = "stop" if eos else ("length" if len(row.tokens) >= row.params.max_tokens else None)
        text = row.decoder.text
        cut = _stop_index(text, row.params.stop, row.emitted)
        if cut is not None:
            text, reason = text[:cut], "stop"
        elif reason is not None:  # the whole answer, a character still unfinished at its end included
            text = self.tokenizer.decode(row.tokens[:-1] if eos else row.tokens, skip_special_tokens=True)
        if reason is None:
            ready = len(text) - _held_back(text, row.params.stop)
            delta = text[row.emitted : ready] if ready > row.emitted else ""
            row.emitted += len(delta)
            row.send(TokenEvent(token, delta))
            return
        delta = text[row.emitted :]
        row.emitted = len(text)
        row.send(TokenEvent(token, delta))
        row.done = True
        row.send(FinishEvent(reason, text, tuple(row.tokens), len(row.prompt)))

    def _retire(self) -> None:
        """Drop finished and cancelled rows from the batch, and cache columns that only padding uses."""
        keep = [i for i, row in enumerate(self._rows) if not (row.done or row.cancelled)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        mask = self._mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]


class IncrementalDecoder:
    """Text of a growing token sequence, piece by piece, decoding only a short window per token (not the whole
    answer at every step). The window starts one piece back, so that a token's leading space decodes as it does in
    context; a character split across tokens comes out once its last byte is there."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""  # complete characters so far
        self._prefix = 0  # tokens[_prefix:_read] decoded to the last piece returned
        self._read = 0

    def add(self, token: int) -> str:
        """The characters that `token` completes ("" while a character is unfinished)."""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += after[len(before) :]
        return after[len(before) :]


def _choose(logits: torch.Tensor, row: _Row) -> int:
    """The next token of one row: penalties, then greedy or temperature / top-k / top-p sampling with the row's
    own generator (so a seeded request samples the same tokens whatever runs beside it)."""
    params = row.params
    if (params.presence_penalty or params.frequency_penalty) and row.tokens:
        counts = torch.bincount(torch.tensor(row.tokens, device=logits.device), minlength=logits.shape[0])
        counts = counts[: logits.shape[0]].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.greedy:
        return int(logits.argmax())
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[0])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        drop[0] = False  # the likeliest token always stays (a top_p below float32's range rounds to 0)
        logits = logits.scatter(0, order, ordered.masked_fill(drop, float("-inf")))
    probabilities = logits.softmax(-1)
    return int(torch.multinomial(probabilities, 1, generator=row.generator))


def _stop_index(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Where the first stop string starts in `text`, searching only where a new one can be."""
    found = None
    for stop in stops:
        index = text.find(stop, max(0, emitted - len(stop) + 1))
        if index >= 0 and (found is None or index < found):
            found = index
    return found


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could begin a stop string (not sent until the next token decides)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def _append_rows(cache, mask, new_cache, new_mask):
    """The running batch's cache and mask with the new rows below, both left-padded to the longer length."""
    if cache is None:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])

    def padded(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    for layer, new in zip(cache.layers, new_cache.layers, strict=True):
        layer.keys = torch.cat([padded(layer.keys, 2), padded(new.keys, 2)])
        layer.values = torch.cat([padded(layer.values, 2), padded(new.values, 2)])
    return cache, torch.cat([padded(mask, 1), padded(new_mask, 1)])


def _full_attention_cache(config) -> bool:
    """Rows can be appended to and dropped from a cache only when every layer keeps every position."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    layers = DynamicCache(config=config).layers
    return all(type(layer) is DynamicLayer for layer in layers)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (configured, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)
