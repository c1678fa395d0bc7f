"""Backbone workers: encode store parts and write them, in this process or as a Ray actor pool.

A `PartWorker` loads the backbone once and turns a part (a fixed example range) into ladder states
written whole and committed last. Encoding one part overlaps writing the previous one: in-process
through a writer thread, and in a Ray actor by running two part calls at once (max_concurrency=2)
with the forward pass serialised by a lock, so one call computes while the other compresses and
writes. Ray retries are at-least-once; `ActivationStore.write_part` makes a rewrite idempotent.

`RayPool` keeps two parts in flight per actor. When an actor dies (a lost node, an out-of-memory
kill, `ray.kill`), its parts are queued again and the actor is replaced, so the run still ends with
every example written exactly once.

Every actor must fit the cluster, or the parts queued on it wait until it does: on a local Ray
(started by this process) with fewer CPUs or GPUs than workers, each actor asks for an equal
share instead of a whole one (`actor_asks`). A joined cluster (`RAY_ADDRESS`) may still be
growing, so there actors ask for whole units, and a run that makes no progress for
`STALL_WARNING_S` says what it is waiting for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import replace

import torch

from backbone_worker.backbone import Backbone, load_backbone
from backbone_worker.data import Dataset
from backbone_worker.options import OptionError
from cache_store.progress import check as check_listener

log = logging.getLogger(__name__)

IN_FLIGHT_PER_WORKER = 2
MAX_TRIES_PER_PART = 3
# `ray.wait` blocks in native code, where Python's signal handlers (Ctrl-C, test timeouts) cannot
# run; waiting in slices of this many seconds lets them, and a listener's check (a cancelled job:
# cache_store.progress), which may stop the run (its caller's `shutdown` ends the parts in flight).
WAIT_SLICE_S = 1.0
STALL_WARNING_S = 120.0


class PartWorker:
    """Backbone + store writer for one process (an actor, or the caller's own process)."""

    def __init__(
        self,
        backbone: Backbone | str,
        dataset: Dataset,
        store_url: str,
        settings: dict,
        plan: list[dict],
        opts,
        threads: int | None = None,
        check=None,
    ):
        from cache_store import ActivationStore

        if threads:
            torch.set_num_threads(threads)
        self.opts = replace(opts, device=resolve_device(opts.device))
        self.backbone = (
            backbone
            if isinstance(backbone, Backbone)
            else load_backbone(backbone, self.opts.device)
        )
        self.dataset = dataset
        self.layers = settings["layers"]
        self.store = ActivationStore.create_or_open(store_url, settings, plan)
        self._forward = threading.Lock()
        self.check = check  # in-process only: run before every forward batch

    def _autocast(self):
        if self.opts.device.startswith("cuda") and self.opts.autocast:
            dtype = torch.bfloat16 if self.opts.autocast == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return nullcontext()

    def encode(self, part: dict) -> dict:
        from backbone_worker.cache import encode_examples, part_examples

        with self._forward, self._autocast():
            return encode_examples(
                self.backbone,
                self.dataset,
                part_examples(self.dataset, part),
                self.layers,
                self.opts,
                self.check,
            )

    def write(self, part: dict, arrays: dict) -> dict:
        self.store.write_part(
            part["index"], arrays["example_ids"], arrays["labels"], arrays["streams"]
        )
        tokens = sum(len(ids) for ids in arrays["streams"]["enc"]["input_ids"])
        return {"index": part["index"], "n": part["n"], "tokens": tokens}

    def process(self, part: dict) -> dict:
        """Encode and write one part (the unit of a Ray task)."""
        return self.write(part, self.encode(part))

    def ready(self) -> bool:
        return True

    def run_local(self, parts: list[dict], on_done) -> None:
        """All parts in this process: part k+1 is encoded while part k is written."""
        with ThreadPoolExecutor(1, thread_name_prefix="ladder-writer") as writer:
            pending: Future | None = None
            for part in parts:
                arrays = self.encode(part)
                if pending is not None:
                    on_done(pending.result())
                pending = writer.submit(self.write, part, arrays)
            if pending is not None:
                on_done(pending.result())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def init_ray() -> None:
    """Join the cluster at RAY_ADDRESS, or start a local Ray (no dashboard) for this process."""
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
        )
        log.info(
            "Ray %s: %s",
            "joined cluster" if address else "started locally",
            ray.cluster_resources(),
        )


def actor_share(workers: int, available: float) -> float:
    """What each of `workers` actors asks of a resource the cluster has `available` units of: one
    unit while there are enough, else an equal share (2 workers on 1 CPU ask for 0.5 each)."""
    if available <= 0:
        return 0.0
    return 1.0 if available >= workers else available / workers


