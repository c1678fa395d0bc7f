"""Filling a store under failure: killed runs resume, killed Ray workers are replaced, corrupt
chunks are caught, concurrent runs are refused, and a remote (S3-compatible) store round-trips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cache_argv
from test_cli import last_json, one_line_error, run, write_csv

from backbone_worker.cache import IMPORTANCE_FILE, CacheOptions, build_cache
from cache_store import ActivationStore, StoreError, StoreLock


def assert_exactly_once(store_url: str, n: int) -> None:
    info = ActivationStore.open(store_url).info()
    assert info["n_examples"] == info["unique_example_ids"] == n
    assert info["committed_parts"] == info["total_parts"]


def test_run_killed_with_sigkill_resumes_and_writes_each_example_once(tmp_path, tiny_bert_dir):
    data = write_csv(tmp_path / "d.csv", n=3000)
    store = str(tmp_path / "store")
    cmd = [
        sys.executable,
        "-m",
        "api.cli",
        *cache_argv(tiny_bert_dir, data),
        "--store",
        store,
        "--layers",
        "0",
        "--part-size",
        "8",
        "--fisher-examples",
        "8",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if len(ActivationStore.open(store).committed_parts()) >= 5:
                break
        except StoreError:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(ActivationStore.open(store).committed_parts())
    total = len(ActivationStore.open(store).plan)
    assert 5 <= committed < total, "the run must be killed midway"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    assert_exactly_once(store, 3000)


def test_killed_ray_worker_is_replaced_and_its_part_redone(
    tmp_path, tiny_bert_dir, monkeypatch, caplog
):
    from backbone_worker import pool

    ray = pytest.importorskip("ray")
    killed = []
    submit = pool.RayPool.submit

    def submit_then_kill(self, k, part):
        ref = submit(self, k, part)
        if not killed and k == 0:
            # The actor dies with this part in flight (mid-part, or before it started).
            killed.append(part["index"])
            ray.kill(self.actors[0])
        return ref

    monkeypatch.setattr(pool.RayPool, "submit", submit_then_kill)
    data = write_csv(tmp_path / "d.csv", n=300)
    store = str(tmp_path / "store")
    with caplog.at_level("WARNING"):
        build_cache(
            tiny_bert_dir, data, store, CacheOptions(workers=2, part_size=16, layers=[0, 2])
        )
    assert killed and any("died" in r.message for r in caplog.records)
    assert_exactly_once(store, 300)


@pytest.fixture()
def one_cpu_ray(monkeypatch):
    """This process's own Ray, told it has one CPU and no GPU, shut down after the test."""
    ray = pytest.importorskip("ray")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_more_workers_than_cpus_share_them_instead_of_waiting(
    tmp_path, tiny_bert_dir, one_cpu_ray, monkeypatch, caplog
):
    """Two workers on a one-CPU local Ray: each asks for half a CPU. With a whole CPU each the
    second actor was never placed and the run waited for its parts for ever. A wait with no part
    finished says what the workers ask for and what the cluster has (here at once)."""
    from backbone_worker import pool

    monkeypatch.setattr(pool, "WAIT_SLICE_S", 0.05)
    monkeypatch.setattr(pool, "STALL_WARNING_S", 0.0)
    data = write_csv(tmp_path / "d.csv", n=120)
    store = str(tmp_path / "store")
    with caplog.at_level("WARNING"):
        build_cache(tiny_bert_dir, data, store, CacheOptions(workers=2, part_size=16, layers=[0]))
    assert_exactly_once(store, 120)
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 backbone workers share this machine's 1 CPUs (0.5 each)" in m for m in messages)
    assert any(
        "no part finished" in m and "each asking for 0.5 CPU; the cluster has 1 CPU" in m
        for m in messages
    ), messages


