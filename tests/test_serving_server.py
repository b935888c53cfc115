"""`peft-graft serve`'s OpenAI-compatible server on a tiny routed model, driven by the official `openai` client over
real HTTP (uvicorn on a loopback port)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn
from peft import get_peft_model

from peft_graft import BASE_ADAPTER, GraftConfig, RoutedGraftModel
from peft_graft.serving import GenerationEngine, ServerProcess
from peft_graft.serving.app import create_app

from test_routing import _prompts
from tiny_models import tiny_llama
from word_skills import chat_tokenizer

SKILLS = ("math", "spell")
BASE_NAME = "tiny-base"


def _chat(tokenizer, text: str) -> str:
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class LoopbackServer:
    """uvicorn serving `app` on a free loopback port, in a thread."""

    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def routed_tiny_packs(folder) -> RoutedGraftModel:
    """Two random packs ("math", "spell") on a tiny Llama with a chat template, and a router trained on chat
    prompts of each skill."""
    for seed, skill in enumerate(SKILLS, start=1):
        base = tiny_llama(initializer_range=0.3)
        torch.manual_seed(seed)
        targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
        get_peft_model(base, GraftConfig(target_modules=targets, init_weights=False, r=4)).save_pretrained(
            folder / skill
        )
    tokenizer = chat_tokenizer()
    routed = RoutedGraftModel.from_packs(tiny_llama(initializer_range=0.3), {s: folder / s for s in SKILLS}, tokenizer)
    routed.fit_router({skill: [_chat(tokenizer, p) for p in _prompts(skill, 20, seed=0)] for skill in SKILLS})
    return routed


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    routed = routed_tiny_packs(tmp_path_factory.mktemp("packs"))
    tokenizer = routed.tokenizer
    engine = GenerationEngine(routed.model, tokenizer, max_batch=4, max_queue=8)
    with LoopbackServer(create_app(engine, base_name=BASE_NAME, routed=routed, request_timeout=60)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        yield server, client, routed, engine


def _reference(routed, engine, prompt_ids: list[int], adapter: str, max_tokens: int) -> str:
    """The greedy text `generate` gives this prompt with its pack, alone."""
    with torch.no_grad():
        output = routed.model.generate(
            input_ids=torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            adapter_names=[adapter],
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=routed.tokenizer.pad_token_id,
            eos_token_id=sorted(engine.eos_token_ids),
        )
    return routed.tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True)


def _http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """A raw request (what a client that is not `openai` sends): the status and the JSON body."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _chat_ids(routed, text: str) -> list[int]:
    return routed.tokenizer(_chat(routed.tokenizer, text), add_special_tokens=False)["input_ids"]


def test_models_lists_auto_every_pack_and_the_base(served):
    _, client, _, _ = served
    assert [m.id for m in client.models.list()] == ["auto", "math", "spell", BASE_NAME]


@pytest.mark.parametrize("model", ["math", "spell", BASE_NAME])
def test_a_chat_completion_with_a_named_model_answers_as_that_pack_alone(served, model):
    _, client, routed, engine = served
    question = "Calculate 12 + 7."
    response = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=12, temperature=0
    )
    completion = response.parse()
    adapter = BASE_ADAPTER if model == BASE_NAME else model
    assert completion.choices[0].message.content == _reference(routed, engine, _chat_ids(routed, question), adapter, 12)
    assert completion.model == model and response.headers["x-graft-pack"] == model
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens == len(_chat_ids(routed, question))


def test_auto_routes_each_prompt_with_the_router_and_says_where_it_went(served):
    _, client, routed, engine = served
    for skill in SKILLS:
        question = _prompts(skill, 1, seed=99)[0]  # held out from the router's training prompts
        response = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": question}], max_tokens=8, temperature=0
        )
        completion = response.parse()
        [(pack, probability)] = routed.route([_chat(routed.tokenizer, question)])
        assert pack == skill
        assert completion.model == skill and response.headers["x-graft-pack"] == skill
        assert float(response.headers["x-graft-route-probability"]) == pytest.approx(probability, abs=1e-6)
        assert completion.model_extra["route"] == {"pack": skill, "probability": pytest.approx(probability, abs=1e-6)}
        assert completion.choices[0].message.content == _reference(
            routed, engine, _chat_ids(routed, question), skill, 8
        )


