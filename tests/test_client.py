"""LadderClient and the remote CLI verbs against an in-memory fake server (httpx.MockTransport),
so these tests need neither a running server nor a model."""

from __future__ import annotations

import argparse
import functools
import json
import re

import httpx
import pytest

from api import remote_cli
from api.client import LadderAPIError, LadderClient, LadderConnectionError, LadderTimeoutError

BASE = "http://ladder.test"


def error(status: int, code: str, message: str, param: str | None = None) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message, "param": param}}
    )


class FakeLadder:
    """Just enough of the server's routes, kept in memory. `statuses` is the sequence a job walks
    through, one step per GET, so `wait` has something to poll."""

    def __init__(
        self,
        api_key: str | None = None,
        statuses: tuple[str, ...] = ("queued", "training", "succeeded"),
    ):
        self.api_key = api_key
        self.statuses = statuses
        self.files: dict[str, dict] = {}
        self.jobs: list[dict] = []  # oldest first; listed newest first
        self.polls: dict[str, int] = {}
        self.requests: list[httpx.Request] = []

    def http(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "invalid_api_key", "missing or wrong bearer token")
        method, path, query = request.method, request.url.path, request.url.params
        if (method, path) == ("POST", "/v1/files"):
            return self.upload(request)
        if (method, path) == ("GET", "/v1/files"):
            return httpx.Response(200, json={"object": "list", "data": list(self.files.values())})
        if (method, path) == ("POST", "/v1/fine_tuning/jobs"):
            return self.create_job(json.loads(request.content))
        if (method, path) == ("GET", "/v1/fine_tuning/jobs"):
            return self.list_jobs(query.get("after"), int(query.get("limit", 20)))
        if m := re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)(/cancel|/events)?", path):
            job = next((j for j in self.jobs if j["id"] == m[1]), None)
            if job is None:
                return error(404, "not_found", f"no job {m[1]}", "id")
            if m[2] == "/cancel":
                job["status"] = "cancelled"
            elif m[2] == "/events":
                return self.events(job, query.get("stream") == "true")
            else:
                step = self.polls[job["id"]] = self.polls.get(job["id"], -1) + 1
                if job["status"] != "cancelled":
                    job["status"] = self.statuses[min(step, len(self.statuses) - 1)]
            return httpx.Response(200, json=job)
        if (method, path) == ("POST", "/v1/predict"):
            return self.predict(json.loads(request.content))
        if (method, path) == ("GET", "/v1/models"):
            return httpx.Response(
                200,
                json={
                    "object": "list",
                    "data": [
                        {"id": "minilm", "object": "model", "kind": "backbone", "backbone": None}
                    ],
                },
            )
        if method == "DELETE" and path.startswith("/v1/models/"):
            return httpx.Response(
                200, json={"id": path.rsplit("/", 1)[1], "object": "model", "deleted": True}
            )
        return httpx.Response(404, text="Not Found")  # not the error shape, on purpose

    def upload(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        assert b'name="purpose"\r\n\r\nfine-tune' in body
        filename = re.search(rb'name="file"; filename="([^"]+)"', body)[1].decode()
        file = {
            "id": f"file-{len(self.files)}",
            "object": "file",
            "filename": filename,
            "purpose": "fine-tune",
            "bytes": len(body),
            "rows": 2,
            "labels": ["neg", "pos"],
        }
        self.files[file["id"]] = file
        return httpx.Response(200, json=file)

    def create_job(self, body: dict) -> httpx.Response:
        if body["training_file"] not in self.files:
            return error(404, "file_not_found", f"no file {body['training_file']}", "training_file")
        job = {
            "id": f"ftjob-{len(self.jobs)}",
            "object": "fine_tuning.job",
            "status": "validating_files",
            "error": None,
            "result": None,
            **{
                k: body.get(k)
                for k in (
                    "model",
                    "training_file",
                    "validation_file",
                    "seed",
                    "suffix",
                    "hyperparameters",
                )
            },
        }
        self.jobs.append(job)
        return httpx.Response(200, json=job)

    def list_jobs(self, after: str | None, limit: int) -> httpx.Response:
        newest_first = self.jobs[::-1]
        start = [j["id"] for j in newest_first].index(after) + 1 if after else 0
        page = newest_first[start : start + limit]
        return httpx.Response(
            200,
            json={"object": "list", "data": page, "has_more": start + limit < len(newest_first)},
        )

    def events(self, job: dict, stream: bool) -> httpx.Response:
        events = [
            {
                "id": f"ev-{i}",
                "object": "fine_tuning.job.event",
                "level": "info",
                "message": f"step {i}",
                "data": {},
            }
            for i in range(3)
        ]
        if not stream:
            return httpx.Response(200, json={"object": "list", "data": events, "has_more": False})
        # A keep-alive comment, an `event:` field, then an event after [DONE] that must be ignored.
        chunks = [": keep-alive\n\n", "event: message\n"]
        chunks += [f"data: {json.dumps(e)}\n\n" for e in events]
        chunks += ["data: [DONE]\n\n", 'data: {"id": "ev-late"}\n\n']
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content="".join(chunks).encode()
        )

    def predict(self, body: dict) -> httpx.Response:
        def run(model: str) -> list[dict]:
            return [{"label": "pos", "scores": {"neg": 0.25, "pos": 0.75}} for _ in body["inputs"]]

        if isinstance(body["model"], list):
            return httpx.Response(
                200, json={"models": body["model"], "predictions": [run(m) for m in body["model"]]}
            )
        return httpx.Response(200, json={"model": body["model"], "predictions": run(body["model"])})


