"""The HTTP service through FastAPI's test client, on a tiny backbone (jobs in a worker thread)."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from test_cli import write_csv

from api.app import create_app
from api.db import Database
from side_trainer.memory import module_bytes


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("LADDER_BACKBONES", f"tiny={tiny_bert_dir}")
    mp.delenv("LADDER_API_KEY", raising=False)
    app = create_app(home=home, executor="thread", preload=["tiny"])
    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        yield {"client": client, "home": home, "tmp": tmp_path_factory.mktemp("uploads")}
    mp.undo()


def upload(client, path):
    with open(path, "rb") as handle:
        return client.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": (path.name, handle, "text/csv")},
        )


def wait_for(client, job_id, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish: {job}")


FLAG = re.compile(r"(?<![\w-])--[a-z]")
SERVER_PATH = re.compile(r"(?<![\w.:/])/(?!v1/)[\w.-]+/")  # the service's own routes aside


def assert_service_words(message: str) -> None:
    """What the service tells a client names request fields and what to change in an upload:
    never a command-line flag, the server's home or a path on the server."""
    assert not FLAG.search(message), message
    assert "LADDER_HOME" not in message and not SERVER_PATH.search(message), message


def assert_error(response, status, code, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert_service_words(error["message"])
    if param is not None:
        assert error["param"] == param


@pytest.fixture(scope="module")
def finished_job(service):
    client = service["client"]
    path = service["tmp"] / "train.csv"
    write_csv(path, n=120)
    file_id = upload(client, path).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "suffix": "demo",
            "hyperparameters": {"n_epochs": 2, "reduction_factor": 4, "kept_layers": [0, 2]},
        },
    ).json()
    return wait_for(client, job["id"]), file_id


