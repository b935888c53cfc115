"""An OpenAI-compatible server that answers at once (a fixed one-token completion), for measuring what the routing
gateway itself adds per request without the engine's step-to-step jitter (``benchmarks/serving.py``).

    python benchmarks/stub_upstream.py PORT
"""

from __future__ import annotations

import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def completion(request: Request) -> JSONResponse:
    body = await request.json()
    chat = request.url.path.endswith("/chat/completions")
    choice = {"index": 0, "finish_reason": "length"}
    choice.update({"message": {"role": "assistant", "content": "4"}} if chat else {"text": "4"})
    return JSONResponse(
        {
            "id": "stub",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    )


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


app = Starlette(
    routes=[
        Route("/v1/completions", completion, methods=["POST"]),
        Route("/v1/chat/completions", completion, methods=["POST"]),
        Route("/health", health),
    ]
)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
