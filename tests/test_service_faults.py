"""Fault injection against real `ladder serve` processes (tiny backbone, jobs in a worker thread,
LADDER_API_KEY set): hostile requests, damaged models, two servers on one home, a full disk,
SIGKILL at each step of a job."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import finetune_argv
from test_cli import write_csv
from test_service_process import free_port, start_server, wait_status

from api.cli import main as cli
from api.db import Database

KEY = "fault-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def env_for(tiny_bert_dir: str, **extra) -> dict:
    return {
        "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
        "LADDER_PRELOAD": "tiny",
        "LADDER_EXECUTOR": "thread",
        "LADDER_API_KEY": KEY,
        **extra,
    }


class Server:
    def __init__(self, home: Path, env: dict):
        self.home, self.env = home, env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = start_server(home, self.port, env)

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.base + path, headers=AUTH, timeout=60, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.base + path, headers=AUTH, timeout=60, **kw)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self, sig=signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(timeout=60)


def upload(server: Server, path: Path) -> httpx.Response:
    with open(path, "rb") as handle:
        return server.post(
            "/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": (path.name, handle, "text/csv")},
        )


def create_job(server: Server, file_id: str, **hp) -> str:
    response = server.post(
        "/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {"reduction_factor": 4, "kept_layers": [0, 2], **hp},
        },
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def wait_job(
    server: Server, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 240
) -> dict:
    return wait_status(server.base, job_id, statuses, timeout, headers=AUTH)


def all_events(server: Server, job_id: str) -> list[dict]:
    return server.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}).json()[
        "data"
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("faults")
    s = Server(home, env_for(tiny_bert_dir))
    yield s
    s.stop()


def test_an_unauthenticated_200_mib_upload_is_refused_before_its_body(server):
    """Headers announcing 200 MiB, then the body: the 401 comes back after the first MiB, the
    server reads no more of it (the connection closes), keeps no file and barely grows."""
    before = server.rss_mb()
    files_before = sorted((server.home / "files").iterdir())
    boundary = "x" * 16
    head = (
        f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {200 * 2**20}\r\n\r\n"
    ).encode()
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + b"a" * 2**20)
        sent = 2**20
        answer = _read_answer(sock)
        assert answer.startswith("HTTP/1.1 401") and "invalid_api_key" in answer, answer
        try:
            for _ in range(199):
                sock.sendall(b"a" * 2**20)
                sent += 2**20
        except OSError:
            pass  # the server closed the connection
    assert sent < 200 * 2**20
    assert server.rss_mb() - before < 64
    assert sorted((server.home / "files").iterdir()) == files_before
    # With the key but announcing more than the route takes: 413 before the body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head.replace(b"Host:", f"Authorization: Bearer {KEY}\r\nHost:".encode()))
        answer = _read_answer(sock)
    assert answer.startswith("HTTP/1.1 413") and "request_too_large" in answer, answer


def _read_answer(sock: socket.socket) -> str:
    """What the server sent, up to its closing the connection or a pause of a second."""
    sock.settimeout(1.0)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, OSError):
        pass
    sock.settimeout(30)
    return data.decode(errors="replace")


def test_a_200000_character_csv_field_is_a_4xx_and_leaves_no_file(server, tmp_path):
    path = tmp_path / "long.csv"
    rows = [f"text number {k},{'pos' if k % 2 else 'neg'}" for k in range(20)]
    path.write_text("text,label\n" + "y" * 200_000 + ",pos\n" + "\n".join(rows) + "\n")
    files_before = sorted((server.home / "files").iterdir())
    response = upload(server, path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_file"
    assert sorted((server.home / "files").iterdir()) == files_before


def test_models_list_needs_the_key(server):
    response = httpx.get(server.base + "/v1/models")
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_a_damaged_model_does_not_fail_requests_for_healthy_ones(tmp_path, tiny_bert_dir):
    """Six concurrent requests for a healthy model and one for a model whose weights were
    truncated: the six are answered, the seventh gets an error object."""
    data = write_csv(tmp_path / "d.csv", n=80)
    for name in ("healthy", "damaged"):
        assert (
            cli(
                finetune_argv(
                    tiny_bert_dir,
                    data,
                    tmp_path / "store",
                    tmp_path / "home" / "models" / name,
                    "--layers",
                    "0,2",
                )
            )
            == 0
        )
    weights = tmp_path / "home" / "models" / "damaged" / "side_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    db = Database(tmp_path / "home" / "ladder.db")
    for name in ("healthy", "damaged"):
        db.add_model(f"ft:tiny:{name}:1", "tiny", str(tmp_path / "home" / "models" / name), "job")
    server = Server(tmp_path / "home", env_for(tiny_bert_dir))
    try:
        results: dict[int, httpx.Response] = {}
        start = threading.Barrier(7)

        def ask(k: int) -> None:
            model = "ft:tiny:damaged:1" if k == 6 else "ft:tiny:healthy:1"
            start.wait()
            results[k] = server.post(
                "/v1/predict", json={"model": model, "inputs": [f"a fine ride {k}"]}
            )

        threads = [threading.Thread(target=ask, args=(k,)) for k in range(7)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for k in range(6):
            assert results[k].status_code == 200, results[k].text
        damaged = results[6]
        assert damaged.status_code == 500 and damaged.json()["error"]["code"] == "model_unavailable"
        assert str(tmp_path) not in damaged.text
    finally:
        server.stop()


def test_a_second_server_on_the_same_home_runs_no_job_twice(tmp_path, tiny_bert_dir):
    env = env_for(tiny_bert_dir)
    first = Server(tmp_path, env)
    second = None
    try:
        file_id = upload(first, Path(write_csv(tmp_path / "d.csv", n=2000))).json()["id"]
        job_id = create_job(first, file_id, n_epochs=4)
        wait_job(first, job_id, ("caching", "training"))
        second = Server(tmp_path, env)  # started while the job runs
        job = wait_job(second, job_id)
        assert job["status"] == "succeeded", job
        messages = [e["message"] for e in all_events(second, job_id)]
        assert len(messages) == len(set(messages)), messages
        # Jobs created through the second server run too (on the first server's runner).
        other = create_job(second, file_id, n_epochs=1)
        assert wait_job(second, other)["status"] == "succeeded"
    finally:
        for s in (second, first):
            if s is not None:
                s.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs: a disk that can really fill up (needs root, as CI has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_gives_clear_errors_and_keeps_no_partial_file(
    small_disk, tmp_path, tiny_bert_dir
):
    server = Server(small_disk, env_for(tiny_bert_dir, LADDER_MIN_FREE_MB="16"))
    try:
        data = Path(write_csv(tmp_path / "d.csv", n=3000))
        filler = small_disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last block
            for size in (2**20, 4096):
                try:
                    while os.write(fd, b"\0" * size):
                        pass
                except OSError:
                    pass
        finally:
            os.close(fd)
        files_before = sorted((small_disk / "files").iterdir())
        response = upload(server, data)
        assert response.status_code == 507, response.text
        assert response.json()["error"]["code"] == "insufficient_storage"
        assert sorted((small_disk / "files").iterdir()) == files_before
        listing = server.get("/v1/files")
        assert listing.status_code in (200, 503, 507), listing.text
        assert "error" in listing.json() or "data" in listing.json()
        ready = httpx.get(server.base + "/ready")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "disk_full"
        filler.unlink()
        assert upload(server, data).status_code == 200
        assert httpx.get(server.base + "/ready").status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("step", ["caching", "training", "evaluating"])
def test_sigkill_at_each_step_of_a_job_then_restart(tmp_path, tiny_bert_dir, step):
    """Killed while caching, while training, or while evaluating (trained model saved, job not
    committed): the restarted server finishes the job, and a model saved before the kill is not
    trained again."""
    env = env_for(tiny_bert_dir)
    server = Server(tmp_path, env)
    n_epochs = 3
    try:
        file_id = upload(server, Path(write_csv(tmp_path / "d.csv", n=1500))).json()["id"]
        # A validation file makes the evaluating step long enough to be hit.
        validation = upload(server, Path(write_csv(tmp_path / "v.csv", n=6000, seed=1)))
        response = server.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny",
                "training_file": file_id,
                "validation_file": validation.json()["id"],
                "hyperparameters": {
                    "reduction_factor": 4,
                    "kept_layers": [0, 2],
                    "n_epochs": n_epochs,
                },
            },
        )
        job_id = response.json()["id"]
        deadline = time.time() + 240
        while not any(
            e["data"].get("step") == step or e["data"].get("status") == step
            for e in all_events(server, job_id)
        ):
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        server.stop(signal.SIGKILL)
    server = Server(tmp_path, env)
    try:
        job = wait_job(server, job_id)
        assert job["status"] == "succeeded", job
        events = all_events(server, job_id)
        epochs = [e for e in events if "epoch" in e["data"]]  # not the steps' progress
        if step == "evaluating":
            assert len(epochs) == n_epochs, [e["message"] for e in epochs]
        assert sum(e["data"].get("status") == "succeeded" for e in events) == 1
        prediction = server.post(
            "/v1/predict", json={"model": job["fine_tuned_model"], "inputs": ["good ride"]}
        )
        assert prediction.status_code == 200
    finally:
        server.stop()


def test_event_streams_end_with_the_jobs_last_event(server, tmp_path):
    """A cancelled job's stream ends with its "cancelled" event (which comes after the status
    turned cancelled), and nothing follows it."""
    file_id = upload(server, Path(write_csv(tmp_path / "d.csv", n=3000))).json()["id"]
    job_id = create_job(server, file_id, n_epochs=20)
    wait_job(server, job_id, ("caching", "training"))
    assert server.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    with httpx.stream(
        "GET",
        f"{server.base}/v1/fine_tuning/jobs/{job_id}/events",
        params={"stream": "true"},
        headers=AUTH,
        timeout=120,
    ) as stream:
        lines = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert last["data"]["status"] == "cancelled"
    assert os.path.exists(server.home / "ladder.db")


def _health_latency_while(server: Server, work) -> float:
    """The slowest /health answer while `work()` runs in another thread."""
    worker = threading.Thread(target=work)
    worst = 0.0
    worker.start()
    while worker.is_alive():
        start = time.perf_counter()
        assert httpx.get(server.base + "/health", timeout=30).status_code == 200
        worst = max(worst, time.perf_counter() - start)
        time.sleep(0.02)
    worker.join()
    return worst


def test_a_large_upload_does_not_stall_other_requests(server, tmp_path):
    path = tmp_path / "large.csv"
    with open(path, "w") as handle:
        handle.write("text,label\n")
        for k in range(300_000):
            handle.write(
                f"the ride number {k} was {'good' if k % 2 else 'bad'} indeed,"
                f"{'pos' if k % 2 else 'neg'}\n"
            )
    assert path.stat().st_size > 10 * 2**20
    worst = _health_latency_while(server, lambda: upload(server, path).raise_for_status())
    assert worst < 0.5, worst


def test_event_streams_are_capped_and_do_not_stall_other_requests(server, tmp_path):
    file_id = upload(server, Path(write_csv(tmp_path / "d.csv", n=40))).json()["id"]
    job_id = create_job(server, file_id, n_epochs=1)
    wait_job(server, job_id)
    url = f"{server.base}/v1/fine_tuning/jobs/{job_id}/events"
    # Streams of a finished job end at once; to hold them open, follow a job that never ends.
    db = Database(server.home / "ladder.db")
    db.add_job(
        {
            "id": "ftjob-held-open",
            "created_at": 0,
            "model": "tiny",
            "training_file": file_id,
            "validation_file": None,
            "seed": 0,
            "suffix": None,
            "status": "training",
            "hyperparameters": {},
        }
    )
    held = url.replace(job_id, "ftjob-held-open")
    client = httpx.Client(headers=AUTH, timeout=30)
    streams = []
    try:
        for _ in range(64):
            stream = client.stream("GET", held, params={"stream": "true"})
            stream.__enter__()
            streams.append(stream)
        over = client.get(held, params={"stream": "true"})
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_streams"
        worst = max(_health_latency_while(server, lambda: time.sleep(3)), 0)
        assert worst < 0.3, worst
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
        client.close()
        db.update_job("ftjob-held-open", status="cancelled")


@pytest.fixture(scope="module")
def capped_server(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("capped")
    env = env_for(tiny_bert_dir, LADDER_MAX_ACTIVE_JOBS="2", LADDER_MAX_EVENT_STREAMS="2")
    s = Server(home, env)
    yield s
    s.stop()


def _at_once(n: int, request) -> list:
    """`request()` from n threads released together; what each returned (bounded in time)."""
    start = threading.Barrier(n)
    results = []

    def one():
        start.wait(timeout=30)
        results.append(request())

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == n
    return results


def test_simultaneous_event_streams_never_exceed_the_cap(capped_server, tmp_path):
    """40 streams asked for at once, with LADDER_MAX_EVENT_STREAMS=2: at most 2 open, the rest
    refused with 429; each accepted one is held open until every request has its answer."""
    server = capped_server
    file_id = upload(server, Path(write_csv(tmp_path / "d.csv", n=40))).json()["id"]
    db = Database(server.home / "ladder.db")
    db.add_job(
        {
            "id": "ftjob-streamed",
            "created_at": 0,
            "model": "tiny",
            "training_file": file_id,
            "validation_file": None,
            "seed": 0,
            "suffix": None,
            "status": "training",  # never ends, so its streams stay open
            "hyperparameters": {},
        }
    )
    url = f"{server.base}/v1/fine_tuning/jobs/ftjob-streamed/events"
    answered = threading.Barrier(40)

    def stream() -> tuple[int, str]:
        with httpx.stream("GET", url, params={"stream": "true"}, headers=AUTH, timeout=30) as r:
            code = json.loads(r.read())["error"]["code"] if r.status_code != 200 else ""
            try:
                answered.wait(timeout=45)  # the accepted ones stay open meanwhile
            except threading.BrokenBarrierError:
                pass
            return r.status_code, code

    try:
        results = _at_once(40, stream)
    finally:
        db.update_job("ftjob-streamed", status="cancelled")
    accepted = [status for status, _ in results if status == 200]
    assert 1 <= len(accepted) <= 2, results
    assert all(r == (429, "too_many_streams") for r in results if r[0] != 200), results
    # Every slot is given back once its stream closes.
    with httpx.stream("GET", url, params={"stream": "true"}, headers=AUTH, timeout=30) as r:
        assert r.status_code == 200


def test_simultaneous_job_creations_never_exceed_the_cap(capped_server, tmp_path):
    """12 jobs created at once, with LADDER_MAX_ACTIVE_JOBS=2 and no job active before: at most
    2 accepted (long jobs, so none ends meanwhile), the rest refused with 429."""
    server = capped_server
    file_id = upload(server, Path(write_csv(tmp_path / "d.csv", n=3000))).json()["id"]
    body = {
        "model": "tiny",
        "training_file": file_id,
        "hyperparameters": {"reduction_factor": 4, "kept_layers": [0, 2], "n_epochs": 20},
    }
    results = _at_once(12, lambda: server.post("/v1/fine_tuning/jobs", json=body))
    accepted = [r.json()["id"] for r in results if r.status_code == 200]
    try:
        assert 1 <= len(accepted) <= 2, [r.text for r in results]
        refused = [r for r in results if r.status_code != 200]
        assert all(
            r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs" for r in refused
        ), [r.text for r in refused]
    finally:
        for job_id in accepted:
            server.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_large_upload_is_validated_in_constant_memory(tmp_path, tiny_bert_dir):
    """A 10 MiB CSV of 1.7 M short rows: the server's peak memory grows by at most 100 MB while
    it receives, validates and records it (it once grew ~73x the file's size: 2,057 MB for 24
    MiB)."""
    path = tmp_path / "many-rows.csv"
    with open(path, "w") as out:
        out.write("text,label\n")
        row = "".join(f"t{k % 10},{'ab'[k % 2]}\n" for k in range(1000))
        while out.tell() < 10 * 2**20:
            out.write(row)
    (tmp_path / "home").mkdir()
    server = Server(tmp_path / "home", env_for(tiny_bert_dir))
    try:
        # Reset the peak (VmHWM) to the present, so it measures this upload alone.
        Path(f"/proc/{server.proc.pid}/clear_refs").write_text("5")
        before = server.rss_mb()
        response = upload(server, path)
        assert response.status_code == 200, response.text
        grown = _peak_mb(server.proc.pid) - before
        assert response.json()["rows"] == path.read_text().count("\n") - 1
        assert response.json()["n_labels"] == 2
        assert grown <= 100, f"the server's peak grew {grown:.0f} MB over the upload"
    finally:
        server.stop()


def test_a_label_count_past_the_cap_stops_the_upload_early(server, tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("text,label\n" + "".join(f"t,{k}\n" for k in range(1500)))
    response = upload(server, path)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "more than 1,000 distinct labels" in message and "data row 1000" in message


def test_an_upload_killed_while_validating_leaves_nothing_after_a_restart(tmp_path, tiny_bert_dir):
    """SIGKILL once the upload's bytes are on disk and it is being validated: the restarted
    server removes what the dead one left, and keeps every recorded file."""
    home = tmp_path / "home"
    home.mkdir()
    data = Path(write_csv(tmp_path / "d.csv", n=40))
    big = tmp_path / "big.csv"
    with open(big, "w") as out:
        out.write("text,label\n")
        while out.tell() < 8 * 2**20:
            out.write("".join(f"text {k},{'ab'[k % 2]}\n" for k in range(1000)))
    server = Server(home, env_for(tiny_bert_dir))
    kept = upload(server, data)
    assert kept.status_code == 200
    size = big.stat().st_size
    thread = threading.Thread(target=lambda: _quietly(upload, server, big), daemon=True)
    thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for the whole body on disk: validation has begun
        if any(p.stat().st_size >= size for p in (home / "files").iterdir() if p.is_file()):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the upload never reached the disk")
    server.stop(signal.SIGKILL)
    thread.join(timeout=60)
    assert len(list((home / "files").iterdir())) == 2  # the recorded file and the dead upload
    # What a crash between the rename and the record would leave, and a store no job names.
    (home / "files" / "file-0123456789abcdef01234567.csv").write_text("text,label\n")
    (home / "stores" / "0123456789abcdef0123").mkdir(parents=True)
    server = Server(home, env_for(tiny_bert_dir))
    try:
        assert [p.name for p in (home / "files").iterdir()] == [f"{kept.json()['id']}.csv"]
        assert [f["id"] for f in server.get("/v1/files").json()["data"]] == [kept.json()["id"]]
        assert list((home / "stores").iterdir()) == []
    finally:
        server.stop()


def _quietly(call, *args):
    try:
        call(*args)
    except httpx.HTTPError:
        pass


def test_a_file_in_use_cannot_be_deleted_and_its_store_goes_with_it(server, tmp_path):
    """DELETE /v1/files/{id}: 409 while a running job uses the file; once it has finished,
    the file, its record and the store only its jobs needed are removed, and the model stays."""
    data = Path(write_csv(tmp_path / "d.csv", n=400))
    file_id = upload(server, data).json()["id"]
    stores = server.home / "stores"
    before = {p.name for p in stores.iterdir()} if stores.is_dir() else set()
    job_id = create_job(server, file_id, n_epochs=8)
    wait_job(server, job_id, statuses=("training", "succeeded"))
    busy = httpx.delete(f"{server.base}/v1/files/{file_id}", headers=AUTH, timeout=60)
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["code"] == "file_in_use" and job_id in busy.text
    job = wait_job(server, job_id)
    assert job["status"] == "succeeded", job
    made = {p.name for p in stores.iterdir() if p.is_dir()} - before
    assert len(made) == 1
    gone = httpx.delete(f"{server.base}/v1/files/{file_id}", headers=AUTH, timeout=60)
    assert gone.status_code == 200, gone.text
    assert gone.json() == {"id": file_id, "object": "file", "deleted": True}
    assert server.get(f"/v1/files/{file_id}").status_code == 404
    assert not any(p.name.startswith(file_id) for p in (server.home / "files").iterdir())
    assert not (stores / made.pop()).exists()
    predicted = server.post(
        "/v1/predict", json={"model": job["fine_tuned_model"], "inputs": ["a fine ride"]}
    )
    assert predicted.status_code == 200, predicted.text
    again = httpx.delete(f"{server.base}/v1/files/{file_id}", headers=AUTH, timeout=60)
    assert again.status_code == 404


def test_a_cancelled_job_leaves_no_checkpoint(server, tmp_path):
    data = Path(write_csv(tmp_path / "d.csv", n=400))
    file_id = upload(server, data).json()["id"]
    job_id = create_job(server, file_id, n_epochs=50)
    deadline = time.time() + 120
    while not list((server.home / "models" / job_id).glob("*")):  # a checkpoint exists
        assert time.time() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    assert server.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    deadline = time.time() + 60
    while not any(
        e.get("data", {}).get("status") == "cancelled" for e in all_events(server, job_id)
    ):
        assert time.time() < deadline, "the job never stopped"
        time.sleep(0.2)
    assert not (server.home / "models" / job_id).exists()


def test_a_job_whose_store_cannot_fit_on_the_disk_gets_507_with_the_estimate(
    small_disk, tmp_path, tiny_bert_dir
):
    server = Server(small_disk, env_for(tiny_bert_dir, LADDER_MIN_FREE_MB="16"))
    try:
        data = tmp_path / "long-texts.csv"
        data.write_text(
            "text,label\n" + "".join(f"{'a fine ride ' * 25} {k},{k % 2}\n" for k in range(6000))
        )
        file_id = upload(server, data).json()["id"]
        response = server.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": "tiny",
                "training_file": file_id,
                "hyperparameters": {
                    "kept_layers": "all",
                    "cache_width": "full",
                    "cache_dtype": "fp16",
                },
            },
        )
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "insufficient_storage"
        assert re.search(
            r"needs about [\d,]+ MB of disk and the server has [\d,]+ MB", error["message"]
        )
        assert server.get("/v1/fine_tuning/jobs").json()["data"] == []
    finally:
        server.stop()
