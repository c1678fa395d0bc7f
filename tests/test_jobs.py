"""Fine-tuning jobs run directly (api.jobs.run_job and JobRunner) on a tiny backbone: what an
unlucky moment does to a job - a cancel during the last steps, a kill after training, damaged
cached states, another job holding the store, a second runner on the same home."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_api import assert_service_words
from test_cli import write_csv

import api.inference
from api.db import Database, new_id
from api.jobs import JobRunner, resolved_hyperparameters, run_job, store_key

# No collapse retries (a tiny network on 120 rows often predicts one class): these tests count
# a job's epochs and events; retries have tests of their own (test_train.py).
HP = {"n_epochs": 2, "reduction_factor": 4, "kept_layers": [0, 2], "collapse_retries": 0}


@pytest.fixture
def home(tmp_path, tiny_bert_dir, monkeypatch):
    monkeypatch.setenv("LADDER_BACKBONES", f"tiny={tiny_bert_dir}")
    (tmp_path / "files").mkdir()
    path = write_csv(tmp_path / "files" / "file-1.csv", n=120)
    db = Database(tmp_path / "ladder.db")
    db.add_file(
        {
            "id": "file-1",
            "filename": "train.csv",
            "bytes": Path(path).stat().st_size,
            "created_at": 0,
            "purpose": "fine-tune",
            "rows": 120,
            "labels": ["neg", "pos"],
            "has_pair": False,
            "path": path,
        }
    )
    return tmp_path


def new_job(home: Path, **hp) -> str:
    db = Database(home / "ladder.db")
    job = db.add_job(
        {
            "id": new_id("ftjob"),
            "created_at": int(time.time()),
            "model": "tiny",
            "training_file": "file-1",
            "validation_file": None,
            "seed": 0,
            "suffix": None,
            "status": "queued",
            "hyperparameters": {**HP, **hp},
        }
    )
    return job["id"]


def events(home: Path, job_id: str) -> list[dict]:
    return Database(home / "ladder.db").list_events(job_id, None, 1000)[0]


def terminal_events(home: Path, job_id: str) -> list[dict]:
    return [
        e
        for e in events(home, job_id)
        if e["data"].get("status") in ("succeeded", "failed", "cancelled")
    ]


def cancel(home: Path, job_id: str) -> None:
    Database(home / "ladder.db").update_job(job_id, only_if_active=True, status="cancelled")


def test_a_cancel_during_the_final_evaluation_registers_no_model(home, monkeypatch):
    job_id = new_job(home)
    real = api.inference.evaluate

    def evaluate_then_cancel(*args, **kwargs):
        out = real(*args, **kwargs)
        cancel(home, job_id)  # the cancel lands while the job evaluates
        return out

    monkeypatch.setattr(api.inference, "evaluate", evaluate_then_cancel)
    run_job(str(home), job_id)
    db = Database(home / "ladder.db")
    assert db.get_job(job_id)["status"] == "cancelled"
    assert db.list_models() == [] and not (home / "models" / job_id).exists()
    assert [e["message"] for e in terminal_events(home, job_id)] == ["cancelled"]


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the job catches it."""