def test_more_gpus_per_worker_than_the_machine_has_is_refused(tmp_path, tiny_bert_dir, one_cpu_ray):
    """Refused before the long work (the Fisher pass writes the importance file first)."""
    data = write_csv(tmp_path / "d.csv", n=40)
    store = tmp_path / "store"
    with pytest.raises(ValueError, match=r"--gpus-per-worker 1 .* has \(0\); leave it unset"):
        build_cache(
            tiny_bert_dir,
            data,
            str(store),
            CacheOptions(workers=2, gpus_per_worker=1.0, part_size=16, layers=[0]),
        )
    assert not (store / IMPORTANCE_FILE).exists()


@pytest.fixture()
def small_store(tmp_path, tiny_bert_dir):
    data = write_csv(tmp_path / "d.csv", n=100)
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, data, store, CacheOptions(part_size=32, layers=[0]))
    # The same store from the CLI: what a user runs to resume or repair it.
    argv = cache_argv(tiny_bert_dir, data, "--store", store, "--layers", "0", "--part-size", "32")
    return {"store": store, "data": data, "backbone": tiny_bert_dir, "argv": argv}


def _chunk_files(store: str, part: int) -> list[Path]:
    root = Path(store) / "parts" / f"part-{part:05d}" / "enc" / "states" / "layer_0"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")


def test_corrupt_chunk_is_detected_reported_and_repaired(small_store, capsys):
    store = small_store["store"]
    chunk = _chunk_files(store, 1)[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="part 1 .* corrupt"):
        list(ActivationStore.open(store).iter_batches("train", 8, shuffle=False))
    code, out, _ = run(capsys, "cache-info", "--store", store, "--verify", "--json")
    assert code == 0 and last_json(out)["corrupt_parts"] == [1]
    total = last_json(out)["total_parts"]
    code, out, _ = run(capsys, "cache-info", "--store", store, "--verify", "--repair", "--json")
    assert last_json(out)["repaired"] and last_json(out)["committed_parts"] == total - 1
    code, _, _ = run(capsys, *small_store["argv"])
    code, out, _ = run(capsys, "cache-info", "--store", store, "--verify", "--json")
    assert code == 0 and last_json(out)["corrupt_parts"] == []
    assert_exactly_once(store, 100)


def test_missing_chunk_file_is_detected(small_store):
    for chunk in _chunk_files(small_store["store"], 0):
        chunk.unlink()  # zarr would read the hole back as zeros
    problems = ActivationStore.open(small_store["store"]).verify()
    assert [p["part"] for p in problems] == [0]


def test_second_run_on_a_store_being_written_is_refused(small_store, capsys):
    store = small_store["store"]
    with StoreLock(store).acquire():
        code, _, err = run(capsys, *small_store["argv"])
        one_line_error(code, err, "being written by another run", "--wait")
    assert_exactly_once(store, 100)


def test_lease_of_a_dead_process_is_taken_over_at_once(small_store):
    store = small_store["store"]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = StoreLock(store)
    lock.fs.pipe_file(
        lock.path,
        json.dumps(
            {
                "owner": "x",
                "host": lock.me["host"],
                "pid": int(dead.stdout),
                "expires": time.time() + 600,
            }
        ).encode(),
    )
    started = time.time()
    with StoreLock(store).acquire():
        pass
    assert time.time() - started < 5


def test_s3_compatible_store_round_trip(tmp_path, tiny_bert_dir, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        import fsspec.config

        fsspec.config.set_conf_env(fsspec.config.conf)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="ladder")
        data = write_csv(tmp_path / "d.csv", n=80)
        url = "s3://ladder/stores/tiny"
        build_cache(tiny_bert_dir, data, url, CacheOptions(part_size=32, layers=[0]))
        assert_exactly_once(url, 80)
        store = ActivationStore.open(url)
        assert store.verify() == []
        seen = [
            int(i) for b in store.iter_batches("train", 16, shuffle=False) for i in b["example_ids"]
        ]
        assert len(seen) == len(set(seen)) == store.n_examples("train")
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()