def actor_asks(workers: int, gpus_per_worker: float | None) -> dict[str, float]:
    """The CPUs and GPUs each backbone worker asks of the cluster (joined or started here). On a
    local Ray, an equal share where it has fewer than workers, and an explicit GPU ask it cannot
    meet refused (OptionError); on a joined one, whole units. `gpus_per_worker` None: GPUs
    where the cluster has any. Decided before any long work, so a refusal costs nothing."""
    import ray

    init_ray()
    has = ray.cluster_resources()
    cpus, gpus = has.get("CPU", 0.0), has.get("GPU", 0.0)
    local = not os.environ.get("RAY_ADDRESS")  # this process's own Ray: nothing joins it later
    if gpus_per_worker is None and gpus < 1:
        gpus_per_worker = 0.0
    elif gpus_per_worker is None:  # a share of a local Ray's GPUs, a whole one of a cluster's
        gpus_per_worker = actor_share(workers, gpus) if local else 1.0
    elif local and gpus_per_worker > gpus:
        raise OptionError(
            f"--gpus-per-worker {gpus_per_worker:g} asks for more GPUs than this machine's Ray "
            f"has ({gpus:g}); leave it unset to use what there is"
        )
    num_cpus = actor_share(workers, cpus) if local else 1.0
    if num_cpus < 1.0:
        log.warning(
            "%d backbone workers share this machine's %g CPUs (%.2g each); fewer workers "
            "(--workers) would each run faster",
            workers,
            cpus,
            num_cpus,
        )
    return {"CPU": num_cpus, "GPU": gpus_per_worker}


class RayPool:
    """N `PartWorker` actors fed from a queue of parts; lost actors are replaced."""

    def __init__(
        self, workers: int, asks: dict[str, float], make_args: tuple, threads: int | None = None
    ):
        """`asks`: what each actor asks of the cluster (actor_asks)."""
        import ray

        init_ray()
        self.ray = ray
        self.make_args = make_args
        self.asks = asks
        self.actor_class = ray.remote(PartWorker).options(
            num_cpus=asks["CPU"],
            num_gpus=asks["GPU"],
            max_concurrency=IN_FLIGHT_PER_WORKER,
            max_restarts=0,
        )
        self.threads = threads
        self.actors = [self._new_actor() for _ in range(workers)]
        self.generation = [0] * workers

    def _new_actor(self):
        return self.actor_class.remote(*self.make_args, threads=self.threads)

    def submit(self, k: int, part: dict):
        return self.actors[k].process.remote(part)

    def run(self, parts: list[dict], on_done) -> None:
        ray = self.ray
        queue = deque(parts)
        tries = {p["index"]: 0 for p in parts}
        inflight: dict = {}  # ref -> (actor slot, its generation, part)

        def fill(k: int) -> None:
            while (
                queue
                and sum(1 for slot, _, _ in inflight.values() if slot == k) < IN_FLIGHT_PER_WORKER
            ):
                part = queue.popleft()
                tries[part["index"]] += 1
                inflight[self.submit(k, part)] = (k, self.generation[k], part)

        for k in range(len(self.actors)):
            fill(k)
        progress = time.monotonic()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=WAIT_SLICE_S)
            check_listener()
            if not ready:
                if time.monotonic() - progress >= STALL_WARNING_S:
                    self._warn_stalled(len(inflight), time.monotonic() - progress)
                    progress = time.monotonic()
                continue
            progress = time.monotonic()
            (ref,) = ready
            k, generation, part = inflight.pop(ref)
            try:
                on_done(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                if tries[part["index"]] >= MAX_TRIES_PER_PART:
                    raise RuntimeError(
                        f"part {part['index']} failed {MAX_TRIES_PER_PART} times; last error: {exc}"
                    ) from exc
                if generation == self.generation[k]:
                    log.warning(
                        "backbone worker %d died (%s); starting a new one", k, type(exc).__name__
                    )
                    self.actors[k] = self._new_actor()
                    self.generation[k] += 1
                log.warning("part %d is queued again", part["index"])
                queue.appendleft(part)
            fill(k)

    def _warn_stalled(self, in_flight: int, seconds: float) -> None:
        asks = ", ".join(f"{v:g} {k}" for k, v in self.asks.items() if v)
        resources = self.ray.cluster_resources()
        has = ", ".join(f"{v:g} {k}" for k, v in resources.items() if k in self.asks)
        log.warning(
            "no part finished in %.0f s (%d in flight on %d backbone workers, each asking for "
            "%s; the cluster has %s): a worker the cluster cannot place has its parts wait "
            "until it can (`ray status` lists pending actors)",
            seconds,
            in_flight,
            len(self.actors),
            asks,
            has or "none of them",
        )

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
