"""The OpenAI-compatible HTTP server (FastAPI): ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` (plain
and streamed as server-sent events) and ``/health``, in front of the embedded engine.

``model`` picks what answers: a pack's name, the base's name (no pack), or ``"auto"``, which routes the prompt with
the router (top-1 pack, or the base below the router's threshold). The pack that answered and the router's
probability come back in the ``x-graft-pack`` and ``x-graft-route-probability`` headers and in a ``route`` field, and
are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

# FastAPI reads the endpoints' annotations, so what they name must be importable from this module
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .._mixed_batch import BASE_ADAPTER
from ..errors import GenerationParameterError, ServerBusyError, UnknownModelError
from .engine import ErrorEvent, Event, FinishEvent, GenerationEngine, SamplingParams, TokenEvent
from .protocol import ChatCompletionRequest, CompletionRequest, error_body

logger = logging.getLogger("peft_graft.serving")

AUTO = "auto"


@dataclass(frozen=True)
class Route:
    """What answers a request: the adapter the engine runs, the model name reported, the router's probability."""

    adapter: str
    name: str
    probability: float | None


class ServedModels:
    """The names a request may give: every pack, the base, and ``auto`` when a router is loaded."""

    def __init__(self, packs: Sequence[str], *, base_name: str, routed=None) -> None:
        self.base_name, self.routed = base_name, routed
        self.packs = sorted(packs)
        if base_name in self.packs or base_name == AUTO:
            raise UnknownModelError(f"the base's name {base_name!r} is taken by a pack or by 'auto': choose another")

    @property
    def names(self) -> list[str]:
        return [*([AUTO] if self.routed is not None and self.routed.router is not None else []), *self.packs]

    def listing(self, created: int) -> dict[str, Any]:
        """The body of ``GET /v1/models``."""
        entries = [*self.names, self.base_name]
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": created, "owned_by": "peft-graft"} for name in entries],
        }

    def route(self, model: str, prompt: str) -> Route:
        if model == self.base_name:
            return Route(BASE_ADAPTER, self.base_name, None)
        if model in self.packs:
            return Route(model, model, None)
        if model == AUTO and AUTO in self.names:
            if not prompt:
                raise GenerationParameterError("the prompt is empty: there is nothing to route", field="prompt")
            [(adapter, probability)] = self.routed.route([prompt])
            name = self.base_name if adapter == BASE_ADAPTER else adapter
            return Route(adapter, name, float(probability))
        served = ", ".join([*self.names, self.base_name])
        raise UnknownModelError(f"the model {model!r} does not exist; this server serves: {served}", model=model)


