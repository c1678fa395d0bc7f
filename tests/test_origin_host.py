"""Web pages and DNS rebinding against real `ladder serve` processes: a request that changes
state from another page's origin is refused (403 `forbidden_origin`), and a server without
LADDER_API_KEY answers only requests addressed to itself (403 `forbidden_host`), both before a
byte of the body is read; LADDER_ALLOWED_ORIGINS and LADDER_ALLOWED_HOSTS allow more."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from test_cli import write_csv
from test_service_faults import AUTH, Server, env_for
from test_service_process import free_port

from api.app import create_app

# No key, and none of the allowances the test process may carry in its environment.
KEYLESS = {"LADDER_API_KEY": "", "LADDER_ALLOWED_HOSTS": "", "LADDER_ALLOWED_ORIGINS": ""}
FOREIGN = "attacker.example"
PLANTED = "planted-by-evil-site.csv"  # the name every refused upload gives its file


@pytest.fixture(scope="module")
def keyless(tmp_path_factory, tiny_bert_dir):
    s = Server(tmp_path_factory.mktemp("keyless"), env_for(tiny_bert_dir, **KEYLESS))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return Path(write_csv(tmp_path_factory.mktemp("data") / "rides.csv", n=40))


def post_file(server: Server, path: Path, headers: dict, name: str | None = None) -> httpx.Response:
    """A multipart upload as a web page's form or no-cors fetch sends it: no key, and whatever
    Origin and Host the page's browser names."""
    with open(path, "rb") as handle:
        return httpx.post(
            server.base + "/v1/files",
            headers=headers,
            data={"purpose": "fine-tune"},
            files={"file": (name or path.name, handle, "text/csv")},
            timeout=60,
        )


def stored(server: Server) -> list[str]:
    return sorted(p.name for p in (server.home / "files").iterdir())


def listed(server: Server) -> list[str]:
    return [f["filename"] for f in httpx.get(server.base + "/v1/files").json()["data"]]


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


def test_a_cross_origin_upload_is_refused_and_stores_nothing(keyless, data):
    other = f"http://127.0.0.1:{free_port()}"
    before = stored(keyless)
    response = post_file(keyless, data, {"Origin": other}, PLANTED)
    assert response.status_code == 403, response.text
    error = error_of(response)
    assert error["code"] == "forbidden_origin"
    assert other in error["message"] and "LADDER_ALLOWED_ORIGINS" in error["message"]
    assert stored(keyless) == before
    assert PLANTED not in listed(keyless)


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"),
        ("POST", "/v1/predict"),
        ("DELETE", "/v1/models/ft:x"),
    ],
)
def test_an_opaque_origin_is_refused_on_every_state_changing_method(keyless, method, path):
    """`Origin: null`: a sandboxed frame, a local file or a redirect chain; never the console."""
    response = httpx.request(
        method, keyless.base + path, headers={"Origin": "null"}, content=b"{}", timeout=60
    )
    assert response.status_code == 403, response.text
    assert error_of(response)["code"] == "forbidden_origin"


def test_a_same_origin_upload_is_accepted(keyless, data):
    response = post_file(keyless, data, {"Origin": keyless.base})
    assert response.status_code == 200, response.text
    assert any(name.startswith(response.json()["id"]) for name in stored(keyless))


def test_an_upload_without_origin_is_accepted(keyless, data):
    """curl, the SDK and `ladder files upload` send no Origin."""
    response = post_file(keyless, data, {})
    assert response.status_code == 200, response.text


def test_a_cross_origin_read_is_answered(keyless):
    """A GET changes nothing, and without CORS headers the page cannot read the answer."""
    other = f"http://127.0.0.1:{free_port()}"
    response = httpx.get(keyless.base + "/v1/files", headers={"Origin": other})
    assert response.status_code == 200, response.text
    assert "access-control-allow-origin" not in response.headers


def test_a_keyless_server_refuses_a_foreign_host(keyless, data):
    """DNS rebinding: a page at http://attacker.example:PORT whose name now resolves to
    127.0.0.1 is same-origin with itself, so only the Host it names gives it away."""
    host = f"{FOREIGN}:{keyless.port}"
    response = httpx.get(keyless.base + "/v1/files", headers={"Host": host})
    assert response.status_code == 403, response.text
    error = error_of(response)
    assert error["code"] == "forbidden_host"
    assert FOREIGN in error["message"]
    assert "LADDER_ALLOWED_HOSTS" in error["message"] and "LADDER_API_KEY" in error["message"]
    before = stored(keyless)
    rebound = post_file(keyless, data, {"Host": host, "Origin": f"http://{host}"}, PLANTED)
    assert rebound.status_code == 403 and error_of(rebound)["code"] == "forbidden_host"
    assert stored(keyless) == before and PLANTED not in listed(keyless)