def test_upload_train_and_predict(service, finished_job):
    client = service["client"]
    job, file_id = finished_job
    assert job["status"] == "succeeded", job
    assert job["fine_tuned_model"].startswith("ft:tiny:demo:")
    assert 0 <= job["result"]["test_accuracy"] <= 1
    models = client.get("/v1/models").json()
    assert {m["id"] for m in models["data"]} >= {"tiny", job["fine_tuned_model"]}
    response = client.post(
        "/v1/predict",
        json={"model": job["fine_tuned_model"], "inputs": ["a lovely ride", "an awful ride"]},
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and all(p["label"] in ("pos", "neg") for p in predictions)
    assert all(abs(sum(p["scores"].values()) - 1) < 1e-4 for p in predictions)


def test_a_sweep_job_reports_every_candidate_and_keeps_the_best(service, finished_job):
    client = service["client"]
    file_id = finished_job[1]
    created = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {
                "n_epochs": 2,
                "reduction_factor": 4,
                "kept_layers": [0, 2],
                "learning_rate": [1e-3, 1e-2],
                "n_seeds": 2,
                "collapse_retries": 0,  # the sweep's own account, without retries' epochs
            },
        },
    )
    assert created.status_code == 200, created.text
    job = wait_for(client, created.json()["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert len(result["candidates"]) == 4 and result["sweep"] == {
        "lr": [1e-3, 1e-2],
        "seed": [0, 1],
    }
    assert all(len(c["history"]) == 2 for c in result["candidates"])
    best = max(c["best_val_accuracy"] for c in result["candidates"])
    assert result["candidates"][result["chosen"]]["best_val_accuracy"] == best
    events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    epochs = [
        e for e in events if e.get("data", {}).get("step") == "training" and "epoch" in e["data"]
    ]
    assert len(epochs) == 2 and all(len(e["data"]["candidates"]) == 4 for e in epochs)
    assert "(the best so far of 4 configurations)" in epochs[0]["message"]


def test_several_side_models_share_one_pass(service, finished_job):
    client = service["client"]
    model = finished_job[0]["fine_tuned_model"]
    response = client.post("/v1/predict", json={"model": [model, model], "inputs": ["fine"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["models"] == [model, model] and len(body["predictions"]) == 2
    assert body["predictions"][0] == body["predictions"][1]


def test_a_broken_model_fails_only_the_requests_that_name_it(service, finished_job):
    """Requests micro-batched into one pass: one names a model whose weights are truncated,
    one a model deleted meanwhile, two a healthy model. The healthy ones are answered; the
    others get their own error, the damaged one as the server's fault, naming no server path."""
    import asyncio
    import shutil

    from api.serving import ModelNotFound, ModelUnavailable

    s = service["client"].app.state.ladder
    healthy = finished_job[0]["fine_tuned_model"]
    source = s.db.get_model(healthy)["path"]
    damaged_dir = service["tmp"] / "damaged"
    shutil.copytree(source, damaged_dir)
    weights = damaged_dir / "side_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    s.db.add_model("ft:tiny:damaged:1", "tiny", str(damaged_dir), "job-x")
    s.db.add_model("ft:tiny:gone:1", "tiny", source, "job-y")
    s.db.delete_model("ft:tiny:gone:1")

    async def four_at_once():
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(4)]
        from api.serving import _Chunk, _Request

        requests = [
            _Request("tiny", [healthy], ["a lovely ride"], None, futures[0]),
            _Request("tiny", ["ft:tiny:damaged:1"], ["a ride"], None, futures[1]),
            _Request("tiny", ["ft:tiny:gone:1", healthy], ["a ride"], None, futures[2]),
            _Request("tiny", [healthy], ["an awful ride", "ok"], None, futures[3]),
        ]
        return s.batcher._run([_Chunk(r, 0, len(r.texts)) for r in requests])

    first, damaged, gone, last = asyncio.run(four_at_once())
    assert len(first) == 1 and len(first[0]) == 1 and len(last[0]) == 2
    assert isinstance(damaged, ModelUnavailable) and str(damaged_dir) not in str(damaged)
    assert isinstance(gone, ModelNotFound)
    response = service["client"].post(
        "/v1/predict", json={"model": "ft:tiny:damaged:1", "inputs": ["a ride"]}
    )
    assert_error(response, 500, "model_unavailable", "model")
    assert str(damaged_dir) not in response.text and "fine-tune it again" in response.text


def test_a_small_request_is_not_held_behind_a_large_one(service, finished_job):
    """A request of 256 texts passes in chunks of 64; a one-text request arriving meanwhile is
    answered after one chunk, before the large one is done."""
    import threading

    client, model = service["client"], finished_job[0]["fine_tuned_model"]
    done = {}

    def ask(name, inputs):
        response = client.post("/v1/predict", json={"model": model, "inputs": inputs})
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == len(inputs)
        done[name] = time.perf_counter()

    large = threading.Thread(
        target=ask, args=("large", [f"ride number {k} " * 20 for k in range(256)])
    )
    large.start()
    time.sleep(0.02)
    ask("small", ["a fine ride"])
    large.join()
    assert done["small"] < done["large"]


def test_active_jobs_are_capped(service, finished_job, monkeypatch):
    monkeypatch.setenv("LADDER_MAX_ACTIVE_JOBS", "0")
    response = service["client"].post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": finished_job[1]}
    )
    assert_error(response, 429, "too_many_jobs")


def test_a_full_prediction_queue_answers_503(service, finished_job, monkeypatch):
    s = service["client"].app.state.ladder
    monkeypatch.setattr(s.batcher, "max_queue", 0)
    response = service["client"].post(
        "/v1/predict", json={"model": finished_job[0]["fine_tuned_model"], "inputs": ["x"]}
    )
    assert_error(response, 503, "overloaded")


def test_side_models_are_cached_within_a_byte_budget(service, finished_job, monkeypatch):
    s = service["client"].app.state.ladder
    model = finished_job[0]["fine_tuned_model"]
    path = s.db.get_model(model)["path"]
    for k in range(3):
        s.db.add_model(f"ft:tiny:copy:{k}", "tiny", path, "job")
    one = module_bytes(s.registry.side(model))
    monkeypatch.setattr(s.registry, "max_side_bytes", 2 * one)
    for k in range(3):
        s.registry.side(f"ft:tiny:copy:{k}")
    assert list(s.registry.sides) == ["ft:tiny:copy:1", "ft:tiny:copy:2"]  # least recent out
    response = service["client"].post("/v1/predict", json={"model": model, "inputs": ["x"]})
    assert response.status_code == 200  # loaded again on demand


def cache_of_copies(service, finished_job, monkeypatch, prefix: str, n: int, budget: int):
    """n copies of the finished job's model registered as ft:tiny:<prefix>:<k>, the side-model
    cache emptied, the first copy loaded, and a budget of `budget` such models: (service state,
    the copies' names, one model's bytes as the cache counts them)."""
    s = service["client"].app.state.ladder
    path = s.db.get_model(finished_job[0]["fine_tuned_model"])["path"]
    names = [f"ft:tiny:{prefix}:{k}" for k in range(n)]
    for name in names:
        s.db.add_model(name, "tiny", path, "job")
    monkeypatch.setattr(s.registry, "sides", type(s.registry.sides)())  # none held
    monkeypatch.setattr(s.registry, "_bytes", {})
    monkeypatch.setattr(s.registry, "evictions", 0)
    one = module_bytes(s.registry.side(names[0]))
    monkeypatch.setattr(s.registry, "max_side_bytes", budget * one)
    return s, names, one


def test_room_is_made_before_a_model_loads(service, finished_job, monkeypatch):
    """Loading a model never takes the cache past its budget, even for a moment: the least
    recently used model goes first, for what the new one cost when last loaded (a first load:
    its weights file's size)."""
    import api.serving

    s, names, one = cache_of_copies(service, finished_job, monkeypatch, "room", 3, 2)
    held_at_load = []
    load = api.serving.load_side_model

    def watched(model_dir, **kwargs):
        held_at_load.append(list(s.registry.sides))
        return load(model_dir, **kwargs)

    monkeypatch.setattr(api.serving, "load_side_model", watched)
    for name in (names[1], names[2], names[0]):  # names[0] again: its size is known now
        s.registry.side(name)
    # The first load's weights file fitted beside one model; before each later load the least
    # recently used left.
    assert held_at_load == [[names[0]], [names[1]], [names[2]]]
    assert list(s.registry.sides) == [names[2], names[0]]


def test_a_pass_keeps_its_own_models_when_it_makes_room(service, finished_job, monkeypatch):
    """Models a pass has already taken stay in memory until it ends: evicting them would free
    nothing, so room is made from the other models, and the budget counts what is held."""
    s, names, one = cache_of_copies(service, finished_job, monkeypatch, "keep", 4, 2)
    s.registry.side(names[1])  # held: 0, 1 (0 least recently used)
    s.registry.side(names[2], keep=frozenset(names[:1] + names[2:3]))
    assert list(s.registry.sides) == [names[0], names[2]]  # 1 out, not the pass's 0
    pass_models = frozenset(names[1:])  # three models, more than the budget holds
    for name in sorted(pass_models):
        s.registry.side(name, keep=pass_models)
    assert set(s.registry.sides) == pass_models
    s.registry.side(names[0])  # the next pass makes room down to the budget again
    assert list(s.registry.sides) == [names[3], names[0]]
    assert s.registry.held()["bytes"] <= 2 * one


def test_a_request_naming_more_models_than_the_budget_holds(service, finished_job, monkeypatch):
    """Its pass holds all of them, counted (none is evicted while the pass still uses it), and
    the registry is back within the budget when the pass ends."""
    import api.serving

    s, names, one = cache_of_copies(service, finished_job, monkeypatch, "many", 3, 1)
    held_during_pass = []
    joint_model = api.serving.JointModel

    def watched(backbone, sides, **kw):
        held_during_pass.append(s.registry.held()["models"])
        return joint_model(backbone, sides, **kw)

    monkeypatch.setattr(api.serving, "JointModel", watched)
    response = service["client"].post("/v1/predict", json={"model": names, "inputs": ["x"]})
    assert response.status_code == 200, response.text
    assert held_during_pass == [3]
    assert s.registry.held()["models"] == 1 and s.registry.held()["bytes"] <= one


def test_a_pass_that_unloads_models_hands_the_memory_back(service, finished_job, monkeypatch):
    """malloc keeps freed memory for later: a pass that evicted side models trims it (so the
    server's memory follows the budget), a pass that evicted nothing does not pay for it."""
    import api.serving

    s, names, one = cache_of_copies(service, finished_job, monkeypatch, "trim", 2, 1)
    trims = []
    monkeypatch.setattr(api.serving, "release_freed_memory", lambda: trims.append(1))
    predict = service["client"].post
    assert predict("/v1/predict", json={"model": names[0], "inputs": ["x"]}).status_code == 200
    assert trims == []  # held already: nothing unloaded
    assert predict("/v1/predict", json={"model": names[1], "inputs": ["x"]}).status_code == 200
    assert trims == [1] and s.registry.evictions == 1


def test_pair_models_are_served_with_pairs(service, finished_job):
    """A model trained on (text, text_pair) rows predicts from pairs; a lone text for it, or a
    pair for a single-text model, is a 400 that says which to send."""
    import csv

    client = service["client"]
    path = service["tmp"] / "pairs.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "text_pair", "label"])
        for k in range(60):
            same = k % 2 == 0
            writer.writerow(
                [
                    f"ride number {k}",
                    f"ride number {k if same else k + 7}",
                    "same" if same else "other",
                ]
            )
    file_id = upload(client, path).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "reduction_factor": 4, "kept_layers": [0, 2]},
        },
    ).json()
    pair_model = wait_for(client, job["id"])["fine_tuned_model"]
    pair = {"text": "ride number 3", "text_pair": "ride number 3"}
    response = client.post("/v1/predict", json={"model": pair_model, "inputs": [pair, pair]})
    assert response.status_code == 200, response.text
    assert {p["label"] for p in response.json()["predictions"]} <= {"same", "other"}
    assert_error(
        client.post("/v1/predict", json={"model": pair_model, "inputs": ["alone"]}),
        400,
        "invalid_request_error",
        "inputs",
    )
    single = finished_job[0]["fine_tuned_model"]
    assert_error(
        client.post("/v1/predict", json={"model": single, "inputs": [pair]}),
        400,
        "invalid_request_error",
        "inputs",
    )
    assert_error(
        client.post("/v1/predict", json={"model": single, "inputs": [pair, "x"]}),
        400,
        "invalid_request_error",
        "inputs",
    )