def test_a_kill_after_training_keeps_the_training(home, monkeypatch):
    """Killed after the model is saved but before the job commits it, the rerun goes straight
    to evaluation: no epoch is trained again."""
    job_id = new_job(home)
    with monkeypatch.context() as m:
        m.setattr(api.inference, "JointModel", lambda *a, **k: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            run_job(str(home), job_id)
    assert Database(home / "ladder.db").get_job(job_id)["status"] == "training"
    epochs_before = [e for e in events(home, job_id) if "epoch" in e["data"]]
    run_job(str(home), job_id)
    job = Database(home / "ladder.db").get_job(job_id)
    assert job["status"] == "succeeded", job
    epochs_after = [e for e in events(home, job_id) if "epoch" in e["data"]]
    assert len(epochs_before) == len(epochs_after) == HP["n_epochs"]


def test_a_cancel_during_the_importance_pass_stops_it(home, monkeypatch):
    """The cancel is seen at the next Fisher batch, before any part is cached, and the job's
    last event says so exactly once."""
    import backbone_worker.cache

    job_id = new_job(home)
    real = backbone_worker.cache.fit_probe

    def probe_then_cancel(*args, **kwargs):
        out = real(*args, **kwargs)
        cancel(home, job_id)
        return out

    monkeypatch.setattr(backbone_worker.cache, "fit_probe", probe_then_cancel)
    run_job(str(home), job_id)
    assert not [e for e in events(home, job_id) if e["message"].startswith("cached")]
    assert [e["message"] for e in terminal_events(home, job_id)] == ["cancelled"]


def _store_of(home: Path, job_id: str) -> str:
    from backbone_worker.backbone import fingerprint_dir, resolve
    from backbone_worker.data import load_dataset

    db = Database(home / "ladder.db")
    dataset = load_dataset(db.get_file("file-1")["path"])
    from api import hyperparameters

    hp = resolved_hyperparameters("tiny", db.get_job(job_id)["hyperparameters"], 120)
    cache, _ = hyperparameters.options(hp)  # as the job resolves them
    key = store_key("tiny", fingerprint_dir(resolve("tiny")), dataset.fingerprint, cache)
    return str(home / "stores" / key)


def test_damaged_cached_states_are_recomputed_by_the_job(home):
    """A chunk of the shared store is damaged after a first job used it: the next job on the
    same data recomputes the damaged part itself and succeeds (it used to fail, blaming the
    user's data)."""
    first = new_job(home)
    run_job(str(home), first)
    store = _store_of(home, first)
    chunk = sorted(p for p in (Path(store) / "parts" / "part-00000").rglob("c/*") if p.is_file())[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    second = new_job(home)
    run_job(str(home), second)
    job = Database(home / "ladder.db").get_job(second)
    assert job["status"] == "succeeded", job
    assert any("damaged; recomputing" in e["message"] for e in events(home, second))


def test_a_job_waits_for_a_store_another_job_writes_and_stays_cancellable(home):
    from cache_store import StoreLock

    job_id = new_job(home)
    store = _store_of(home, job_id)
    Path(store).parent.mkdir(parents=True, exist_ok=True)
    lock = StoreLock(store).acquire()  # another job is caching the same data
    try:
        runner = threading.Thread(target=run_job, args=(str(home), job_id))
        runner.start()
        deadline = time.time() + 60
        while not any("waiting for another job" in e["message"] for e in events(home, job_id)):
            assert time.time() < deadline
            time.sleep(0.2)
        cancel(home, job_id)
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        lock.release()
    assert [e["message"] for e in terminal_events(home, job_id)] == ["cancelled"]


def test_a_planted_checkpoint_pickle_is_not_executed(home, tmp_path):
    """Training resumes from checkpoint.pt in a directory Ray workers share; loading it runs no
    pickled code."""
    from side_trainer.train import CHECKPOINT, TrainOptions, train

    job_id = new_job(home)
    run_job(str(home), job_id)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    out = tmp_path / "model"
    out.mkdir()
    torch.save({"identity": Payload()}, out / CHECKPOINT)
    with pytest.raises(Exception, match="(?i)weights.only|unpickl"):
        train(_store_of(home, job_id), out, TrainOptions(epochs=1, reduction=4))
    assert not marker.exists()


def test_one_runner_per_home_runs_the_jobs(home):
    """Two servers on one home: the first runner takes the home's lease and runs every job,
    also one the second server created; the second runs none, and takes over when the first
    stops."""
    db = Database(home / "ladder.db")
    first = JobRunner(db, home, "thread", lease_ttl_s=1.5)
    deadline = time.time() + 10
    while not first.leader:
        assert time.time() < deadline
        time.sleep(0.05)
    second = JobRunner(db, home, "thread", lease_ttl_s=1.5)
    job_id = new_job(home, n_epochs=1)
    second.submit(job_id)  # created through the second server
    deadline = time.time() + 120
    while db.get_job(job_id)["status"] != "succeeded":
        assert time.time() < deadline, db.get_job(job_id)
        time.sleep(0.2)
    assert not second.leader and job_id not in second._submitted
    messages = [e["message"] for e in events(home, job_id)]
    assert len(messages) == len(set(messages)), messages  # nothing ran twice
    first.stop()
    deadline = time.time() + 10
    while not second.leader:
        assert time.time() < deadline
        time.sleep(0.05)
    later = new_job(home, n_epochs=1)
    deadline = time.time() + 120
    while db.get_job(later)["status"] != "succeeded":
        assert time.time() < deadline, db.get_job(later)
        time.sleep(0.2)
    second.stop()


@pytest.mark.timeout(300)
def test_a_job_whose_ray_worker_dies_runs_again_and_fails_with_the_reason_when_it_keeps_dying(
    home, monkeypatch
):
    """The Ray executor: a job whose worker process dies (as when a worker container stops) is
    run again by Ray and resumes; one whose worker dies on every attempt ends failed with the
    reason, not running forever."""
    import os

    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    starts = home / "starts"
    starts.mkdir()

    db = Database(home / "ladder.db")
    always, once = new_job(home, n_epochs=1), new_job(home, n_epochs=1)

    def dies(home_dir, job_id, real=run_job, starts=str(starts), always=always):
        # Nested, so Ray ships it by value; the real run_job goes by reference.
        mark = Path(starts) / job_id
        runs = mark.read_text() if mark.exists() else ""
        mark.write_text(runs + "x")
        if job_id == always or not runs:
            os._exit(1)
        real(home_dir, job_id)

    monkeypatch.setattr(api.jobs, "run_job", dies)
    runner = JobRunner(db, home, "ray", lease_ttl_s=1.5)
    try:
        deadline = time.time() + 240
        while {db.get_job(j)["status"] for j in (always, once)} - {"failed", "succeeded"}:
            assert time.time() < deadline, [db.get_job(j) for j in (always, once)]
            time.sleep(0.2)
    finally:
        runner.stop()
        ray.shutdown()
    assert db.get_job(once)["status"] == "succeeded"
    assert (starts / once).read_text() == "xx"
    job = db.get_job(always)
    assert job["status"] == "failed" and job["error"]["code"] == "worker_lost", job
    assert (starts / always).read_text() == "x" * api.jobs.MAX_ATTEMPTS
    assert "ray status" in job["error"]["message"]
    assert_service_words(job["error"]["message"])


def test_two_uploads_of_one_file_give_two_succeeding_jobs_on_one_store(home):
    db = Database(home / "ladder.db")
    first = db.get_file("file-1")
    copy = home / "files" / "file-2.csv"
    copy.write_bytes(Path(first["path"]).read_bytes())
    db.add_file({**first, "id": "file-2", "filename": "again.csv", "path": str(copy)})
    jobs = [new_job(home), new_job(home)]
    db.update_job(jobs[1], training_file="file-2")
    for job_id in jobs:
        run_job(str(home), job_id)
    assert [db.get_job(j)["status"] for j in jobs] == ["succeeded", "succeeded"], [
        db.get_job(j)["error"] for j in jobs
    ]
    assert len(list((home / "stores").iterdir())) == 1


def failure(home: Path, job_id: str) -> dict:
    """A failed job's error, after checking that it and every event speak the service's words."""
    job = Database(home / "ladder.db").get_job(job_id)
    assert job["status"] == "failed", job
    for message in [job["error"]["message"], *(e["message"] for e in events(home, job_id))]:
        assert_service_words(message)
    return job["error"]


def test_a_job_on_a_file_without_a_text_column_says_which_column_to_rename(home):
    """Uploads are checked when they arrive; a file that reaches a job unchecked (uploaded
    before a server upgrade) is worded as an upload's error: rename a column, no flag."""
    db = Database(home / "ladder.db")
    path = home / "files" / "file-3.csv"
    path.write_text("sentence,label\n" + "".join(f"t{k},{k % 2}\n" for k in range(20)))
    db.add_file(
        {**db.get_file("file-1"), "id": "file-3", "filename": "sentences.csv", "path": str(path)}
    )
    job_id = new_job(home)
    db.update_job(job_id, training_file="file-3")
    run_job(str(home), job_id)
    error = failure(home, job_id)
    assert error["code"] == "invalid_training_data", error
    assert "sentences.csv has no column 'text'" in error["message"]
    assert "rename it to 'text'" in error["message"]


def test_states_the_cache_dtype_cannot_hold_name_the_hyperparameter(home, monkeypatch):
    """fp16 cannot hold a state of 1e6: the client is told which hyperparameter to change
    (the tiny backbone's states are small, so caching raises what the store raises)."""
    import backbone_worker.cache
    from cache_store import codecs

    def overflowing(*args, **kwargs):
        codecs.encode(np.full((2, 4), 1e6, dtype=np.float32), "fp16")

    monkeypatch.setattr(backbone_worker.cache, "build_cache", overflowing)
    job_id = new_job(home, cache_dtype="fp16")
    run_job(str(home), job_id)
    error = failure(home, job_id)
    assert (error["code"], error["param"]) == (
        "invalid_hyperparameters",
        "hyperparameters.cache_dtype",
    )
    assert "hyperparameters.cache_dtype bf16" in error["message"]


def test_a_store_that_does_not_match_is_not_the_clients_to_fix(home):
    """The service's own store recorded other settings than a job asks of it: the client is
    neither blamed nor told to pass a flag or delete a server path; the server resolves it or
    owns the failure."""
    first = new_job(home, n_epochs=1)
    run_job(str(home), first)
    meta = Path(_store_of(home, first)) / "zarr.json"
    root = json.loads(meta.read_text())
    root["attributes"]["settings"]["max_length"] = 64
    meta.write_text(json.dumps(root))
    second = new_job(home, n_epochs=1)
    run_job(str(home), second)
    job = Database(home / "ladder.db").get_job(second)
    if job["status"] != "succeeded":
        assert failure(home, second)["code"] not in (
            "invalid_training_data",
            "invalid_hyperparameters",
        )


def test_a_job_reports_progress_in_every_phase_and_the_whole_account_of_its_model(home):
    job_id = new_job(home, cache_width="d/2")  # a width map to fit: a phase of its own
    run_job(str(home), job_id)
    job = Database(home / "ladder.db").get_job(job_id)
    assert job["status"] == "succeeded", job["error"]
    counted = [e["data"] for e in events(home, job_id) if "done" in e["data"]]
    phases = {d["step"] for d in counted}
    assert {"importance", "width map", "caching", "training", "evaluating"} <= phases
    for phase in phases:  # each phase's last count is its whole
        last = [d for d in counted if d["step"] == phase][-1]
        assert last["done"] == last["total"] > 0, last
        assert all(d["eta_s"] is None or d["eta_s"] >= 0 for d in counted)
    result = job["result"]
    test = result["test"]
    assert result["test_accuracy"] == test["accuracy"]
    assert test["n"] == sum(test["per_class"][y]["support"] for y in ("neg", "pos")) > 0
    assert sum(map(sum, test["confusion_matrix"])) == test["n"]
    assert test["majority_rate"] >= 0.5 and 0 <= result["test_macro_f1"] <= 1
    assert result["validation"]["n"] > 0 and "warning" in result


def test_a_file_without_test_rows_has_no_test_figures_rather_than_zero(home):
    db = Database(home / "ladder.db")
    small = write_csv(home / "files" / "file-3.csv", n=11)
    db.add_file({**db.get_file("file-1"), "id": "file-3", "path": small, "rows": 11})
    from backbone_worker.data import load_dataset

    assert not load_dataset(small).split("test")  # 11 rows: none falls in the test split
    job_id = new_job(home)
    db.update_job(job_id, training_file="file-3")
    run_job(str(home), job_id)
    job = db.get_job(job_id)
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["test_accuracy"] is None and job["result"]["test"] is None
    assert any("test split empty" in e["message"] for e in events(home, job_id))


def test_one_backbone_named_by_an_alias_and_by_its_directory_trains_under_both(home, tiny_bert_dir):
    db = Database(home / "ladder.db")
    jobs = [new_job(home), new_job(home)]
    db.update_job(jobs[1], model=str(tiny_bert_dir))  # the alias's own directory
    for job_id in jobs:
        run_job(str(home), job_id)
    assert [db.get_job(j)["status"] for j in jobs] == ["succeeded", "succeeded"], [
        db.get_job(j)["error"] for j in jobs
    ]
