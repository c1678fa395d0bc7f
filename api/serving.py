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
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from api.allocator import release_freed_memory
from api.inference import JointModel, Prediction
from backbone_worker.backbone import Backbone, alias_installed, aliases, load_backbone
from side_trainer.artifacts import CONFIG_FILE, WEIGHTS_FILE, load_side_model
from side_trainer.memory import module_bytes
from side_trainer.model import ENCODER_DECODER, SideConfig, SideNetwork

log = logging.getLogger(__name__)


class ModelNotFound(KeyError):
    pass


class GenerativeModel(ValueError):
    """A side model that writes text, asked to classify."""

    def __init__(self, model_id: str):
        super().__init__(
            f"model {model_id!r} is a generative model (fine-tuned on chats or prompt/completion "
            f"pairs); /v1/predict serves classifiers only"
        )


class ClassifierModel(ValueError):
    """A side model that classifies, asked to write."""

    def __init__(self, model_id: str):
        super().__init__(
            f"model {model_id!r} is a classifier; use /v1/predict for it (the chat and "
            f"completions endpoints serve generative models and backbones)"
        )


class ModelUnavailable(RuntimeError):
    """A registered side model the server cannot load or run: the server's fault, not the
    request's. The message names the model, never a server path (the log has the details)."""

    def __init__(self, model_id: str, why: str):
        super().__init__(f"fine-tuned model {model_id!r} cannot be served: {why}")
        self.model_id = model_id


def _check_task(model_id: str, cfg: SideConfig, task: str) -> None:
    if cfg.task != task:
        raise GenerativeModel(model_id) if cfg.task == "generate" else ClassifierModel(model_id)


def _saved_config(record: dict) -> SideConfig | None:
    """A registered model's saved config, or None where it cannot be read (the load then fails
    and says so)."""
    try:
        return SideConfig.load(Path(record["path"]) / CONFIG_FILE)
    except Exception:  # noqa: BLE001 - missing or damaged: load_side_model reports it
        return None


def _weights_bytes(record: dict) -> int:
    """A side model's weights file's size: what loading it will hold, less its Python objects."""
    try:
        return (Path(record["path"]) / WEIGHTS_FILE).stat().st_size
    except OSError:  # missing: the load fails and says so
        return 0


