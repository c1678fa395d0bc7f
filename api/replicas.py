"""`ladder serve --replicas N`: the same FastAPI app, N copies behind Ray Serve's HTTP proxy.

Each replica is a Ray actor that builds the app itself (`create_app`, lifespan included), so
every replica loads its backbones, holds its own side-model cache and micro-batcher, and reads
the one LADDER_HOME: models any job registers are served by all of them. Jobs run once: every
replica has a job runner, and only the holder of the home's job lease runs jobs (api/jobs.py),
so N replicas still make one runner. Ray Serve restarts a replica that dies; the proxy sends new
requests to the live ones, and a client that retries (LadderClient does) loses nothing.

Ray joins the cluster at RAY_ADDRESS or starts a local one, as the job runner does. The
replicas get the service's settings (LADDER_*, HF_*, ...) through their Ray runtime environment,
LADDER_API_KEY included: on a shared cluster, whoever can read Ray's state can read those. Each
replica keeps its own counters, so /metrics answers for the replica that serves the scrape.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("ladder.replicas")

# The service's settings every replica needs, whatever its node's own environment.
_PASSED = ("LADDER_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")


def replica_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(_PASSED)}


def build_app():
    """Runs on each replica: the app as `ladder serve` builds it."""
    from api.app import create_app

    return create_app()


def serve_replicas(replicas: int, host: str, port: int, blocking: bool = True) -> None:
    try:
        from ray import serve
    except ImportError as exc:  # ray installed without its serve extra
        raise RuntimeError(
            f"--replicas needs Ray Serve ({exc}); install it with pip install 'ray[serve]'"
        ) from None
    from backbone_worker.pool import init_ray

    init_ray()
    serve.start(http_options={"host": host, "port": port})
    ingress = serve.ingress(build_app)
    deployment = serve.deployment(
        ingress(type("LadderReplica", (), {})),
        name="ladder",
        num_replicas=replicas,
        # A replica is an HTTP front end: its torch work is light next to a job's, and a CPU
        # reservation per replica would leave none for the jobs on a small machine.
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": replica_env()}},
        # Enough for the micro-batcher to group requests; the rest wait in the proxy.
        max_ongoing_requests=256,
        health_check_period_s=5,
    )
    log.info("serving %d replicas on http://%s:%d", replicas, host, port)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.run(deployment.bind(), name="ladder", route_prefix="/", blocking=blocking)
    except KeyboardInterrupt:
        pass
    finally:
        if blocking:
            # On a shared cluster the app would outlive this command: take it down with it.
            log.info("stopping the replicas")
            serve.delete("ladder")
