"""Property-based requests generated from the service's own OpenAPI spec: no route may answer
with a server error (5xx), whatever a client sends. The server runs with an API key (sent with
every case) and small body caps, so generated bodies reach past them."""

from __future__ import annotations

import signal

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from test_service_process import free_port, start_server  # noqa: E402

KEY = "schemathesis-key"


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("schemathesis")
    port = free_port()
    server = start_server(
        home,
        port,
        {
            "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
            "LADDER_PRELOAD": "tiny",
            "LADDER_EXECUTOR": "thread",
            "LADDER_API_KEY": KEY,
            "LADDER_MAX_UPLOAD_BYTES": str(64 * 1024),
            "LADDER_MAX_PREDICT_BYTES": str(256 * 1024),
        },
    )
    yield schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/openapi.json")
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)


def test_no_route_answers_with_a_server_error(api_schema):
    # Operations are driven by hand: schemathesis' pytest plugin does not load with this pytest.
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def no_server_error(case):
            if case.query and case.query.get("stream") in (True, "true"):
                case.query["stream"] = "false"  # an event stream stays open until its job ends
            response = case.call(timeout=30, headers={"Authorization": f"Bearer {KEY}"})
            assert response.status_code < 500, (case.method, case.path, response.text[:500])

        no_server_error()
        checked.append(operation.label)
    assert len(checked) >= 14, checked
