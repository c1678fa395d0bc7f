"""Serving predictions: loaded backbones and side models, and a micro-batcher.

Concurrent requests wait at most `max_wait_ms` to be grouped into one backbone pass of at most
`max_batch` texts; every side model any grouped request asked for (on that backbone) reads the
same ladder states. Inference runs in one executor thread, so requests never fight for cores.
A side model that cannot be used (deleted meanwhile, damaged files, trained on other backbone
weights) fails only the requests that name it; the others in the pass are answered.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from api.inference import JointModel, Prediction
from backbone_worker.backbone import Backbone, alias_installed, aliases, load_backbone
from side_trainer.artifacts import load_side_model
from side_trainer.model import SideNetwork

log = logging.getLogger(__name__)


class ModelNotFound(KeyError):
    pass


class ModelUnavailable(RuntimeError):
    """A registered side model the server cannot load or run: the server's fault, not the
    request's. The message names the model, never a server path (the log has the details)."""

    def __init__(self, model_id: str, why: str):
        super().__init__(f"fine-tuned model {model_id!r} cannot be served: {why}")
        self.model_id = model_id


class ModelRegistry:
    def __init__(self, db):
        self.db = db
        self.backbones: dict[str, Backbone] = {}
        self.sides: dict[str, SideNetwork] = {}
        self._lock = threading.Lock()

    def backbone(self, name: str) -> Backbone:
        with self._lock:
            if name not in self.backbones:
                self.backbones[name] = load_backbone(name)
            return self.backbones[name]

    def side(self, model_id: str) -> SideNetwork:
        with self._lock:
            if model_id not in self.sides:
                record = self.db.get_model(model_id)
                if record is None:
                    raise ModelNotFound(model_id)
                try:
                    self.sides[model_id] = load_side_model(record["path"])
                except Exception as exc:  # noqa: BLE001 - any load failure is the model's state
                    log.error("cannot load side model %s from %s: %r", model_id, record["path"],
                              exc)
                    raise ModelUnavailable(model_id, "its files on the server are missing or "
                                           "damaged; fine-tune it again") from exc
            return self.sides[model_id]

    def backbone_of(self, model_id: str) -> str:
        record = self.db.get_model(model_id)
        if record is None:
            raise ModelNotFound(model_id)
        return record["backbone"]

    def forget(self, model_id: str) -> None:
        with self._lock:
            self.sides.pop(model_id, None)

    def available_backbones(self) -> list[str]:
        out = []
        for name in aliases():
            try:
                if alias_installed(name):
                    out.append(name)
            except Exception:  # noqa: BLE001 - an alias whose package is not installed
                continue
        return out


@dataclass
class _Request:
    backbone: str
    model_ids: list[str]
    texts: list[str]
    pairs: list[str] | None          # second texts of pair inputs, or None
    future: asyncio.Future


class MicroBatcher:
    def __init__(self, registry: ModelRegistry, max_batch: int = 64, max_wait_ms: float = 5.0,
                 on_batch=None):
        self.registry = registry
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch          # metrics hook: on_batch(n_texts, n_requests)
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ladder-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return self.queue.qsize()

    async def predict(self, model_ids: list[str], texts: list[str],
                      pairs: list[str] | None = None) -> list[list[Prediction]]:
        backbones = {self.registry.backbone_of(m) for m in model_ids}
        if len(backbones) > 1:
            raise ValueError(f"side models of different backbones ({', '.join(sorted(backbones))}) "
                             f"cannot share one pass; send one request per backbone")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Request(backbones.pop(), model_ids, texts, pairs, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            group, size = [first], len(first.texts)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    request = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                # One pass runs one backbone on texts alone or on pairs alone.
                if (request.backbone != first.backbone
                        or (request.pairs is None) != (first.pairs is None)
                        or size + len(request.texts) > self.max_batch):
                    # Served in the next pass: put it back at the front of the line.
                    self.queue._queue.appendleft(request)  # noqa: SLF001 - asyncio.Queue has no push-front
                    break
                group.append(request)
                size += len(request.texts)
            try:
                results = await loop.run_in_executor(self.executor, self._run, group)
                for request, result in zip(group, results):
                    if request.future.done():
                        continue
                    if isinstance(result, Exception):
                        request.future.set_exception(result)
                    else:
                        request.future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - the pass itself failed: every request
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(exc)
            if self.on_batch is not None:
                self.on_batch(size, len(group))

    def _run(self, group: list[_Request]) -> list:
        """One backbone pass for the whole group, then each request's slice for its models, or
        the exception of the first of its models that could not run."""
        from api.inference import InferenceError
        backbone = self.registry.backbone(group[0].backbone)
        sides: dict[str, SideNetwork] = {}
        failed: dict[str, Exception] = {}
        for model_id in sorted({m for r in group for m in r.model_ids}):
            try:
                side = self.registry.side(model_id)
            except (ModelNotFound, ModelUnavailable) as exc:
                failed[model_id] = exc
                continue
            if side.cfg.backbone_fingerprint != backbone.fingerprint:
                failed[model_id] = ModelUnavailable(
                    model_id, f"it was trained on other weights than the loaded backbone "
                              f"{backbone.name!r}")
            else:
                sides[model_id] = side
        for r in group:
            for model_id in r.model_ids:
                side = sides.get(model_id)
                if side is not None and side.cfg.text_pair != (r.pairs is not None):
                    failed.setdefault(model_id, InferenceError(
                        f"model {model_id!r} was trained on " +
                        ("text pairs: send each input as {\"text\": ..., \"text_pair\": ...}"
                         if side.cfg.text_pair else
                         "single texts: send inputs as plain strings")))
        healthy = [m for m in sides if m not in failed]
        wanted = [r for r in group if not any(m in failed for m in r.model_ids)]
        per_model: dict[str, list[Prediction]] = {}
        if healthy and wanted:
            texts = [t for r in wanted for t in r.texts]
            pairs = [p for r in wanted for p in r.pairs] if wanted[0].pairs is not None else None
            joint = JointModel(backbone, [sides[m] for m in healthy])
            per_model = dict(zip(healthy, joint.predict(texts, pairs)))
        out, start = [], 0
        for r in group:
            bad = next((failed[m] for m in r.model_ids if m in failed), None)
            if bad is not None:
                out.append(bad)
                continue
            stop = start + len(r.texts)
            out.append([per_model[m][start:stop] for m in r.model_ids])
            start = stop
        return out
