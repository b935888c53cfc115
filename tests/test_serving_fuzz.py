"""API fuzzing of `peft-graft serve` with schemathesis, against its own OpenAPI schema over real HTTP: whatever a
client sends (valid or not), the server answers without a 5xx and keeps serving."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from peft_graft.serving import GenerationEngine
from peft_graft.serving.app import create_app

from test_serving_server import LoopbackServer, _http, routed_tiny_packs


def test_no_generated_request_makes_the_server_fail(tmp_path):
    routed = routed_tiny_packs(tmp_path)
    engine = GenerationEngine(routed.model, routed.tokenizer, max_batch=4, max_queue=8)
    app = create_app(engine, base_name="tiny-base", routed=routed, default_max_tokens=8)
    with LoopbackServer(app) as server:
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"}
        statuses: dict[str, set[int]] = {}
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(
                max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True
            )
            def call(case) -> None:
                response = case.call(timeout=60)
                statuses.setdefault(case.path, set()).add(response.status_code)
                assert response.status_code < 500, (case.path, case.body, response.text[:300])

            call()
        assert _http(f"{server.url}/health")[0] == 200
    # generation really ran (valid requests), and invalid ones were refused in OpenAI's way
    assert 200 in statuses["/v1/chat/completions"] and 400 in statuses["/v1/chat/completions"]