def test_a_damaged_database_is_set_aside_and_models_still_serve(service, finished_job, tmp_path):
    """The server starts on a home whose database is garbage: the file is moved aside, the
    models and uploads are registered again from the home, and predictions work."""
    import shutil
    from pathlib import Path

    model = finished_job[0]["fine_tuned_model"]
    source = Path(service["client"].app.state.ladder.db.get_model(model)["path"])
    home = tmp_path / "home"
    (home / "files").mkdir(parents=True)
    shutil.copytree(source, home / "models" / source.name)
    write_csv(home / "files" / "file-abc.csv", n=40)
    garbage = b"this is not a database " * 200
    (home / "ladder.db").write_bytes(garbage)
    with TestClient(create_app(home=home, executor="thread", preload=["tiny"])) as client:
        deadline = time.time() + 30
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert model in {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert [f["id"] for f in client.get("/v1/files").json()["data"]] == ["file-abc"]
        response = client.post("/v1/predict", json={"model": model, "inputs": ["a fine ride"]})
        assert response.status_code == 200, response.text
        aside = Path(client.get("/info").json()["database_recovered_from"])
    assert aside.read_bytes() == garbage


def test_uploads_and_models_reach_the_disk_before_the_database(service, monkeypatch):
    """What the database acknowledges is flushed to disk first: an upload before its file
    record, a model's weights and record before the job commits it."""
    import os

    import api.db

    client, s = service["client"], service["client"].app.state.ladder
    order = []
    real_fsync = os.fsync

    def fsync(fd):
        order.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def recorded(name, real):
        def call(*args, **kwargs):
            order.append((name, None))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(s.db, "add_file", recorded("add_file", s.db.add_file))
    monkeypatch.setattr(
        api.db.Database, "finish_job", recorded("finish_job", api.db.Database.finish_job)
    )
    path = service["tmp"] / "durable.csv"
    write_csv(path, n=60)
    file_id = upload(client, path).json()["id"]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {"n_epochs": 1, "reduction_factor": 4, "kept_layers": [0]},
        },
    ).json()
    assert wait_for(client, job["id"])["status"] == "succeeded"

    def first(name, path_part=None):
        return next(
            k
            for k, (what, where) in enumerate(order)
            if what == name and (path_part is None or path_part in where)
        )

    assert first("fsync", file_id) < first("add_file")
    for name in ("side_model.safetensors", "side_config.json", "model.json"):
        assert first("fsync", f"{job['id']}/{name}") < first("finish_job")