def create_app(
    engine: GenerationEngine,
    *,
    base_name: str,
    routed=None,
    default_max_tokens: int = 256,
    request_timeout: float = 600.0,
):
    """The FastAPI application serving `engine`'s packs (and `routed`'s router for ``model="auto"``)."""
    served = ServedModels(engine.adapters, base_name=base_name, routed=routed)
    tokenizer = engine.tokenizer
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.close)  # the app owns the engine: its thread stops with the server

    app = FastAPI(title="peft-graft", summary="SkillPacks behind an OpenAI-compatible API", lifespan=lifespan)
    app.state.served = served
    add_error_handlers(app)
    plain_schema = app.openapi

    def schema_with_models() -> dict[str, Any]:
        """The OpenAPI schema, with the served model names as the `model` field's values."""
        schema = plain_schema()
        for request in ("ChatCompletionRequest", "CompletionRequest"):
            schema["components"]["schemas"][request]["properties"]["model"]["enum"] = [*served.names, base_name]
        return schema

    app.openapi = schema_with_models

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return served.listing(created)

    async def complete(request: Request, body: ChatCompletionRequest | CompletionRequest, chat: bool):
        try:
            params = body.sampling(default_max_tokens)
            prompt = body.prompt_text(tokenizer)
            route = await asyncio.to_thread(served.route, body.model, prompt)
            ids = tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
            stream = _Stream(engine, ids, route.adapter, params)
        except UnknownModelError as error:
            return failure(404, str(error), "invalid_request_error", code="model_not_found", param="model")
        except GenerationParameterError as error:
            return failure(400, str(error), "invalid_request_error", param=error.field)
        except ServerBusyError as error:
            return failure(429, str(error), "rate_limit_error", code="queue_full")
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        logger.info(
            "%s model=%s -> pack=%s probability=%s prompt_tokens=%d",
            request_id,
            body.model,
            route.name,
            "-" if route.probability is None else f"{route.probability:.3f}",
            len(ids),
        )
        headers = {"x-graft-pack": route.name}
        if route.probability is not None:
            headers["x-graft-route-probability"] = f"{route.probability:.6f}"
        shape = _Shape(request_id, route, chat, created=int(time.time()))
        if body.stream:
            events = _sse(stream, shape, request, request_timeout, body.include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        try:
            finish = await stream.finish(request, request_timeout)
        except TimeoutError:
            return failure(504, f"the request took longer than {request_timeout:g} s", "timeout_error")
        except _Disconnected:
            return failure(499, "the client went away", "client_closed_request")
        if isinstance(finish, ErrorEvent):
            return failure(500, f"generation failed: {finish.error}", "server_error")
        return JSONResponse(shape.whole(finish), headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await complete(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await complete(request, body, chat=False)

    return app


def failure(status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code=code, param=param), status_code=status)


def add_error_handlers(app: FastAPI) -> None:
    """FastAPI's own validation errors (422) in OpenAI's shape, as 400."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return failure(400, f"the body is not valid JSON: {detail}", "invalid_request_error")
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"invalid request: {param + ': ' if param else ''}{first.get('msg', error)}"
        return failure(400, message, "invalid_request_error", param=param)


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenerationParameterError(f"the body is not valid JSON: {error}", field=None) from None


class _Disconnected(Exception):
    pass


class _Stream:
    """One submitted request, its events bridged from the engine's thread into this event loop."""

    def __init__(self, engine: GenerationEngine, ids: list[int], adapter: str, params: SamplingParams) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.handle = engine.submit(ids, adapter, params, lambda e: loop.call_soon_threadsafe(self.queue.put_nowait, e))

    async def events(self, request, timeout: float) -> AsyncIterator[Event]:
        """The events as they come; cancels the row when the client goes away, the deadline passes, or the
        consumer stops early."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=min(remaining, 0.5))
                except TimeoutError:
                    if await request.is_disconnected():
                        raise _Disconnected from None
                    continue
                yield event
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    return
        finally:
            if not self.handle.done:
                self.handle.cancel()

    async def finish(self, request, timeout: float) -> FinishEvent | ErrorEvent:
        async for event in self.events(request, timeout):
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return event
        raise _Disconnected


@dataclass(frozen=True)
class _Shape:
    """OpenAI's response and chunk bodies for one request."""

    request_id: str
    route: Route
    chat: bool
    created: int

    def _common(self, kind: str) -> dict[str, Any]:
        route = {"pack": self.route.name, "probability": self.route.probability}
        name = self.route.name
        return {"id": self.request_id, "object": kind, "created": self.created, "model": name, "route": route}

    def whole(self, finish: FinishEvent) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": finish.text}}
        else:
            choice = {"index": 0, "text": finish.text, "logprobs": None}
        choice["finish_reason"] = finish.finish_reason
        body = self._common("chat.completion" if self.chat else "text_completion")
        return {**body, "choices": [choice], "usage": _usage(finish)}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._common("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}


def _usage(finish: FinishEvent) -> dict[str, int]:
    completion = len(finish.token_ids)
    return {
        "prompt_tokens": finish.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": finish.prompt_tokens + completion,
    }


async def _sse(stream: _Stream, shape: _Shape, request, timeout: float, include_usage: bool) -> AsyncIterator[str]:
    def data(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    if shape.chat:
        yield data(shape.chunk(None, first=True))
    try:
        async for event in stream.events(request, timeout):
            if isinstance(event, TokenEvent) and event.text:
                yield data(shape.chunk(event.text))
            elif isinstance(event, FinishEvent):
                yield data(shape.chunk(None, event.finish_reason))
                if include_usage:
                    yield data({**shape._common(shape.chunk(None)["object"]), "choices": [], "usage": _usage(event)})
            elif isinstance(event, ErrorEvent):
                yield data(error_body(f"generation failed: {event.error}", "server_error"))
    except TimeoutError:
        yield data(error_body(f"the request took longer than {timeout:g} s", "timeout_error"))
    except _Disconnected:
        return
    yield "data: [DONE]\n\n"