def test_streamed_chat_and_completion_add_up_to_the_plain_answers(served):
    _, client, _, _ = served
    messages = [{"role": "user", "content": "Spell this word backward: piano"}]
    plain = client.chat.completions.create(model="spell", messages=messages, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="spell",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens

    prompt = "Tell me about a river"
    whole = client.completions.create(model="math", prompt=prompt, max_tokens=10, temperature=0)
    streamed = client.completions.create(model="math", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text != ""


def test_stop_sequences_and_seeded_sampling(served):
    _, client, _, _ = served
    messages = [{"role": "user", "content": "How many legs do 3 cats have in total?"}]
    free = client.chat.completions.create(model="math", messages=messages, max_tokens=16, temperature=0)
    text = free.choices[0].message.content
    stopped = client.chat.completions.create(
        model="math", messages=messages, max_tokens=16, temperature=0, stop=[text[3:5]]
    )
    assert stopped.choices[0].message.content == text[: text.index(text[3:5])]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = [
        client.chat.completions.create(
            model="math", messages=messages, max_tokens=12, temperature=1.0, top_p=0.95, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_and_each_gets_its_answer_alone(served):
    _, client, routed, engine = served
    questions = [(q, skill) for skill in SKILLS for q in _prompts(skill, 4, seed=5)]

    def ask(item):
        question, skill = item
        return (
            client.chat.completions.create(
                model=skill, messages=[{"role": "user", "content": question}], max_tokens=10, temperature=0
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, questions))
    for (question, skill), answer in zip(questions, answers, strict=True):
        assert answer == _reference(routed, engine, _chat_ids(routed, question), skill, 10)


def test_errors_come_back_in_openais_shape(served):
    server, client, _, engine = served
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="poetry", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found" and "does not exist" in missing.value.message
    assert "math" in missing.value.message  # says what is served

    status, body = _http(f"{server.url}/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = _http(f"{server.url}/v1/chat/completions", json.dumps({"model": "math"}).encode())
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}], n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="math", prompt="hi", temperature=5)

    # fill the 4 running slots and the 8 queue places with long streams, then one more is refused with 429
    streams = [
        client.completions.create(model="math", prompt="a", max_tokens=100, temperature=0, stream=True)
        for _ in range(12)
    ]
    for stream in streams[:4]:
        next(iter(stream))  # running
    with pytest.raises(openai.RateLimitError) as busy:
        client.completions.create(model="math", prompt="a", max_tokens=2)
    assert busy.value.code == "queue_full"
    for stream in streams:  # the client goes away: its rows are cancelled
        stream.close()
    deadline = time.monotonic() + 30
    while engine.load != {"running": 0, "waiting": 0}:
        assert time.monotonic() < deadline, engine.load
        time.sleep(0.05)
    assert _http(f"{server.url}/health") == (200, {"status": "ok", "running": 0, "waiting": 0})


def test_the_openapi_schema_describes_the_endpoints(served):
    server, _, _, _ = served
    status, schema = _http(f"{server.url}/openapi.json")
    assert status == 200
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health"} <= set(schema["paths"])
    assert json.dumps(schema)  # serializable


def _serve_command(*arguments: str):
    """`peft-graft serve ...` in its own process on a free port; yields the base URL, stops it after."""
    with ServerProcess(*arguments, "--log-level", "warning", startup_timeout=120, output=subprocess.PIPE) as server:
        yield server.url


def test_the_serve_command_serves_a_router_folder_and_routes_as_a_gateway(served, tmp_path):
    server, in_process, routed, _ = served
    base = tmp_path / "base"
    tiny_llama(initializer_range=0.3).save_pretrained(base)
    routed.tokenizer.save_pretrained(base)
    routed.save_pretrained(tmp_path / "router")
    question = [{"role": "user", "content": _prompts("math", 1, seed=42)[0]}]
    expected = in_process.chat.completions.create(model="auto", messages=question, max_tokens=8, temperature=0)
    assert expected.model == "math"
    common = [str(tmp_path / "router"), "--base", str(base)]
    embedded = contextlib.contextmanager(_serve_command)(*common, "--base-name", "plain", "--max-batch", "2")
    # the gateway forwards to the in-process server, which serves the packs by name and the base as "tiny-base"
    gateway = contextlib.contextmanager(_serve_command)(
        *common, "--upstream", server.url, "--engine", "peft-graft", "--upstream-model", BASE_NAME
    )
    for launched, base_name in ((embedded, "plain"), (gateway, "base")):  # the gateway names the base by its folder
        with launched as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            assert [m.id for m in client.models.list()] == ["auto", "math", "spell", base_name]
            answer = client.chat.completions.create(model="auto", messages=question, max_tokens=8, temperature=0)
            assert answer.model_extra["route"]["pack"] == "math"
            assert answer.choices[0].message.content == expected.choices[0].message.content


def test_a_server_process_that_cannot_start_raises_with_what_it_said(tmp_path):
    launched = ServerProcess(str(tmp_path / "no-router"), startup_timeout=60, output=subprocess.PIPE)
    with pytest.raises(RuntimeError, match="exited with 2") as raised, launched:
        pass
    assert "no-router has no router_config.json" in str(raised.value)  # what the server said
    assert launched.process.poll() is not None