def test_events_page_and_stream(service, finished_job):
    client = service["client"]
    job_id = finished_job[0]["id"]
    page = client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 2}).json()
    assert page["object"] == "list" and len(page["data"]) == 2 and page["has_more"]
    rest = client.get(
        f"/v1/fine_tuning/jobs/{job_id}/events", params={"after": page["data"][-1]["id"]}
    ).json()
    assert rest["data"] and rest["data"][0]["id"] != page["data"][-1]["id"]
    with client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events?stream=true") as stream:
        lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and any("succeeded" in line for line in lines)


def test_job_list_paging(service, finished_job):
    client = service["client"]
    first = client.get("/v1/fine_tuning/jobs", params={"limit": 1}).json()
    assert first["object"] == "list" and len(first["data"]) == 1


def test_cancel_queued_job(service, finished_job):
    client = service["client"]
    job = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": finished_job[1]}
    ).json()
    cancelled = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert wait_for(client, job["id"])["status"] == "cancelled"
    again = client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
    assert_error(again, 409, "job_not_cancellable")


def test_bad_uploads(service):
    client = service["client"]
    tmp = service["tmp"]
    (tmp / "one.csv").write_text("text,label\n" + "".join(f"t{k},a\n" for k in range(20)))
    assert_error(upload(client, tmp / "one.csv"), 400, "invalid_file", "file")
    (tmp / "cols.csv").write_text(
        "sentence,label\n" + "".join(f"t{k},{k % 2}\n" for k in range(20))
    )
    assert_error(upload(client, tmp / "cols.csv"), 400, "invalid_file", "file")
    (tmp / "few.csv").write_text("text,label\na,x\nb,y\n")
    assert_error(upload(client, tmp / "few.csv"), 400, "invalid_file", "file")
    (tmp / "notes.txt").write_text("hello")
    assert_error(upload(client, tmp / "notes.txt"), 400, "invalid_file", "file")
    (tmp / "latin.csv").write_bytes(b"text,label\n" + "caf\xe9,a\n".encode("latin-1") * 12)
    assert_error(upload(client, tmp / "latin.csv"), 400, "invalid_file", "file")
    response = client.post(
        "/v1/files",
        data={"purpose": "batch"},
        files={"file": ("x.csv", b"text,label\n", "text/csv")},
    )
    assert_error(response, 400, "invalid_purpose", "purpose")
    assert client.get("/v1/files").json()["data"] == [
        f for f in client.get("/v1/files").json()["data"] if f["rows"] >= 10
    ]


