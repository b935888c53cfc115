"""The routing gateway (``peft-graft serve --upstream URL``): the same OpenAI API and router in front of any
OpenAI-compatible engine that serves the packs as LoRA adapters (vLLM, SGLang, LoRAX, llama.cpp's server, or another
``peft-graft serve``).

Each request is routed as the embedded server routes it, then forwarded with its ``model`` (or the engine's adapter
field) rewritten to the chosen adapter; the answer, streamed or not, comes back as the engine sent it, with the route
in the ``x-graft-pack`` / ``x-graft-route-probability`` headers (and a ``route`` field in plain answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .._mixed_batch import BASE_ADAPTER
from ..errors import GenerationParameterError, UnknownModelError
from .app import AUTO, Route, ServedModels, add_error_handlers, failure, json_body
from .protocol import prompt_text
from .upstreams import ENGINES, EngineNaming

logger = logging.getLogger("peft_graft.serving")


def upstream_body(
    body: dict[str, Any], route: Route, naming: EngineNaming, *, base: str, adapters: Mapping[str, str]
) -> dict[str, Any]:
    """`body` as the engine must receive it for `route`: every field kept, the adapter selected its way."""
    out = dict(body)
    if route.adapter == BASE_ADAPTER:
        out["model"] = naming.base.format(base=base)
    else:
        out["model"] = naming.model.format(base=base, adapter=adapters[route.adapter])
    if naming.lora_scales:
        chosen = adapters.get(route.adapter)
        out["lora"] = [{"id": int(a), "scale": 1.0 if a == chosen else 0.0} for a in adapters.values()]
    return out


def create_gateway(
    upstream: str,
    *,
    packs: Sequence[str],
    base_name: str,
    tokenizer,
    routed=None,
    engine: str = "vllm",
    upstream_model: str | None = None,
    adapters: Mapping[str, str] | None = None,
    request_timeout: float = 600.0,
) -> FastAPI:
    """The gateway app forwarding to `upstream` (its base URL, without ``/v1``).

    `adapters` maps a pack to its adapter name on the engine (default: the pack's own name; for llama.cpp the
    adapter's index, default the pack's position in `packs`). `upstream_model` is the engine's name for the base
    (default: `base_name`).
    """
    if engine not in ENGINES:
        raise GenerationParameterError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}", field="engine")
    naming = ENGINES[engine]
    served = ServedModels(packs, base_name=base_name, routed=routed)
    default = {p: str(i) for i, p in enumerate(served.packs)} if naming.lora_scales else {p: p for p in served.packs}
    adapters = {**default, **(adapters or {})}
    unknown = set(adapters) - set(served.packs)
    if unknown:
        raise UnknownModelError(f"adapter names given for packs not served: {', '.join(sorted(unknown))}")
    base = upstream_model or base_name
    upstream = upstream.rstrip("/")
    if upstream.endswith("/v1"):
        upstream = upstream[: -len("/v1")]
    created = int(time.time())
    client: httpx.AsyncClient | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal client
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        client = httpx.AsyncClient(base_url=upstream, timeout=request_timeout, limits=limits)
        yield
        await client.aclose()

    app = FastAPI(title="peft-graft gateway", summary=f"SkillPack routing in front of {upstream}", lifespan=lifespan)
    app.state.served = served
    add_error_handlers(app)

    @app.get("/health")
    async def health():
        try:
            answer = await client.get(naming.health, timeout=10)
        except httpx.HTTPError as error:
            return failure(503, f"the upstream {upstream} does not answer: {error}", "upstream_error")
        status = "ok" if answer.status_code == 200 else "upstream unhealthy"
        return JSONResponse({"status": status, "upstream": upstream}, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return served.listing(created)

    async def forward(request: Request, path: str, chat: bool):
        try:
            body = await json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("model"), str):
                raise GenerationParameterError("the body must be a JSON object with a 'model' string", field="model")
            if body["model"] == AUTO:  # the router embeds the prompt: a model forward, off the event loop
                route = await asyncio.to_thread(served.route, AUTO, prompt_text(tokenizer, body, chat))
            else:
                route = served.route(body["model"], "")
        except UnknownModelError as error:
            return failure(404, str(error), "invalid_request_error", code="model_not_found", param="model")
        except GenerationParameterError as error:
            return failure(400, str(error), "invalid_request_error", param=error.field)
        outgoing = upstream_body(body, route, naming, base=base, adapters=adapters)
        headers = {"x-graft-pack": route.name}
        if route.probability is not None:
            headers["x-graft-route-probability"] = f"{route.probability:.6f}"
        logger.info(
            "gateway model=%s -> pack=%s probability=%s upstream model=%s",
            body["model"],
            route.name,
            "-" if route.probability is None else f"{route.probability:.3f}",
            outgoing["model"],
        )
        try:
            answer = await client.send(client.build_request("POST", path, json=outgoing), stream=True)
        except httpx.HTTPError as error:
            return failure(502, f"the upstream {upstream} failed: {error}", "upstream_error")
        kind = answer.headers.get("content-type", "application/json")
        if body.get("stream") and answer.status_code == 200:

            async def relay():
                try:
                    async for piece in answer.aiter_raw():
                        yield piece
                finally:  # also when our client went away: closing tells the engine to stop
                    await answer.aclose()

            return StreamingResponse(relay(), status_code=answer.status_code, media_type=kind, headers=headers)
        content = await answer.aread()
        await answer.aclose()
        if answer.status_code == 200 and kind.startswith("application/json"):
            payload = json.loads(content)
            if isinstance(payload, dict):
                payload["route"] = {"pack": route.name, "probability": route.probability}
                return JSONResponse(payload, headers=headers)
        return Response(content, status_code=answer.status_code, media_type=kind, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await forward(request, "/v1/chat/completions", chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await forward(request, "/v1/completions", chat=False)

    return app