class ModelRegistry:
    """Loaded backbones, and side models in a least-recently-used cache bounded in bytes
    (LADDER_MAX_SIDE_MODEL_MB, default 1024): a model evicted is loaded again on its next use."""

    def __init__(self, db, max_side_bytes: int | None = None):
        self.db = db
        self.backbones: dict[str, Backbone] = {}
        self.sides: OrderedDict[str, SideNetwork] = OrderedDict()
        self.heads: dict = {}  # backbone name -> its frozen final norm and LM head, shared
        self._bytes: dict[str, int] = {}  # each held side model's memory, counted at its load
        self._sizes: dict[str, int] = {}  # each model's memory when last loaded, held or not
        self.max_side_bytes = max_side_bytes or int(
            float(os.environ.get("LADDER_MAX_SIDE_MODEL_MB", 1024)) * 2**20
        )
        self._lock = threading.Lock()
        self.loads = 0  # side models loaded from disk (an evicted one counts again)
        self.evictions = 0  # side models unloaded to stay within the budget

    def held(self) -> dict:
        """Side models in memory now: how many, their bytes (weights and Python objects), and
        loads since start."""
        with self._lock:
            return {"models": len(self.sides), "bytes": self._side_bytes(), "loads": self.loads}

    def backbone(self, name: str) -> Backbone:
        with self._lock:
            return self._backbone(name)

    def _backbone(self, name: str) -> Backbone:
        if name not in self.backbones:
            self.backbones[name] = load_backbone(name)
        return self.backbones[name]

    def head(self, name: str):
        """A decoder-only backbone's frozen final norm and LM head: one in memory, shared by
        the bare backbone's generations and every generative side model of that backbone."""
        with self._lock:
            return self._head(name)

    def _head(self, name: str):
        if name not in self.heads:
            from side_trainer.gen_eval import frozen_head

            self.heads[name] = frozen_head(self._backbone(name))
        return self.heads[name]

    def side(
        self, model_id: str, keep: frozenset[str] = frozenset(), task: str = "classify"
    ) -> SideNetwork:
        """The side model, loaded if it is not held. Making room evicts the least recently used
        models, except those in `keep`: a pass names its models in `keep`, since a model it
        already holds stays in memory until the pass ends, evicted or not, and the budget would
        count it no more. A pass whose own models exceed the budget holds them all. `task`:
        what the caller serves ("classify": /v1/predict; "generate": the chat and completions
        endpoints); a model of the other task raises GenerativeModel or ClassifierModel."""
        with self._lock:
            if model_id in self.sides:
                self.sides.move_to_end(model_id)
                _check_task(model_id, self.sides[model_id].cfg, task)
            else:
                record = self.db.get_model(model_id)
                if record is None:
                    raise ModelNotFound(model_id)
                saved = _saved_config(record)
                if saved is not None:  # the wrong task costs no load
                    _check_task(model_id, saved, task)
                # Room first, for what the model cost when it was last loaded (a first load: its
                # weights file), so that loading it does not take the cache past its budget.
                self._make_room(keep, incoming=self._sizes.get(model_id, _weights_bytes(record)))
                try:
                    shared = (
                        self._head(record["backbone"])
                        if saved is not None
                        and saved.task == "generate"
                        and saved.family != ENCODER_DECODER
                        else None
                    )
                    side = load_side_model(record["path"], head=shared)
                    _check_task(model_id, side.cfg, task)
                    self.sides[model_id] = side
                    # The shared head is the backbone's, counted once, not per side model.
                    own = module_bytes(side) - (module_bytes(shared) if shared is not None else 0)
                    self._bytes[model_id] = self._sizes[model_id] = own
                    self.loads += 1
                except (GenerativeModel, ClassifierModel):
                    raise
                except Exception as exc:  # noqa: BLE001 - any load failure is the model's state
                    log.error(
                        "cannot load side model %s from %s: %r", model_id, record["path"], exc
                    )
                    raise ModelUnavailable(
                        model_id,
                        "its files on the server are missing or damaged; fine-tune it again",
                    ) from exc
                self._make_room(keep | {model_id})
            return self.sides[model_id]

    def shrink(self) -> int:
        """Unload least recently used models down to the budget, none kept: a pass whose own
        models exceeded the budget held them all, and calls this when it ends. Returns how many
        were unloaded."""
        with self._lock:
            return self._make_room(frozenset())

    def _make_room(self, pinned: frozenset[str], incoming: int = 0) -> int:
        """Unload least recently used models, none of `pinned`, until those held and `incoming`
        bytes fit the budget. Returns how many were unloaded."""
        evicted = 0
        while self._side_bytes() + incoming > self.max_side_bytes:
            victim = next((m for m in self.sides if m not in pinned), None)
            if victim is None:
                break
            del self.sides[victim]
            del self._bytes[victim]
            self.evictions += 1
            evicted += 1
            log.info("unloaded side model %s (LADDER_MAX_SIDE_MODEL_MB)", victim)
        return evicted

    def _side_bytes(self) -> int:
        return sum(self._bytes.values())

    def backbone_of(self, model_id: str) -> str:
        record = self.db.get_model(model_id)
        if record is None:
            raise ModelNotFound(model_id)
        return record["backbone"]

    def forget(self, model_id: str) -> None:
        with self._lock:
            self.sides.pop(model_id, None)
            self._bytes.pop(model_id, None)
            self._sizes.pop(model_id, None)

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
    pairs: list[str] | None  # second texts of pair inputs, or None
    future: asyncio.Future
    done: int = 0  # texts answered so far (a request passes in chunks)
    results: list | None = None  # per model id: the predictions so far


@dataclass
class _Chunk:
    """Up to max_batch texts of one request: the unit the queue holds and a pass groups."""

    request: _Request
    start: int
    stop: int

    @property
    def texts(self) -> list[str]:
        return self.request.texts[self.start : self.stop]

    @property
    def pairs(self) -> list[str] | None:
        pairs = self.request.pairs
        return None if pairs is None else pairs[self.start : self.stop]


class Overloaded(RuntimeError):
    """More predictions waiting than LADDER_MAX_PREDICT_QUEUE: retry later."""