@pytest.mark.parametrize(
    "name, content, words",
    [
        (
            "sentences.csv",
            "sentence,label\n" + "".join(f"t{k},{k % 2}\n" for k in range(20)),
            ["sentences.csv has no column 'text'", "rename it to 'text'"],
        ),
        (
            "one-class.csv",
            "text,label\n" + "".join(f"t{k},a\n" for k in range(20)),
            ["single class 'a'", "add rows of another class", "rename it to 'label'"],
        ),
        ("latin.csv", b"text,label\n" + "caf\xe9,a\n".encode("latin-1") * 12, ["re-save it"]),
    ],
    ids=["no-text-column", "one-class", "latin-1"],
)
def test_an_upload_error_says_what_to_change_in_the_file(service, name, content, words):
    """An upload's columns are fixed: the fix is a column renamed, not a command-line flag."""
    path = service["tmp"] / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    response = upload(service["client"], path)
    assert_error(response, 400, "invalid_file", "file")
    message = response.json()["error"]["message"]
    assert all(w in message for w in words), message


@pytest.mark.parametrize("model", ["nobody/no-such-model", "gpt2"])
def test_a_backbone_the_server_lacks_is_refused_without_the_servers_details(service, model):
    # Not in the server's Hugging Face cache, and the tests run offline: the server's reason
    # names its cache directory and a shell command, neither the client's business.
    client = service["client"]
    response = client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": "x"})
    assert_error(response, 400, "model_not_found", "model")
    assert "tiny" in response.json()["error"]["message"]
    params = {"model": model, "training_file": "file-x"}
    assert_error(
        client.get("/v1/fine_tuning/hyperparameters", params=params), 400, "model_not_found"
    )


def broken_backbone(source: str, path, edit) -> str:
    """A copy of the model directory `source` whose config.json `edit` changes."""
    shutil.copytree(source, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(edit(config)))
    return str(path)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "no model_type"),
        (lambda c: {"model_type": "resnet", "architectures": ["ResNetModel"]}, "'resnet'"),
        (
            lambda c: {**c, "model_type": "own", "auto_map": {"AutoModel": "own.OwnModel"}},
            "own code",
        ),
    ],
    ids=["no-model-type", "resnet", "auto-map"],
)
def test_a_backbone_directory_ladder_cannot_read_is_a_client_error(
    service, finished_job, tiny_bert_dir, tmp_path, edit, words
):
    client = service["client"]
    model = broken_backbone(tiny_bert_dir, tmp_path / "backbone", edit)
    body = {"model": model, "training_file": finished_job[1]}
    for response in (
        client.get("/v1/fine_tuning/hyperparameters", params=body),
        client.post("/v1/fine_tuning/jobs", json=body),
    ):
        assert_error(response, 400, "invalid_model", "model")
        assert words in response.json()["error"]["message"]


def test_a_csv_header_field_over_the_csv_limit_is_a_client_error(service):
    path = service["tmp"] / "long-header.csv"
    path.write_text("text,label," + "x" * 140_000 + "\n" + "a,b,c\n" * 12)
    response = upload(service["client"], path)
    assert_error(response, 400, "invalid_file", "file")
    assert "line 1 cannot be read as CSV" in response.json()["error"]["message"]


