"""Serving under load: ``peft-graft serve`` on SmolLM2-135M with two packs (the quality benchmark's skills), driven
by concurrent clients that send mixed-skill chat requests (``model="auto"``) over HTTP, each in a closed loop.

    python benchmarks/serving.py [--quick] [--seconds S]

- **Dynamic batching**: the embedded engine (``--max-batch 64``) against one request at a time (``--max-batch 1``),
  at 1, 4, 16 and 64 clients: generated tokens per second, and p50 / p99 request latency.
- **Gateway overhead**: ``peft-graft serve --upstream`` in front of an upstream that answers at once
  (``stub_upstream.py``: the gateway's own cost) and in front of the embedded server, requests naming a pack (no
  routing), against the same requests sent to that upstream directly, one client: the added p50 latency.
- **Routing cost**: the router's time per query (one base-model forward) against a 64-token generation.

Every request asks for 64 tokens with ``ignore_eos`` (the answers themselves are 1-3 tokens), greedy. The server and
the gateway run in their own processes; the clients are asyncio tasks sharing one httpx client in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, write_results
from quality import SKILLS  # the quality benchmark's two 200-step fine-tunes (cached once trained)

from peft_graft import RoutedGraftModel, ServerProcess, extract_skillpack
from peft_graft._demo.bundled import bundled_model
from peft_graft._demo.recipes import finetuned_skill
from peft_graft.evaluation.tasks import SYSTEM_PROMPT, chat_prompt
from peft_graft.serving import ChildServer, free_port

CLIENTS = (1, 4, 16, 64)
NEW_TOKENS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 16 clients, 60 s each")
    parser.add_argument(
        "--gateway-only",
        action="store_true",
        help="measure the gateway and routing again, keeping the saved load results (benchmarks/results/serving.json)",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="load per setting (default: 120, quick: 60); longer than a request's latency (64 batched clients: ~70 s "
        "on 2 CPU cores), since requests still running when it ends are cut off and not counted",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    seconds = args.seconds or (60.0 if args.quick else 120.0)
    clients = (1, 16) if args.quick else CLIENTS
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="graft-bench-serving-"))
    router, prompts = _router(work)
    questions = [q for pair in zip(*prompts.values(), strict=True) for q in pair]  # skills alternate
    if args.gateway_only:
        from common import RESULTS

        saved = json.loads((RESULTS / f"serving{'-quick' if args.quick else ''}.json").read_text())
        load = saved["load"]
        clients = sorted({row["clients"] for row in load.values()})
        seconds = saved.get("window_seconds", seconds)
        started -= saved.get("seconds") or 0.0  # the load part's time, measured before
        gateway, routing = _gateway_overhead(router), _routing_cost(router, questions)
        _report(load, clients, gateway, routing, seconds, started, suffix="-quick" if args.quick else "")
        shutil.rmtree(work, ignore_errors=True)
        return

    load = {}
    for mode, max_batch in (("batched", 64), ("serial", 1)):
        with _server(str(router), "--max-batch", str(max_batch), "--max-queue", "256") as url:
            for count in clients:
                result = asyncio.run(_drive(url, questions, count, seconds, model="auto"))
                load[f"{mode} {count}"] = {"mode": mode, "clients": count, **result}
                print(
                    f"{mode:<8} {count:>3} clients: {result['tokens_per_s']:7.1f} tokens/s, "
                    f"p50 {result['p50_ms']:7.0f} ms, p99 {result['p99_ms']:7.0f} ms ({result['requests']} requests)",
                    flush=True,
                )

    gateway = _gateway_overhead(router)
    routing = _routing_cost(router, questions)
    _report(load, clients, gateway, routing, seconds, started, suffix="-quick" if args.quick else "")
    shutil.rmtree(work, ignore_errors=True)


def _report(load: dict, clients, gateway: dict, routing: dict, seconds: float, started: float, suffix: str) -> None:
    engine = gateway["engine"]
    print(
        f"gateway: p50 {gateway['through_gateway_p50_ms']:.2f} ms vs direct {gateway['direct_p50_ms']:.2f} ms in front "
        f"of a stub upstream, paired difference {gateway['added_p50_ms']:+.2f} ms (median of {gateway['pairs']}); in "
        f"front of the engine {engine['added_p50_ms']:+.2f} ms"
    )
    print(
        f"routing: {routing['route_ms']:.1f} ms per query (embedding from {routing['layers'] or 'all'} layers) vs "
        f"{routing['generate_ms']:.0f} ms for 64 tokens"
    )
    gateway_ms = gateway["added_p50_ms"]
    speedup = {
        count: load[f"batched {count}"]["tokens_per_s"] / load[f"serial {count}"]["tokens_per_s"] for count in clients
    }
    targets = {
        "batched / serial throughput at 16 clients": (speedup[16], ">= 3"),
        "gateway added p50 latency (ms)": (gateway_ms, "<= 2"),
        "routing / 64-token generation": (routing["ratio"], "<= 0.02"),
    }
    table = (
        f"SmolLM2-135M-Instruct (fp32, CPU) with two packs; chat requests, model='auto', {NEW_TOKENS} tokens each "
        f"(ignore_eos, greedy), closed-loop clients, {seconds:g} s per setting\n\n"
    )
    table += markdown_table(
        ["engine", "clients", "tokens/s", "requests/s", "p50 (ms)", "p99 (ms)", "requests"],
        [
            [
                r["mode"],
                r["clients"],
                f"{r['tokens_per_s']:.1f}",
                f"{r['requests_per_s']:.2f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                r["requests"],
            ]
            for r in load.values()
        ],
    )
    table += "\n\n" + markdown_table(
        ["target", "measured", "aim"], [[name, f"{value:.3g}", aim] for name, (value, aim) in targets.items()]
    )
    table += (
        f"\n\ngateway: 1-token completions of a 1-token prompt naming a pack, direct and through the gateway in "
        f"alternation, {gateway['pairs']} pairs. In front of an upstream that answers at once (the gateway's own "
        f"cost): p50 {gateway['through_gateway_p50_ms']:.2f} ms through the gateway vs "
        f"{gateway['direct_p50_ms']:.2f} ms direct, median paired difference {gateway_ms:+.2f} ms (quartiles "
        f"{gateway['added_quartiles_ms'][0]:+.2f} / {gateway['added_quartiles_ms'][2]:+.2f}). In front of the "
        f"embedded engine: {engine['through_gateway_p50_ms']:.1f} vs "
        f"{engine['direct_p50_ms']:.1f} ms, median paired difference "
        f"{engine['added_p50_ms']:+.2f} ms (quartiles "
        f"{engine['added_quartiles_ms'][0]:+.1f} / "
        f"{engine['added_quartiles_ms'][2]:+.1f}). Routing "
        f"{routing['route_ms']:.1f} ms per query (embedding from {routing['layers'] or 'all'} of the base's layers) "
        f"vs {routing['generate_ms']:.0f} ms for a 64-token generation"
    )
    payload = {
        "load": load,
        "speedup": speedup,
        "gateway": gateway,
        "routing": routing,
        "window_seconds": seconds,
        "targets": {name: {"measured": value, "aim": aim} for name, (value, aim) in targets.items()},
        "seconds": time.perf_counter() - started,
    }
    write_results("serving", payload, table, suffix)
    _plot(load, clients, suffix)
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s")


def _gateway_overhead(router: Path, pairs: int = 200) -> dict:
    """What the gateway adds per request: the same tiny request (a 1-token prompt, 1 token, naming a pack, so no
    routing) sent directly and through the gateway in alternation, the order flipped every pair so that neither
    side gains from drift; the median of the paired differences. Twice: in front of an upstream that answers at once
    (`stub_upstream.py`: the gateway's own cost, its hop and its work) and in front of the embedded engine (whose
    step-to-step jitter, ±10 ms, blurs the difference)."""
    stub = free_port()
    command = [sys.executable, str(Path(__file__).with_name("stub_upstream.py")), str(stub)]
    with contextlib.ExitStack() as stack:
        stub_url = stack.enter_context(ChildServer(command, port=stub, startup_timeout=60)).url
        found = {"stub": _paired(stub_url, stack.enter_context(_gateway(router, stub_url)), pairs)}
    with _server(str(router), "--max-batch", "64") as url, _gateway(router, url) as gateway:
        found["engine"] = _paired(url, gateway, pairs)
    return {"pairs": pairs, **found["stub"], "engine": found["engine"]}


def _gateway(router: Path, upstream: str):
    return _server(str(router), "--upstream", upstream, "--engine", "peft-graft")


def _paired(direct_url: str, gateway_url: str, pairs: int) -> dict:
    body = {"model": "arithmetic", "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    with httpx.Client(timeout=60) as http:

        def timed(base: str) -> float:
            t0 = time.perf_counter()
            http.post(f"{base}/v1/completions", json=body).raise_for_status()
            return 1000 * (time.perf_counter() - t0)

        for _ in range(10):  # warm-up: connections, first-call costs
            timed(direct_url), timed(gateway_url)
        direct, through = [], []
        for index in range(pairs):
            if index % 2:
                through.append(timed(gateway_url))
                direct.append(timed(direct_url))
            else:
                direct.append(timed(direct_url))
                through.append(timed(gateway_url))
    differences = [t - d for t, d in zip(through, direct, strict=True)]
    return {
        "direct_p50_ms": statistics.median(direct),
        "through_gateway_p50_ms": statistics.median(through),
        "added_p50_ms": statistics.median(differences),
        "added_quartiles_ms": statistics.quantiles(differences, n=4),
    }


def _router(work: Path) -> tuple[Path, dict[str, list[str]]]:
    """Two packs (data-free, 1/16) and a router; held-out questions of each skill."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = bundled_model()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    splits = {name: recipe.split() for name, recipe in SKILLS.items()}
    for name, recipe in SKILLS.items():
        extract_skillpack(base_dir, finetuned_skill(recipe), work / name, budget=1 / 16, progress=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    routed = RoutedGraftModel.from_packs(base, {name: work / name for name in SKILLS}, tokenizer)
    routed.fit_router({name: [chat_prompt(tokenizer, e.question) for e in splits[name][0][:50]] for name in SKILLS})
    routed.save_pretrained(work / "router")
    return work / "router", {name: [e.question for e in splits[name][1][:200]] for name in SKILLS}


@contextlib.contextmanager
def _server(*arguments: str):
    """`peft-graft serve ARGUMENTS` in its own process on a free port (yields its URL)."""
    with ServerProcess(*arguments, "--log-level", "warning") as server:
        yield server.url


async def _drive(
    url: str,
    questions: list[str],
    clients: int,
    seconds: float | None,
    *,
    model: str,
    requests: int | None = None,
    new_tokens: int = NEW_TOKENS,
) -> dict:
    """`clients` closed-loop clients for `seconds` (or `requests` in all); latencies and generated tokens of the
    requests that finished in the window (one at a time, 64 clients would otherwise drain for many minutes)."""
    latencies: list[float] = []
    tokens = 0
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await http.post("/v1/chat/completions", json=_body(questions[0], model, 2))  # warm-up
        begin = time.perf_counter()
        deadline = None if seconds is None else begin + seconds

        async def client() -> None:
            nonlocal tokens
            while True:
                index = next(counter)
                if (requests is not None and index >= requests) or (deadline and time.perf_counter() >= deadline):
                    return
                t0 = time.perf_counter()
                body = _body(questions[index % len(questions)], model, new_tokens)
                remaining = None if deadline is None else max(0.0, deadline - t0)
                try:  # a request still running when the window closes is cut off (its row is freed), not counted
                    answer = await asyncio.wait_for(http.post("/v1/chat/completions", json=body), remaining)
                except TimeoutError:
                    return
                answer.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens += answer.json()["usage"]["completion_tokens"]

        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - begin if seconds is None else seconds
    ordered = sorted(latencies) or [float("nan")]
    return {
        "requests": len(latencies),
        "tokens": tokens,
        "tokens_per_s": tokens / elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
    }


def _body(question: str, model: str, new_tokens: int) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}


