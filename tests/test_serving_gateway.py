"""The routing gateway (`peft-graft serve --upstream`) in front of a real upstream: a second `peft-graft serve`
that serves the packs by name, both on loopback ports, driven by the `openai` client."""

from __future__ import annotations

import openai
import pytest

from peft_graft import BASE_ADAPTER
from peft_graft.serving import GenerationEngine
from peft_graft.serving.app import Route, create_app
from peft_graft.serving.gateway import ENGINES, create_gateway, upstream_body

from test_routing import _prompts
from test_serving_server import SKILLS, LoopbackServer, _chat, _http, routed_tiny_packs


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    routed = routed_tiny_packs(tmp_path_factory.mktemp("packs"))
    tokenizer = routed.tokenizer
    engine = GenerationEngine(routed.model, tokenizer, max_batch=4, max_queue=8)
    upstream_app = create_app(engine, base_name="engine-base", routed=None)
    with LoopbackServer(upstream_app) as upstream:
        gateway_app = create_gateway(
            upstream.url,
            packs=routed.labels,
            base_name="tiny-base",
            tokenizer=tokenizer,
            routed=routed,
            engine="peft-graft",
            upstream_model="engine-base",
        )
        with LoopbackServer(gateway_app) as gateway:
            connect = dict(api_key="unused", max_retries=0, timeout=60)
            yield (
                openai.OpenAI(base_url=f"{gateway.url}/v1", **connect),
                openai.OpenAI(base_url=f"{upstream.url}/v1", **connect),
                routed,
                (gateway.url, upstream.url),
            )


def test_the_gateway_routes_then_answers_exactly_as_the_engine_serving_that_pack(stack):
    gateway, direct, routed, _ = stack
    assert [m.id for m in gateway.models.list()] == ["auto", "math", "spell", "tiny-base"]
    for skill in SKILLS:
        question = _prompts(skill, 1, seed=77)[0]
        messages = [{"role": "user", "content": question}]
        response = gateway.chat.completions.with_raw_response.create(
            model="auto", messages=messages, max_tokens=10, temperature=0
        )
        [(pack, probability)] = routed.route([_chat(routed.tokenizer, question)])
        assert pack == skill and response.headers["x-graft-pack"] == skill
        assert float(response.headers["x-graft-route-probability"]) == pytest.approx(probability, abs=1e-6)
        answer = response.parse()
        assert answer.model_extra["route"]["pack"] == skill
        alone = direct.chat.completions.create(model=skill, messages=messages, max_tokens=10, temperature=0)
        assert answer.choices[0].message.content == alone.choices[0].message.content
    base = gateway.completions.create(model="tiny-base", prompt="Tell me", max_tokens=6, temperature=0)
    assert base.model == "engine-base"  # the upstream's own answer, for its base
    upstream = direct.completions.create(model="engine-base", prompt="Tell me", max_tokens=6, temperature=0)
    assert base.choices[0].text == upstream.choices[0].text


def test_streams_pass_through_and_add_up_to_the_plain_answer(stack):
    gateway, _, _, _ = stack
    messages = [{"role": "user", "content": "Spell this word backward: lemon"}]
    plain = gateway.chat.completions.create(model="auto", messages=messages, max_tokens=12, temperature=0)
    stream = gateway.chat.completions.with_raw_response.create(
        model="auto", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    assert stream.headers["x-graft-pack"] == plain.model_extra["route"]["pack"]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream.parse() if chunk.choices)
    assert text == plain.choices[0].message.content


def test_the_gateways_errors_and_the_upstreams_come_back_in_openais_shape(stack):
    gateway, _, _, (gateway_url, upstream_url) = stack
    with pytest.raises(openai.NotFoundError) as missing:
        gateway.chat.completions.create(model="poetry", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="temperature"):  # refused upstream, passed through
        gateway.completions.create(model="math", prompt="hi", temperature=5)
    status, body = _http(f"{gateway_url}/v1/chat/completions", b"[1, 2")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert _http(f"{gateway_url}/health") == (200, {"status": "ok", "upstream": upstream_url})


@pytest.mark.parametrize(
    ("engine", "pack_model", "base_model", "lora"),
    [
        ("vllm", "math-lora", "meta/base", None),
        ("peft-graft", "math-lora", "meta/base", None),
        ("lorax", "math-lora", "meta/base", None),
        ("sglang", "meta/base:math-lora", "meta/base", None),
        ("llamacpp", "meta/base", "meta/base", [{"id": 1, "scale": 1.0}, {"id": 0, "scale": 0.0}]),
    ],
)
def test_each_engine_gets_the_adapter_selected_its_own_way(engine, pack_model, base_model, lora):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2, "stop": ["x"]}
    adapters = {"math": "1", "spell": "0"} if engine == "llamacpp" else {"math": "math-lora", "spell": "spell-lora"}
    naming = ENGINES[engine]
    for_pack = upstream_body(body, Route("math", "math", 0.9), naming, base="meta/base", adapters=adapters)
    assert for_pack == {**body, "model": pack_model, **({"lora": lora} if lora else {})}
    for_base = upstream_body(body, Route(BASE_ADAPTER, "base", None), naming, base="meta/base", adapters=adapters)
    assert for_base["model"] == base_model
    if lora:
        assert all(entry["scale"] == 0.0 for entry in for_base["lora"])  # no adapter applies
    assert body["model"] == "auto"  # the client's body is not changed