@pytest.mark.parametrize("name", ["org/tinybert", "directory"])
def test_a_model_of_a_hub_named_or_local_backbone_predicts_and_deletes(
    service, finished_job, tiny_bert_dir, monkeypatch, name
):
    """A backbone named by a hub id or a server directory gives a model id that the id checks
    take and that shows no path; the model's record keeps the backbone as it was named."""
    client = service["client"]
    monkeypatch.setenv("LADDER_BACKBONES", f"tiny={tiny_bert_dir},org/tinybert={tiny_bert_dir}")
    backbone = tiny_bert_dir if name == "directory" else name
    # Layers of their own: a store records the name of the backbone that built it, and the same
    # weights under another name are refused by a store built with the same settings.
    layers = [0, 1] if name == "directory" else [1, 2]
    job = client.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": backbone,
            "training_file": finished_job[1],
            "hyperparameters": {"n_epochs": 1, "reduction_factor": 4, "kept_layers": layers},
        },
    ).json()
    job = wait_for(client, job["id"])
    assert job["status"] == "succeeded", job["error"]
    model = job["fine_tuned_model"]
    expected = "org--tinybert" if name == "org/tinybert" else Path(tiny_bert_dir).name
    assert model == f"ft:{expected}:side:{job['id'][-8:]}"
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[model]["backbone"] == backbone
    response = client.post("/v1/predict", json={"model": model, "inputs": ["a lovely ride"]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] in ("pos", "neg")
    assert client.delete(f"/v1/models/{model}").json()["deleted"] is True
    assert model not in {m["id"] for m in client.get("/v1/models").json()["data"]}


def test_ready_on_a_full_disk_names_no_server_setting(service, monkeypatch):
    monkeypatch.setenv("LADDER_MIN_FREE_MB", str(2**40))
    assert_error(service["client"].get("/ready"), 503, "disk_full")


def test_unknown_ids_are_404(service):
    client = service["client"]
    assert_error(client.get("/v1/fine_tuning/jobs/ftjob-nope"), 404, "job_not_found", "job_id")
    assert_error(client.get("/v1/files/file-nope"), 404, "file_not_found", "file_id")
    assert_error(
        client.post("/v1/predict", json={"model": "ft:none", "inputs": ["x"]}),
        404,
        "model_not_found",
        "model",
    )
    assert_error(client.delete("/v1/models/ft:none"), 404, "model_not_found", "model_id")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_path_tricks_in_ids_are_refused(service):
    client = service["client"]
    # An encoded slash splits the path, so no route matches it at all.
    assert_error(client.get("/v1/fine_tuning/jobs/..%2F..%2Fetc"), 404, "not_found")
    assert_error(client.get("/v1/files/a..b"), 400, "invalid_id", "file_id")


def test_bad_job_requests(service, finished_job):
    client = service["client"]
    file_id = finished_job[1]
    jobs = "/v1/fine_tuning/jobs"
    # A backbone name the file system refuses (found by test_schemathesis: "~user" of no such
    # user made Path.expanduser raise, a 500), too long a name, a NUL byte.
    for model in ("gpt-9", "~no-such-user-of-ladder/model"):
        assert_error(
            client.post(jobs, json={"model": model, "training_file": file_id}),
            400,
            "model_not_found",
            "model",
        )
    for model in ("m" * 5000, "a\x00b"):  # refused by the checks before it, or as above
        response = client.post(jobs, json={"model": model, "training_file": file_id})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert_error(
        client.post(jobs, json={"model": "tiny", "training_file": "file-missing"}),
        400,
        "file_not_found",
        "training_file",
    )
    bad = {"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 0}}
    response = client.post(jobs, json=bad)
    assert_error(response, 400, "invalid_request_error", "hyperparameters.n_epochs")
    # The message is the one of the kind of value sent (a number), not "should be 'auto'".
    assert "greater than or equal to 1" in response.json()["error"]["message"]
    bad["hyperparameters"] = {"n_epochs": "many"}  # fits no kind: every kind is named
    message = client.post(jobs, json=bad).json()["error"]["message"]
    assert "'auto'" in message and "valid integer" in message
    bad["hyperparameters"] = {"reduction_factor": 5}
    assert_error(
        client.post(jobs, json=bad),
        400,
        "invalid_hyperparameter",
        "hyperparameters.reduction_factor",
    )
    bad["hyperparameters"] = {"reduction_factor": [4, 5]}  # a sweep: every value is checked
    assert_error(
        client.post(jobs, json=bad),
        400,
        "invalid_hyperparameter",
        "hyperparameters.reduction_factor",
    )
    bad["hyperparameters"] = {"reduction_factor": 4, "side_heads": [1, 3]}  # 8 wide: 3 heads?
    response = client.post(jobs, json=bad)
    assert_error(response, 400, "invalid_hyperparameter", "hyperparameters.side_heads")
    assert "multiple of the 3 attention heads" in response.json()["error"]["message"]
    bad["hyperparameters"] = {"learning_rate": [1e-3, 2e-3, 3e-3], "n_seeds": 30}
    assert_error(client.post(jobs, json=bad), 400, "invalid_hyperparameter", "hyperparameters")
    bad["hyperparameters"] = {"learning_rate": [1e-3, 2]}
    assert_error(
        client.post(jobs, json=bad), 400, "invalid_request_error", "hyperparameters.learning_rate.1"
    )
    bad["hyperparameters"] = {"learning_rate": [1e-3, 3e-3], "sweep_schedule": "halve"}
    assert_error(
        client.post(jobs, json=bad), 400, "invalid_request_error", "hyperparameters.sweep_schedule"
    )
    bad["hyperparameters"] = {"kept_layers": [0, 7]}
    assert_error(
        client.post(jobs, json=bad), 400, "invalid_hyperparameter", "hyperparameters.kept_layers"
    )
    # A stored width that does not fit the backbone's 32: refused at creation, not at caching.
    for width, words in (("d/5", "5 does not divide"), (32, "stored width 32 is not below")):
        bad["hyperparameters"] = {"cache_width": width}
        response = client.post(jobs, json=bad)
        assert_error(response, 400, "invalid_hyperparameter", "hyperparameters.cache_width")
        message = response.json()["error"]["message"]
        assert message.startswith(f"hyperparameters.cache_width {width}: {words}"), message
    bad["hyperparameters"] = {"epochs": 3}
    assert_error(client.post(jobs, json=bad), 400, "invalid_request_error")
    # Malformed JSON: the message says so; param is no character offset posing as a field.
    response = client.post(
        jobs, content=b'{"model": "tiny",,}', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_request_error")
    assert response.json()["error"]["param"] is None
    assert "not valid JSON (at character 17" in response.json()["error"]["message"]


def test_empty_inputs_are_refused(service, finished_job):
    client = service["client"]
    model = finished_job[0]["fine_tuned_model"]
    assert_error(
        client.post("/v1/predict", json={"model": model, "inputs": []}),
        400,
        "invalid_request_error",
        "inputs",
    )
    assert_error(
        client.post("/v1/predict", json={"model": model, "inputs": ["  "]}),
        400,
        "invalid_request_error",
        "inputs",
    )


def test_auth_when_api_key_is_set(service, monkeypatch):
    """With a key, only liveness, readiness, metrics and the API description are public; /info
    (loaded model ids, the home path) and every /v1 route need the key."""
    client = service["client"]
    monkeypatch.setenv("LADDER_API_KEY", "s3cret")
    key = {"Authorization": "Bearer s3cret"}
    for path in ("/v1/models", "/v1/files", "/info", "/no/such/route"):
        assert_error(client.get(path), 401, "invalid_api_key")
        assert_error(
            client.get(path, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"
        )
    assert client.get("/v1/models", headers=key).status_code == 200
    assert client.get("/info", headers=key).status_code == 200
    for path in ("/health", "/ready", "/metrics", "/openapi.json", "/docs"):
        assert client.get(path).status_code == 200, path
    # Refused before the body is looked at: an upload without the key gets 401, not a 4xx about
    # the file.
    assert_error(client.post("/v1/files", content=b"x" * 1000), 401, "invalid_api_key")


def test_bodies_over_a_routes_cap_are_refused(service, monkeypatch):
    client = service["client"]
    monkeypatch.setenv("LADDER_MAX_PREDICT_BYTES", "1000")
    big = {"model": "ft:x", "inputs": ["y" * 2000]}
    assert_error(client.post("/v1/predict", json=big), 413, "request_too_large")
    # Without a Content-Length (chunked), the bytes received are counted.
    chunks = (b'{"model": "ft:x", "inputs": ["' + b"y" * 500 + b'"' for _ in range(4))
    assert_error(client.post("/v1/predict", content=chunks), 413, "request_too_large")
    assert_error(
        client.post(
            "/v1/fine_tuning/jobs",
            content=b"{" + b" " * (2**20 + 10) + b"}",
            headers={"content-type": "application/json"},
        ),
        413,
        "request_too_large",
    )


def test_server_errors_are_counted(service, monkeypatch):
    """A route that crashes answers 500 with the error shape, and /metrics counts it."""
    s = service["client"].app.state.ladder

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(s.db, "list_files", broken)
    client = TestClient(service["client"].app, raise_server_exceptions=False)
    assert_error(client.get("/v1/files"), 500, "internal_error")
    text = client.get("/metrics").text
    assert 'ladder_requests_total{method="GET",route="/v1/files",status="500"} 1.0' in text


def test_operations_endpoints(service):
    client = service["client"]
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    # (Other tests of this module's service load other names of the tiny backbone too.)
    assert "tiny" in client.get("/info").json()["backbones_loaded"]
    text = client.get("/metrics").text
    assert "ladder_requests_total" in text and 'ladder_jobs{status="succeeded"}' in text


def test_delete_model(service, finished_job):
    client = service["client"]
    assert_error(client.delete("/v1/models/tiny"), 400, "model_not_deletable", "model_id")


def test_openapi_spec_is_complete(service):
    spec = service["client"].get("/openapi.json").json()
    for path in (
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/fine_tuning/jobs/{job_id}/cancel",
        "/v1/fine_tuning/jobs/{job_id}/events",
        "/v1/models",
        "/v1/predict",
    ):
        assert path in spec["paths"]
    assert {"JobObject", "FileObject", "PredictRequest", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )


def test_gguf_backbones_convert_at_start_not_in_a_request(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "backbone_worker.backbone.convert_gguf_aliases", lambda: calls.append("smollm2") or calls
    )
    app = create_app(home=tmp_path, executor="thread", preload=[], convert_at_start=True)
    with TestClient(app):
        deadline = time.time() + 30
        while not calls and time.time() < deadline:
            time.sleep(0.05)
    assert calls == ["smollm2"]
    calls.clear()
    with TestClient(
        create_app(home=tmp_path, executor="thread", preload=[], convert_at_start=False)
    ):
        time.sleep(0.5)
    assert calls == []


def test_resolved_hyperparameters_before_a_job(service, finished_job):
    """What "auto" becomes for a backbone and an upload: the job form shows it; a job created
    with nothing set runs with exactly these values."""
    client = service["client"]
    job, file_id = finished_job
    url = "/v1/fine_tuning/hyperparameters"
    listed = client.get(url, params={"model": "tiny", "training_file": file_id})
    assert listed.status_code == 200, listed.text
    values = {hp["name"]: hp["value"] for hp in listed.json()["data"]}
    rows = client.get(f"/v1/files/{file_id}").json()["rows"]
    assert values["n_epochs"] == (10 if rows < 1000 else 5)  # depends on the upload's size
    assert "auto" not in values.values()
    by_name = {hp["name"]: hp for hp in listed.json()["data"]}
    assert by_name["learning_rate"]["sweep"] and not by_name["batch_size"]["sweep"]
    assert by_name["init"]["choices"] == ["fisher", "magnitude", "random"]
    created = client.post(
        "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id}
    ).json()
    assert created["hyperparameters"] == values  # known from the start, not "auto" till it runs
    done = wait_for(client, created["id"])
    assert done["hyperparameters"] == values
    assert_error(
        client.get(url, params={"model": "nope", "training_file": file_id}),
        400,
        "model_not_found",
        "model",
    )
    assert_error(
        client.get(url, params={"model": "tiny", "training_file": "file-missing"}),
        400,
        "file_not_found",
        "training_file",
    )
    assert_error(client.get(url, params={"model": "tiny"}), 400, "invalid_request_error")


def test_side_heads_resolve_to_a_count_before_and_after_a_job(service, finished_job):
    """The side heads a job takes by default are a number wherever they are shown: MiniLM's
    at r 8 are 3 (384/8 = 48 dims, heads 16 wide); tiny BERT's (32/r dims, under 16), one.
    The count a job ran with is the one its model records."""
    client = service["client"]
    file_id = finished_job[1]
    url = "/v1/fine_tuning/hyperparameters"

    def side_heads(model: str) -> int:
        listed = client.get(url, params={"model": model, "training_file": file_id})
        assert listed.status_code == 200, listed.text
        return {hp["name"]: hp["value"] for hp in listed.json()["data"]}["side_heads"]

    assert side_heads("minilm") == 3 and side_heads("tiny") == 1
    job = finished_job[0]
    recorded = json.loads(
        (service["home"] / "models" / job["id"] / "side_config.json").read_text()
    )["heads"]
    assert job["hyperparameters"]["side_heads"] == recorded == 1


def test_a_side_model_names_its_job_and_file_and_carries_its_test_figures(service, finished_job):
    client = service["client"]
    job, file_id = finished_job
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    side = models[job["fine_tuned_model"]]
    assert (side["job_id"], side["training_file"], side["training_filename"]) == (
        job["id"],
        file_id,
        "train.csv",
    )
    test = job["result"]["test"]
    matrix = test["confusion_matrix"]
    hits = sum(matrix[k][k] for k in range(len(matrix)))
    assert side["test_accuracy"] == pytest.approx(hits / sum(map(sum, matrix)))
    assert side["test_macro_f1"] == test["macro_f1"]
    assert side["warning"] == job["result"]["warning"]
    backbone = models["tiny"]
    assert backbone["job_id"] is None and backbone["test_accuracy"] is None


def test_a_model_no_better_than_the_majority_class_says_so_where_it_is_listed(
    tmp_path, monkeypatch
):
    """The warning of the model's job's result, and its figures, on its entry; a job whose
    file was removed still names the file's id."""
    monkeypatch.delenv("LADDER_API_KEY", raising=False)
    warning = {"code": "majority_class", "message": "no better than the majority class"}
    with TestClient(create_app(home=tmp_path, executor="thread", preload=[])) as client:
        db = Database(tmp_path / "ladder.db")
        db.add_job(
            {
                "id": "ftjob-1",
                "created_at": 1,
                "model": "tiny",
                "training_file": "file-gone",
                "validation_file": None,
                "seed": None,
                "suffix": None,
                "status": "training",
                "hyperparameters": {},
            }
        )
        result = {"test_accuracy": 0.688, "test_macro_f1": 0.41, "warning": warning}
        assert db.finish_job("ftjob-1", "ft:tiny:side:1", "tiny", str(tmp_path), result)
        listed = client.get("/v1/models").json()["data"]
    side = next(m for m in listed if m["kind"] == "side")
    assert side["warning"] == warning
    assert (side["test_accuracy"], side["test_macro_f1"]) == (0.688, 0.41)
    assert (side["training_file"], side["training_filename"]) == ("file-gone", None)