def test_a_keyless_server_answers_its_loopback_names_and_public_routes(keyless):
    for host in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
        response = httpx.get(keyless.base + "/v1/files", headers={"Host": f"{host}:{keyless.port}"})
        assert response.status_code == 200, (host, response.text)
    # What anyone may call with a key set, anyone may call by any name: a probe's Host is the
    # pod's address, and these name no file, job or model.
    for path in ("/health", "/ready", "/"):
        response = httpx.get(keyless.base + path, headers={"Host": FOREIGN})
        assert response.status_code == 200, (path, response.text)


def test_with_a_key_a_foreign_host_is_served_to_whoever_has_it(tmp_path, tiny_bert_dir):
    """Behind a load balancer or in docker-compose the Host is any name; the key protects."""
    env = env_for(tiny_bert_dir, LADDER_ALLOWED_HOSTS="", LADDER_ALLOWED_ORIGINS="")
    server = Server(tmp_path, env)
    try:
        host = {"Host": f"{FOREIGN}:{server.port}"}
        served = httpx.get(server.base + "/v1/files", headers={**host, **AUTH})
        assert served.status_code == 200, served.text
        refused = httpx.get(server.base + "/v1/files", headers=host)
        assert refused.status_code == 401 and error_of(refused)["code"] == "invalid_api_key"
    finally:
        server.stop()


def test_allowed_hosts_and_origins_let_them_in(tmp_path, tiny_bert_dir, data):
    page = f"http://127.0.0.1:{free_port()}"
    env = env_for(
        tiny_bert_dir,
        **{
            **KEYLESS,
            "LADDER_ALLOWED_HOSTS": f" {FOREIGN} ,ladder.internal",
            "LADDER_ALLOWED_ORIGINS": page,
        },
    )
    server = Server(tmp_path, env)
    try:
        for host in (FOREIGN, f"{FOREIGN}:{server.port}", "ladder.internal"):
            response = httpx.get(server.base + "/v1/files", headers={"Host": host})
            assert response.status_code == 200, (host, response.text)
        assert (
            httpx.get(server.base + "/v1/files", headers={"Host": "other.example"}).status_code
            == 403
        )
        assert post_file(server, data, {"Origin": page}).status_code == 200
        other = post_file(server, data, {"Origin": f"http://127.0.0.1:{free_port()}"})
        assert other.status_code == 403 and error_of(other)["code"] == "forbidden_origin"
    finally:
        server.stop()
    server = Server(tmp_path, env_for(tiny_bert_dir, **{**KEYLESS, "LADDER_ALLOWED_HOSTS": "*"}))
    try:
        response = httpx.get(server.base + "/v1/files", headers={"Host": "any.example"})
        assert response.status_code == 200, response.text
    finally:
        server.stop()


def test_a_keyless_server_answers_the_address_it_is_bound_to(tmp_path, monkeypatch):
    """`ladder serve --host 10.1.2.3` passes its address on as LADDER_BIND_HOST; 0.0.0.0 names
    no address, so a keyless server bound to it answers only loopback names."""
    for name, value in KEYLESS.items():
        monkeypatch.setenv(name, value)
    for bound, host, status in (
        ("10.1.2.3", "10.1.2.3:8000", 200),
        ("0.0.0.0", "0.0.0.0:8000", 403),
        ("0.0.0.0", "10.1.2.3:8000", 403),
    ):
        monkeypatch.setenv("LADDER_BIND_HOST", bound)
        app = create_app(home=tmp_path, executor="thread", preload=[])
        with TestClient(app, base_url=f"http://{host}") as client:
            assert client.get("/v1/files").status_code == status, (bound, host)


class EvilPage(BaseHTTPRequestHandler):
    """Another site on this machine: any page, served from its own loopback port."""

    def do_GET(self):
        body = b"<!doctype html><title>nothing to see</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_page_on_another_origin_cannot_upload_through_chromium(keyless, data):
    """The report's own case: a page served from another local origin posts a multipart form
    with a no-cors fetch in a real Chromium; the server keeps nothing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from test_console import chromium

    site = ThreadingHTTPServer(("127.0.0.1", 0), EvilPage)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    before = stored(keyless)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
                sent = page.evaluate(
                    """async ([url, name, content]) => {
                        const form = new FormData();
                        form.append("purpose", "fine-tune");
                        form.append("file", new File([content], name, { type: "text/csv" }));
                        const answer = await fetch(url, { method: "POST", mode: "no-cors", body: form });
                        return answer.type;
                    }""",
                    [keyless.base + "/v1/files", PLANTED, data.read_text()],
                )
            finally:
                browser.close()
    finally:
        site.shutdown()
    assert sent == "opaque"  # the request went out; the page cannot read the answer
    assert stored(keyless) == before
    assert PLANTED not in listed(keyless)