@pytest.fixture
def server() -> FakeLadder:
    return FakeLadder()


@pytest.fixture
def client(server: FakeLadder) -> LadderClient:
    return LadderClient(BASE, http=server.http())


@pytest.fixture
def train_csv(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("text,label\ngood,pos\nbad,neg\n")
    return path


def test_create_job_from_local_path_uploads_first(client, server, train_csv):
    job = client.create_job(
        "minilm", str(train_csv), seed=3, hyperparameters={"n_epochs": 2, "kept_layers": [0, 2]}
    )
    assert [(r.method, r.url.path) for r in server.requests] == [
        ("POST", "/v1/files"),
        ("POST", "/v1/fine_tuning/jobs"),
    ]
    assert job["training_file"] == "file-0"
    assert server.files["file-0"]["filename"] == "train.csv"
    assert job["seed"] == 3 and job["hyperparameters"] == {"n_epochs": 2, "kept_layers": [0, 2]}


def test_create_job_with_file_id_does_not_upload(client, server, train_csv):
    file_id = client.upload_file(train_csv)["id"]
    job = client.create_job("minilm", file_id)
    assert job["training_file"] == file_id and len(server.files) == 1
    assert "hyperparameters" not in json.loads(server.requests[-1].content)
    assert client.list_files() == list(server.files.values())
    assert client.get_job(job["id"])["id"] == job["id"]


def test_iter_jobs_follows_cursor(client, server, train_csv):
    file_id = client.upload_file(train_csv)["id"]
    for _ in range(5):
        client.create_job("minilm", file_id)
    ids = [job["id"] for job in client.iter_jobs(page_size=2)]
    assert ids == [f"ftjob-{i}" for i in range(4, -1, -1)]
    afters = [r.url.params.get("after") for r in server.requests if r.method == "GET"]
    assert afters == [None, "ftjob-3", "ftjob-1"]
    assert client.list_jobs(limit=2, after="ftjob-3")["has_more"] is True


def test_error_body_becomes_api_error(client):
    with pytest.raises(LadderAPIError) as info:
        client.create_job("minilm", "file-missing")
    exc = info.value
    assert (exc.status, exc.code, exc.param) == (404, "file_not_found", "training_file")
    assert exc.message == "no file file-missing"
    assert str(exc) == "HTTP 404 file_not_found: no file file-missing (param: training_file)"


def test_non_error_shape_and_unreachable_server(client):
    with pytest.raises(LadderAPIError) as info:
        client.get_file("file-0")  # the fake has no such route: plain-text 404
    assert str(info.value) == "HTTP 404 not_found: Not Found"

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    down = LadderClient(BASE, http=httpx.Client(transport=httpx.MockTransport(refuse)))
    with pytest.raises(LadderConnectionError, match="ladder serve.*--url") as info:
        down.list_models()
    assert isinstance(info.value, LadderAPIError) and isinstance(info.value, ConnectionError)


def test_missing_local_file_is_an_api_error(client, tmp_path):
    with pytest.raises(LadderAPIError, match="no such local file"):
        client.upload_file(tmp_path / "absent.csv")


def test_api_key_sent_as_bearer_token():
    server = FakeLadder(api_key="s3cret")
    assert LadderClient(BASE, "s3cret", http=server.http()).list_models()[0]["id"] == "minilm"
    assert server.requests[-1].headers["authorization"] == "Bearer s3cret"
    with pytest.raises(LadderAPIError) as info:
        LadderClient(BASE, http=server.http()).list_models()
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")


def test_env_defaults(monkeypatch):
    monkeypatch.setenv("LADDER_URL", "http://elsewhere:9000/")
    monkeypatch.setenv("LADDER_API_KEY", "from-env")
    with LadderClient() as client:
        assert (client.base_url, client.api_key) == ("http://elsewhere:9000", "from-env")


def test_stream_events_stops_at_done(client, server, train_csv):
    job = client.create_job("minilm", str(train_csv))
    events = list(client.stream_events(job["id"]))
    assert [e["id"] for e in events] == ["ev-0", "ev-1", "ev-2"]
    assert server.requests[-1].url.params["stream"] == "true"
    assert [e["id"] for e in client.list_events(job["id"])["data"]] == ["ev-0", "ev-1", "ev-2"]


def test_stream_events_error_status(client):
    with pytest.raises(LadderAPIError, match="HTTP 404 not_found: no job ftjob-9"):
        list(client.stream_events("ftjob-9"))


def test_wait_returns_terminal_job(client, server, train_csv):
    job = client.create_job("minilm", str(train_csv))
    final = client.wait(job["id"], poll_s=0)
    assert final["status"] == "succeeded" and server.polls[job["id"]] == 2


def test_wait_timeout(train_csv):
    server = FakeLadder(statuses=("training",))
    client = LadderClient(BASE, http=server.http())
    job = client.create_job("minilm", str(train_csv))
    with pytest.raises(LadderTimeoutError, match="still training"):
        client.wait(job["id"], poll_s=0, timeout_s=0)


def test_cancel_and_models(client, train_csv):
    job = client.create_job("minilm", str(train_csv))
    assert client.cancel_job(job["id"])["status"] == "cancelled"
    assert client.wait(job["id"], poll_s=0)["status"] == "cancelled"
    assert client.delete_model("minilm-ft")["deleted"] is True


def test_predict_one_and_several_models(client):
    one = client.predict("m1", ["good", "bad"])
    assert one["model"] == "m1" and len(one["predictions"]) == 2
    assert one["predictions"][0]["label"] == "pos"
    several = client.predict(["m1", "m2"], ["good"])
    assert several["models"] == ["m1", "m2"] and len(several["predictions"]) == 2
    assert several["predictions"][1][0]["scores"] == {"neg": 0.25, "pos": 0.75}


# -- CLI --------------------------------------------------------------------------------------


@pytest.fixture
def cli(server, monkeypatch):
    """Parse and run a remote verb the way the main CLI does, with requests going to `server`."""
    monkeypatch.setattr(
        remote_cli, "LadderClient", functools.partial(LadderClient, http=server.http())
    )
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    remote_cli.add_remote_commands(sub)
    for action in sub.choices.values():  # what the main CLI does after registering verbs
        action.add_argument("--json", action="store_true")

    def run(*argv: str) -> tuple[argparse.Namespace, dict]:
        args = parser.parse_args([*argv, "--url", BASE])  # --url belongs to the leaf verb
        return args, args.func(args)

    return run


def test_cli_files(cli, train_csv):
    _, uploaded = cli("files", "upload", str(train_csv))
    assert uploaded["id"] == "file-0" and uploaded["filename"] == "train.csv"
    args, listed = cli("files", "list", "--json")
    assert args.json is True and [f["id"] for f in listed["data"]] == ["file-0"]


def test_cli_jobs_create_with_hyperparameters_and_wait(cli, server, train_csv):
    args, job = cli(
        "jobs",
        "create",
        "--model",
        "minilm",
        "--training-file",
        str(train_csv),
        "--n-epochs",
        "3",
        "--learning-rate",
        "auto",
        "--kept-layers",
        "0,2,4",
        "--cache-dtype",
        "int8",
        "--seed",
        "7",
        "--suffix",
        "demo",
        "--wait",
    )
    assert args.json is False
    assert job["status"] == "succeeded" and job["seed"] == 7 and job["suffix"] == "demo"
    assert job["hyperparameters"] == {
        "n_epochs": 3,
        "learning_rate": "auto",
        "kept_layers": [0, 2, 4],
        "cache_dtype": "int8",
    }
    assert server.files[job["training_file"]]["filename"] == "train.csv"


def test_cli_jobs_list_show_cancel_events(cli, server, train_csv, capsys):
    _, job = cli("jobs", "create", "--model", "minilm", "--training-file", str(train_csv))
    args, listed = cli("jobs", "--json", "list", "--limit", "5")
    assert args.json is True and [j["id"] for j in listed["data"]] == [job["id"]]
    assert cli("jobs", "show", job["id"])[1]["id"] == job["id"]
    assert cli("jobs", "cancel", job["id"])[1]["status"] == "cancelled"
    assert len(cli("jobs", "events", job["id"])[1]["data"]) == 3
    _, followed = cli("jobs", "events", job["id"], "--follow", "--limit", "2")
    assert [e["id"] for e in followed["data"]] == ["ev-1", "ev-2"]
    assert capsys.readouterr().err.splitlines() == ["info: step 0", "info: step 1", "info: step 2"]


def test_cli_remote_predict(cli):
    _, one = cli("remote-predict", "--model", "m1", "good", "bad")
    assert one["model"] == "m1" and len(one["predictions"]) == 2
    _, several = cli("remote-predict", "--model", "m1", "--model", "m2", "good")
    assert several["models"] == ["m1", "m2"]


def test_cli_bad_kept_layers(cli, capsys):
    with pytest.raises(SystemExit):
        cli(
            "jobs",
            "create",
            "--model",
            "minilm",
            "--training-file",
            "file-0",
            "--kept-layers",
            "0,x",
        )
    assert "comma-separated list of layer indices" in capsys.readouterr().err


def test_cli_api_error_is_remote_error(cli):
    with pytest.raises(remote_cli.REMOTE_ERRORS, match="no job ftjob-404"):
        cli("jobs", "show", "ftjob-404")


def test_reads_and_predictions_are_retried_and_job_creation_is_not(monkeypatch):
    """A replica restarting (connection refused, 503) costs a retry, not the request; a POST
    that creates something is sent once, so a retry can never create it twice."""
    import api.client as client_module

    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    answers = [
        httpx.ConnectError("refused"),
        httpx.Response(503, headers={"Retry-After": "3"}, json={"error": {"code": "busy"}}),
        httpx.Response(500, text="Internal Server Error"),  # a proxy's: the replica died
        httpx.Response(200, json={"predictions": []}),
    ]
    seen = []

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append((request.method, request.url.path))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    client = LadderClient(
        BASE, http=httpx.Client(transport=httpx.MockTransport(flaky)), max_retries=3
    )
    assert client.predict("ft:x", ["hello"]) == {"predictions": []}
    assert len(seen) == 4 and slept == [0.5, 3.0, 2.0]  # backoff, Retry-After, backoff
    # Ladder's own 500 is its verdict on the request: not retried.
    answers[:] = [httpx.Response(500, json={"error": {"code": "internal_error", "message": "x"}})]
    seen.clear()
    with pytest.raises(LadderAPIError):
        client.predict("ft:x", ["hello"])
    assert len(seen) == 1

    answers[:] = [httpx.Response(503, json={"error": {"code": "busy", "message": "busy"}})] * 3
    seen.clear()
    with pytest.raises(LadderAPIError) as info:
        client.create_job("minilm", "file-1")
    assert info.value.status == 503 and seen == [("POST", "/v1/fine_tuning/jobs")]
    answers[:] = [httpx.Response(503, json={"error": {"code": "busy", "message": "busy"}})] * 4
    seen.clear()
    with pytest.raises(LadderAPIError):
        client.list_models()
    assert len(seen) == 4  # the first try and three retries