class MicroBatcher:
    """Fair micro-batching: a request passes in chunks of at most `max_batch` texts, and a
    request's next chunk queues behind whatever arrived meanwhile, so a one-text request waits
    at most one pass behind a request of hundreds of texts. At most `max_queue` requests wait."""

    def __init__(
        self,
        registry: ModelRegistry,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        on_batch=None,
        max_queue: int | None = None,
    ):
        self.registry = registry
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch  # metrics hook: on_batch(n_texts, n_requests)
        self.max_queue = max_queue or int(os.environ.get("LADDER_MAX_PREDICT_QUEUE", 256))
        self.queue: asyncio.Queue[_Chunk] = asyncio.Queue()
        self.waiting = 0  # requests not answered yet
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ladder-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def depth(self) -> int:
        return self.waiting

    async def predict(
        self, model_ids: list[str], texts: list[str], pairs: list[str] | None = None
    ) -> list[list[Prediction]]:
        backbones = {self.registry.backbone_of(m) for m in model_ids}
        if len(backbones) > 1:
            raise ValueError(
                f"side models of different backbones ({', '.join(sorted(backbones))}) "
                f"cannot share one pass; send one request per backbone"
            )
        if self.waiting >= self.max_queue:
            raise Overloaded(
                f"{self.waiting} predictions are already waiting on this server; retry in a moment"
            )
        request = _Request(
            backbones.pop(),
            model_ids,
            texts,
            pairs,
            asyncio.get_running_loop().create_future(),
            results=[[] for _ in model_ids],
        )
        self.waiting += 1
        try:
            self.queue.put_nowait(self._next_chunk(request))
            return await request.future
        finally:
            self.waiting -= 1

    def _next_chunk(self, request: _Request) -> _Chunk:
        return _Chunk(request, request.done, min(request.done + self.max_batch, len(request.texts)))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            group, size = [first], len(first.texts)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch:
                try:
                    chunk = await asyncio.wait_for(self.queue.get(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
                # One pass runs one backbone on texts alone or on pairs alone.
                if (
                    chunk.request.backbone != first.request.backbone
                    or (chunk.pairs is None) != (first.pairs is None)
                    or size + len(chunk.texts) > self.max_batch
                ):
                    # Served in the next pass: put it back at the front of the line.
                    self.queue._queue.appendleft(chunk)  # noqa: SLF001 - asyncio.Queue has no push-front
                    break
                group.append(chunk)
                size += len(chunk.texts)
            try:
                results = await loop.run_in_executor(self.executor, self._run, group)
            except Exception as exc:  # noqa: BLE001 - the pass itself failed: every request
                results = [exc] * len(group)
            for chunk, result in zip(group, results):
                self._settle(chunk, result)
            if self.on_batch is not None:
                self.on_batch(size, len(group))

    def _settle(self, chunk: _Chunk, result) -> None:
        request = chunk.request
        if request.future.done():
            return
        if isinstance(result, Exception):
            request.future.set_exception(result)
            return
        for so_far, part in zip(request.results, result):
            so_far.extend(part)
        request.done = chunk.stop
        if request.done < len(request.texts):
            self.queue.put_nowait(self._next_chunk(request))  # behind what came meanwhile
        else:
            request.future.set_result(request.results)

    def _run(self, group: list[_Chunk]) -> list:
        """One backbone pass for the whole group, then each chunk's slice for its request's
        models, or the exception of the first of its models that could not run. A pass may
        hold more side models than the budget (all those its requests name); the registry
        shrinks back to the budget when it ends."""
        try:
            return self._pass(group)
        finally:
            if self.registry.shrink():
                release_freed_memory()

    def _pass(self, group: list[_Chunk]) -> list:
        from api.inference import InferenceError

        backbone = self.registry.backbone(group[0].request.backbone)
        sides: dict[str, SideNetwork] = {}
        failed: dict[str, Exception] = {}
        named = frozenset(m for c in group for m in c.request.model_ids)
        evictions = self.registry.evictions
        for model_id in sorted(named):
            try:
                side = self.registry.side(model_id, keep=named)
            except (ModelNotFound, ModelUnavailable) as exc:
                failed[model_id] = exc
                continue
            if side.cfg.backbone_fingerprint != backbone.fingerprint:
                failed[model_id] = ModelUnavailable(
                    model_id,
                    f"it was trained on other weights than the loaded backbone {backbone.name!r}",
                )
            elif side.cfg.text_pair != (group[0].pairs is not None):
                failed[model_id] = InferenceError(
                    f"model {model_id!r} was trained on "
                    + (
                        'text pairs: send each input as {"text": ..., "text_pair": ...}'
                        if side.cfg.text_pair
                        else "single texts: send inputs as plain strings"
                    )
                )
            else:
                sides[model_id] = side
        if self.registry.evictions != evictions:
            # Side models were unloaded to make room: hand their memory back before the pass
            # allocates its own (malloc keeps freed memory, and the server's resident memory
            # would stay at its high-water mark rather than follow the budget).
            release_freed_memory()
        healthy = list(sides)
        wanted = [c for c in group if not any(m in failed for m in c.request.model_ids)]
        per_model: dict[str, list[Prediction]] = {}
        if healthy and wanted:
            texts = [t for c in wanted for t in c.texts]
            pairs = [p for c in wanted for p in c.pairs] if wanted[0].pairs is not None else None
            joint = JointModel(backbone, [sides[m] for m in healthy])
            per_model = dict(zip(healthy, joint.predict(texts, pairs)))
        out, start = [], 0
        for c in group:
            bad = next((failed[m] for m in c.request.model_ids if m in failed), None)
            if bad is not None:
                out.append(bad)
                continue
            stop = start + len(c.texts)
            out.append([per_model[m][start:stop] for m in c.request.model_ids])
            start = stop
        return out
