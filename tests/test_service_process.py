"""The service as a real process under uvicorn: SIGKILL mid-job and a restart lose nothing, and
the docker-compose topology (Ray head + API joining it through RAY_ADDRESS) runs a job end to end
as local processes."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from test_cli import write_csv

ROOT = Path(__file__).parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path, port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        env={**os.environ, "PYTHONPATH": str(ROOT), "LADDER_HOME": str(home), **env},
        stdout=subprocess.DEVNULL,
        stderr=open(home / f"server-{port}.log", "ab"),
    )
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, (home / f"server-{port}.log").read_text()[-2000:]
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not become ready")


def wait_status(
    base: str, job_id: str, statuses: tuple, timeout: float, headers: dict | None = None
) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job never reached {statuses}: {job}")


def create_job(base: str, csv_path: Path, **hp) -> tuple[str, str]:
    with open(csv_path, "rb") as handle:
        file_id = httpx.post(
            f"{base}/v1/files",
            data={"purpose": "fine-tune"},
            files={"file": (csv_path.name, handle)},
        ).json()["id"]
    job = httpx.post(
        f"{base}/v1/fine_tuning/jobs",
        json={
            "model": "tiny",
            "training_file": file_id,
            "hyperparameters": {"reduction_factor": 4, "kept_layers": [0, 2], **hp},
        },
    ).json()
    return file_id, job["id"]


def test_sigkill_mid_job_then_restart_resumes_the_job(tmp_path, tiny_bert_dir):
    env = {
        "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
        "LADDER_PRELOAD": "tiny",
        "LADDER_EXECUTOR": "thread",
    }
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, env)
    try:
        file_id, job_id = create_job(base, Path(write_csv(tmp_path / "d.csv", n=4000)), n_epochs=6)
        wait_status(base, job_id, ("caching", "training"), 60)
        time.sleep(1.0)
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port, env)
    try:
        job = wait_status(base, job_id, ("succeeded", "failed", "cancelled"), 240)
        assert job["status"] == "succeeded", job
        events = httpx.get(
            f"{base}/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 1000}
        ).json()["data"]
        assert any("resuming after a service restart" in e["message"] for e in events)
        assert httpx.get(f"{base}/v1/files/{file_id}").status_code == 200
        prediction = httpx.post(
            f"{base}/v1/predict", json={"model": job["fine_tuned_model"], "inputs": ["good ride"]}
        )
        assert prediction.status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_compose_topology_as_local_processes(tmp_path, tiny_bert_dir):
    """docker-compose's shape without Docker: a Ray head, the API joining it via RAY_ADDRESS."""
    ray_bin = Path(sys.executable).parent / "ray"
    if not ray_bin.exists():
        pytest.skip("the ray CLI is not installed in this environment")
    ray_port = free_port()
    # Ray's socket paths must stay short (AF_UNIX limit), so not under pytest's tmp_path.
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    # Ray clusters require a token; head and API share it, as docker-compose's services do.
    token = secrets.token_hex(32)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    ray_env = {**os.environ, "PYTHONPATH": str(ROOT), **auth}
    subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={ray_port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={ray_tmp}",
        ],
        env=ray_env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    server = None
    try:
        env = {
            "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
            "LADDER_PRELOAD": "tiny",
            "LADDER_EXECUTOR": "ray",
            "RAY_ADDRESS": f"127.0.0.1:{ray_port}",
            **auth,
        }
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(tmp_path, port, env)
        assert httpx.get(f"{base}/info").json()["ray_address"] == env["RAY_ADDRESS"]
        _, job_id = create_job(base, Path(write_csv(tmp_path / "d.csv", n=200)), n_epochs=2)
        job = wait_status(base, job_id, ("succeeded", "failed", "cancelled"), 240)
        assert job["status"] == "succeeded", job["error"]
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        subprocess.run(
            [str(ray_bin), "stop", "--force"], env=ray_env, capture_output=True, timeout=120
        )
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
def test_replicas_on_ray_serve_share_models_and_a_killed_one_loses_no_request(
    tmp_path, tiny_bert_dir, tiny_llama_dir
):
    """`ladder serve --replicas 2` on a local Ray: both replicas answer for a model registered
    in the shared home, a chat completion streams through Ray Serve's proxy, and with one
    replica SIGKILLed mid-traffic every request a retrying client sends still succeeds."""
    import threading

    import torch

    from api.client import LadderClient
    from api.db import Database
    from backbone_worker.backbone import load_backbone, portable_config
    from side_trainer.artifacts import save_side_model
    from side_trainer.model import SideConfig, SideNetwork

    ray_bin = Path(sys.executable).parent / "ray"
    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    backbone = load_backbone(tiny_bert_dir)
    torch.manual_seed(0)
    side = SideNetwork(
        SideConfig(
            family=backbone.family.name,
            backbone="tiny",
            backbone_fingerprint=backbone.fingerprint,
            backbone_config=portable_config(backbone.config),
            layers=[0, 2],
            labels=["neg", "pos"],
            reduction=4,
        )
    )
    save_side_model(side, tmp_path / "models" / "shared")
    Database(tmp_path / "ladder.db").add_model(
        "ft:shared", "tiny", str(tmp_path / "models" / "shared"), "test"
    )
    ray_port, port = free_port(), free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray_env = {**os.environ, "PYTHONPATH": str(ROOT), **auth}
    subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={ray_port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={ray_tmp}"],
        env=ray_env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    env = {
        **ray_env,
        "LADDER_HOME": str(tmp_path),
        "LADDER_BACKBONES": f"tiny={tiny_bert_dir},tinyllama={tiny_llama_dir}",
        "LADDER_PRELOAD": "tiny",
        "LADDER_EXECUTOR": "thread",
        "RAY_ADDRESS": f"127.0.0.1:{ray_port}",
    }
    log = open(tmp_path / "serve.log", "ab")
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port), "--replicas", "2"],
        env=env,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    body = {"model": "ft:shared", "inputs": ["a lovely ride"]}
    try:
        deadline = time.time() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "the replicas never became ready"
            try:
                if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        answered_by = set()
        for _ in range(40):
            r = httpx.post(f"{base}/v1/predict", json=body, timeout=60)
            assert r.status_code == 200, r.text
            answered_by.add(r.headers["x-ladder-server"])
            if len(answered_by) == 2:
                break
        assert len(answered_by) == 2, answered_by
        chat = {"model": "tinyllama", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4, "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=chat, timeout=120) as r:
            assert r.status_code == 200, r.read()
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) >= 3, lines

        results, errors = [], []

        def traffic() -> None:
            with LadderClient(base, timeout=60) as client:  # the default retries
                for _ in range(30):
                    try:
                        results.append(client.predict("ft:shared", ["a lovely ride"]))
                    except Exception as exc:  # noqa: BLE001 - counted, then asserted on
                        errors.append(exc)

        clients = [threading.Thread(target=traffic) for _ in range(3)]
        for c in clients:
            c.start()
        time.sleep(0.5)
        os.kill(int(sorted(answered_by)[0].rsplit(":", 1)[1]), signal.SIGKILL)
        for c in clients:
            c.join(timeout=300)
        assert not errors, errors[:3]
        assert len(results) == 90
        assert all(r["predictions"][0]["label"] in ("neg", "pos") for r in results)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        subprocess.run(
            [str(ray_bin), "stop", "--force"], env=ray_env, capture_output=True, timeout=120
        )
        shutil.rmtree(ray_tmp, ignore_errors=True)
