"""``peft-graft serve``: load a base with its packs (a router folder, or named pack folders) and serve them."""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from ..errors import GenerationParameterError, RoutingError

DTYPES = ("float32", "bfloat16", "float16")


def load_server(
    base: str | None,
    *,
    router: str | os.PathLike | None = None,
    packs: Mapping[str, str] | None = None,
    base_name: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    max_batch: int = 16,
    max_queue: int = 64,
    default_max_tokens: int = 256,
    request_timeout: float = 600.0,
    upstream: str | None = None,
    engine: str = "vllm",
    upstream_model: str | None = None,
    adapters: Mapping[str, str] | None = None,
):
    """The FastAPI app for a router folder (``auto`` routes with its classifier) or for named packs on `base`
    (a local folder or Hub id; a router folder's recorded base when omitted). With `upstream`, the routing gateway
    in front of that engine (`engine` names its adapter convention, see ``serving.gateway.ENGINES``) instead of the
    embedded engine; the base model is still loaded, for the router's embeddings."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..routing import RoutedGraftModel, RouterConfig
    from .app import create_app
    from .engine import GenerationEngine

    if (router is None) == (not packs):
        raise RoutingError("serve a router folder, or packs given as NAME=FOLDER, not both and not neither")
    if dtype not in DTYPES:
        raise GenerationParameterError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}", field="dtype")
    if base is None:
        base = RouterConfig.read(Path(router)).base_model_name_or_path if router is not None else None
        if not base:
            raise RoutingError("the router folder records no base model: pass --base")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if router is not None:
        routed = RoutedGraftModel.from_pretrained(model, router, tokenizer)
    else:
        routed = RoutedGraftModel.from_packs(model, dict(packs), tokenizer)
    name = base_name or Path(str(base).rstrip("/")).name
    if upstream is not None:
        from .gateway import create_gateway

        return create_gateway(
            upstream,
            packs=routed.labels,
            base_name=name,
            tokenizer=tokenizer,
            routed=routed,
            engine=engine,
            upstream_model=upstream_model,
            adapters=adapters,
            request_timeout=request_timeout,
        )
    generation = GenerationEngine(routed.model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    return create_app(
        generation,
        base_name=name,
        routed=routed,
        default_max_tokens=default_max_tokens,
        request_timeout=request_timeout,
    )


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    import uvicorn

    logging.getLogger("peft_graft.serving").setLevel(log_level.upper())
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=30)


def free_port() -> int:
    """A loopback TCP port that is free now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ChildServer:
    """An HTTP server `command` in a child process, listening on loopback `port`: entering waits until
    `health_path` answers (at most `startup_timeout` seconds), leaving stops it. `output` goes to the child's stdout
    and stderr (``subprocess.PIPE`` keeps it for the startup error)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        health_path: str = "/health",
        startup_timeout: float = 300.0,
        output: Any = None,
    ) -> None:
        self.command, self.port = list(command), port
        self.url = f"http://127.0.0.1:{port}"
        self.health_path, self.startup_timeout, self.output = health_path, startup_timeout, output
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self.process = subprocess.Popen(self.command, stdout=self.output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                said = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                raise RuntimeError(f"`{shlex.join(self.command)}` exited with {self.process.returncode}\n{said}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.health_path}", timeout=5):
                    return self
            except OSError:  # not listening yet, or a gateway whose upstream is not up yet (503)
                time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"`{shlex.join(self.command)}` did not answer on {self.url} in {self.startup_timeout:g} s")

    def __exit__(self, *exc_info: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ServerProcess(ChildServer):
    """``peft-graft serve ARGUMENTS`` in a child process on a loopback port (a free one unless `port` is given).

    ``with ServerProcess("./router") as server: OpenAI(base_url=f"{server.url}/v1", ...)`` waits until ``/health``
    answers (at most `startup_timeout` seconds) and stops the server after the block: for notebooks, scripts and
    tests. `output` goes to the child's stdout and stderr (``subprocess.PIPE`` keeps it for the startup error).
    """

    def __init__(
        self, *arguments: str, port: int | None = None, startup_timeout: float = 300.0, output: Any = None
    ) -> None:
        port = free_port() if port is None else port
        command = [sys.executable, "-m", "peft_graft_cli", "serve", *arguments, "--port", str(port)]
        super().__init__(command, port=port, startup_timeout=startup_timeout, output=output)
