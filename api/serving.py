"""Serving predictions: loaded backbones and side models, and a micro-batcher.

Concurrent requests wait at most `max_wait_ms` to be grouped into one backbone pass of at most
`max_batch` texts; every side model any grouped request asked for (on that backbone) reads the
same ladder states. Inference runs in one executor thread, so requests never fight for cores.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from api.inference import JointModel, Prediction
from backbone_worker.backbone import Backbone, alias_installed, aliases, load_backbone
from side_trainer.artifacts import load_side_model
from side_trainer.model import SideNetwork


class ModelNotFound(KeyError):
    pass


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
                self.sides[model_id] = load_side_model(record["path"])
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

    async def predict(self, model_ids: list[str], texts: list[str]) -> list[list[Prediction]]:
        backbones = {self.registry.backbone_of(m) for m in model_ids}
        if len(backbones) > 1:
            raise ValueError(f"side models of different backbones ({', '.join(sorted(backbones))}) "
                             f"cannot share one pass; send one request per backbone")
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Request(backbones.pop(), model_ids, texts, future))
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
                if request.backbone != first.backbone or size + len(request.texts) > self.max_batch:
                    # Served in the next pass: put it back at the front of the line.
                    self.queue._queue.appendleft(request)  # noqa: SLF001 - asyncio.Queue has no push-front
                    break
                group.append(request)
                size += len(request.texts)
            try:
                results = await loop.run_in_executor(self.executor, self._run, group)
                for request, result in zip(group, results):
                    if not request.future.done():
                        request.future.set_result(result)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(exc)
            if self.on_batch is not None:
                self.on_batch(size, len(group))

    def _run(self, group: list[_Request]) -> list[list[list[Prediction]]]:
        """One backbone pass for the whole group, then each request's slice for its models."""
        model_ids = sorted({m for r in group for m in r.model_ids})
        joint = JointModel(self.registry.backbone(group[0].backbone),
                           [self.registry.side(m) for m in model_ids])
        texts = [t for r in group for t in r.texts]
        per_model = dict(zip(model_ids, joint.predict(texts)))
        out, start = [], 0
        for r in group:
            stop = start + len(r.texts)
            out.append([per_model[m][start:stop] for m in r.model_ids])
            start = stop
        return out