def _routing_cost(router: Path, questions: list[str]) -> dict:
    """The router's time per query against a 64-token generation of the same query, in this process."""
    from transformers import AutoModelForCausalLM

    from peft_graft.routing import RouterConfig

    base_dir = RouterConfig.read(router).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    routed = RoutedGraftModel.from_pretrained(base, router)
    prompt = chat_prompt(routed.tokenizer, questions[0])
    inputs = routed.tokenizer([prompt], return_tensors="pt")
    route_times, generate_times = [], []
    routed.route([prompt])  # warm-up
    for _ in range(7):
        t0 = time.perf_counter()
        routed.route([prompt])
        route_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            routed.generate(
                inputs, routes=["arithmetic"], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
            )
        generate_times.append(time.perf_counter() - t0)
    route_ms, generate_ms = 1000 * statistics.median(route_times), 1000 * statistics.median(generate_times)
    layers = routed.embedder.spec.get("layers")  # how deep the router's embedding goes (None: every layer)
    return {"route_ms": route_ms, "generate_ms": generate_ms, "ratio": route_ms / generate_ms, "layers": layers}


def _plot(load: dict, clients, suffix: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from common import RESULTS

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in ("batched", "serial"):
        axis.plot(list(clients), [load[f"{mode} {c}"]["tokens_per_s"] for c in clients], "o-", label=mode)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("generated tokens / s")
    axis.set_title("peft-graft serve, SmolLM2-135M, CPU: throughput vs clients")
    axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / f"serving_throughput{suffix}.png", dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
