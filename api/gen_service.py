"""Generation for the chat and completions endpoints: one `ContinuousDecoder` per backbone, stepped
by one worker thread, so that every request in flight on a backbone shares its decode steps
whichever side model it uses (side_trainer/continuous.py). Requests wait in a bounded queue
(`LADDER_MAX_QUEUE`, as /v1/predict's: beyond it, 429) and join the running batch at the next
step, up to `LADDER_MAX_GENERATING` rows a backbone; a request whose client went away is
cancelled and leaves at the next step.

A request's tokens reach its coroutine as text deltas: the text decoded so far less what was
sent, holding back an incomplete UTF-8 character and anything that could still begin a stop
string (which is never sent).
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from dataclasses import dataclass, field

from side_trainer.continuous import ContinuousDecoder, Request
from side_trainer.decoding import Sampling

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    pass


@dataclass
class Job:
    """A request as the service tracks it: what the worker needs, and where its events go."""

    backbone: str
    model: str | None  # a side model id, or None for the bare backbone
    prompt: list[int]
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: Request | None = None


class GenerationService:
    def __init__(self, registry, max_queue: int | None = None, max_rows: int | None = None):
        self.registry = registry
        self.max_queue = max_queue or int(os.environ.get("LADDER_MAX_QUEUE", 256))
        self.max_rows = max_rows or int(os.environ.get("LADDER_MAX_GENERATING", 32))
        self.incoming: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.decoders: dict[str, ContinuousDecoder] = {}
        self.heads: dict = {}
        self.in_flight = 0
        self._jobs: dict[int, Job] = {}  # by id() of their decoder Request
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="ladder-generate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def depth(self) -> int:
        return self.in_flight

    def submit(self, backbone: str, model: str | None, prompt: list[int], sampling: Sampling):
        """Queue a generation; its events (("token", id), ("done", Generation) or ("error",
        exception)) arrive on the returned job's `events`. Overloaded when the queue is full."""
        with self._lock:
            if self.in_flight >= self.max_queue:
                raise Overloaded(
                    f"{self.in_flight} generations are queued or running, the server's limit "
                    f"(LADDER_MAX_QUEUE); retry shortly"
                )
            self.in_flight += 1
        job = Job(backbone, model, prompt, sampling, asyncio.get_running_loop())
        self.incoming.put(job)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the request leaves at the next step (or never starts)."""
        if job.request is not None:
            job.request.cancelled = True
        else:
            job.sampling = Sampling(max_tokens=0)  # noticed when the worker takes it

    # ---- the worker thread ------------------------------------------------------------------

    def _emit(self, job: Job, event: tuple) -> None:
        job.loop.call_soon_threadsafe(job.events.put_nowait, event)

    def _finish(self, job: Job, event: tuple) -> None:
        with self._lock:
            self.in_flight -= 1
        if job.request is not None:
            self._jobs.pop(id(job.request), None)
        self._emit(job, event)

    def _decoder(self, backbone_name: str) -> ContinuousDecoder:
        decoder = self.decoders.get(backbone_name)
        if decoder is None:
            from backbone_worker.chat import end_tokens

            backbone = self.registry.backbone(backbone_name)
            head = self.registry.head(backbone_name)  # the one its side models share
            decoder = ContinuousDecoder(backbone, head, {}, end_tokens(backbone.tokenizer))
            self.decoders[backbone_name] = decoder
        return decoder

    def _admit(self, job: Job) -> None:
        if job.sampling.max_tokens <= 0:  # cancelled before it started
            self._finish(job, ("cancelled", None))
            return
        try:
            decoder = self._decoder(job.backbone)
            net = None
            if job.model is not None and job.model not in decoder.by_key:
                net = self.registry.side(job.model, task="generate")
            request = Request(
                job.prompt,
                job.model,
                job.sampling,
                on_token=lambda r, t: self._emit(job, ("token", t)),
                on_done=lambda r: self._finish(job, ("done", r.generation)),
            )
            job.request = request
            self._jobs[id(request)] = job
            decoder.add(request, net)
        except Exception as exc:  # noqa: BLE001 - the request's error, reported to it
            log.exception("generation could not start")
            self._finish(job, ("error", exc))

    def _work(self) -> None:
        while not self._stop.is_set():
            while True:
                try:
                    self.waiting.append(self.incoming.get_nowait())
                except queue.Empty:
                    break
            for job in list(self.waiting):
                decoder = self.decoders.get(job.backbone)
                if decoder is None or decoder.active < self.max_rows:
                    self.waiting.remove(job)
                    self._admit(job)
            busy = [d for d in self.decoders.values() if d.active]
            for decoder in busy:
                try:
                    decoder.step()
                except Exception as exc:  # noqa: BLE001 - every request of the batch fails
                    log.exception("a generation step failed")
                    failed = [self._jobs.get(id(r)) for r in decoder.rows]
                    decoder.reset()
                    for job in filter(None, failed):
                        self._finish(job, ("error", exc))
            if not busy and not self.waiting:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
