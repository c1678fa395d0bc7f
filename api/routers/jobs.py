"""Fine-tuning jobs: create, list, get, cancel, and their events (paged or streamed)."""

from __future__ import annotations

import asyncio
import json
import os
import time

from anyio import to_thread
from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from api.db import TERMINAL, Database, TooManyJobs, new_id
from api.disk import InsufficientStorage
from api.errors import APIError, http_field, http_message, require_id
from api.hyperparameters import declared
from api.jobs import check_room, resolved_hyperparameters
from api.routers.files import file_record
from api.schemas import (
    ErrorResponse,
    EventList,
    EventObject,
    HyperparameterList,
    HyperparameterObject,
    Hyperparameters,
    JobCreate,
    JobList,
    JobObject,
)
from api.serving import ModelRegistry
from api.state import Services, services

router = APIRouter(prefix="/v1/fine_tuning/jobs")
# What a job would run with, before it is created (the console's job form shows it).
defaults_router = APIRouter(prefix="/v1/fine_tuning")


def _check_backbone(registry: ModelRegistry, model: str) -> None:
    from backbone_worker.backbone import BackboneError, backbone_config, resolve
    from backbone_worker.families import FamilyError

    if model not in registry.available_backbones():
        # A hub id is taken when it is in the server's Hugging Face cache (or it may download).
        try:
            resolve(model)
        except BackboneError:
            # Why the server lacks it (its cache, its packages) is the server's business.
            raise APIError(
                400,
                "model_not_found",
                f"backbone {model!r} is not available on this server; use one of "
                f"{', '.join(registry.available_backbones())} or a hub id the server has",
                "model",
            ) from None
    try:  # a directory with a config.json that Ladder cannot take
        backbone_config(model)
    except (BackboneError, FamilyError) as exc:
        raise APIError(400, "invalid_model", http_message(exc), "model") from None


@defaults_router.get("/hyperparameters", response_model=HyperparameterList)
def resolved_defaults(
    model: str = Query(min_length=1, max_length=128),
    training_file: str = Query(min_length=1, max_length=128),
    s: Services = Depends(services),
) -> HyperparameterList:
    """Every hyperparameter a job takes, with the value "auto" resolves to for this backbone
    and this upload (some defaults depend on the upload's size or the backbone's family)."""
    _check_backbone(s.registry, model)
    record = file_record(s, require_id(training_file, "training_file"), "training_file", 400)
    values = resolved_hyperparameters(model, {}, record["rows"])
    data = [
        HyperparameterObject(
            name=setting.http,
            description=setting.help,
            value=values[setting.http],
            sweep=setting.sweep,
            choices=[c for c in setting.choices if c is not None] if setting.choices else None,
        )
        for *_, setting in declared()
    ]
    return HyperparameterList(model=model, training_file=training_file, data=data)


@router.post("", response_model=JobObject)
def create_job(body: JobCreate, s: Services = Depends(services)) -> JobObject:
    _check_backbone(s.registry, body.model)
    record = file_record(s, require_id(body.training_file, "training_file"), "training_file", 400)
    if body.validation_file:
        file_record(s, require_id(body.validation_file, "validation_file"), "validation_file", 400)
    _check_hyperparameters(body.model, body.hyperparameters)
    if record.get("task") == "generation":
        _check_writer(body.model)
    job = {
        "id": new_id("ftjob"),
        "created_at": int(time.time()),
        "model": body.model,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "seed": body.seed,
        "suffix": body.suffix,
        "status": "queued",
        # What the job will run with, shown from the start ("auto" resolved as GET
        # /v1/fine_tuning/hyperparameters resolves it; the job resolves nothing further).
        "hyperparameters": resolved_hyperparameters(
            body.model, body.hyperparameters.model_dump(), record["rows"]
        ),
    }
    try:
        check_room(s.home, body.model, job["hyperparameters"], record)
    except InsufficientStorage as exc:
        raise APIError(507, "insufficient_storage", str(exc)) from None
    try:
        # Counted and inserted at once: requests arriving together cannot all pass the cap.
        job = s.db.add_job(job, max_active=int(os.environ.get("LADDER_MAX_ACTIVE_JOBS", 100)))
    except TooManyJobs as exc:
        raise APIError(
            429,
            "too_many_jobs",
            f"{exc.active} jobs are queued or running on this "
            f"server, or stopping after a cancel (at most {exc.cap}); retry when some have "
            f"finished",
        ) from None
    s.db.add_event(job["id"], "job created", data={"status": "queued"})
    s.runner.submit(job["id"])
    return _job_object(job)


@router.get("", response_model=JobList)
def list_jobs(
    after: str | None = Query(default=None, max_length=128),
    limit: int = Query(default=20, ge=1, le=100),
    s: Services = Depends(services),
) -> JobList:
    jobs, more = s.db.list_jobs(require_id(after, "after") if after else None, limit)
    return JobList(data=[_job_object(j) for j in jobs], has_more=more)


@router.get("/{job_id}", response_model=JobObject)
def get_job(job_id: str, s: Services = Depends(services)) -> JobObject:
    return _job_object(_job(s, job_id))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, s: Services = Depends(services)) -> JobObject:
    job = _job(s, job_id)
    if job["status"] in TERMINAL:
        raise APIError(
            409, "job_not_cancellable", f"job {job_id} is already {job['status']}", "job_id"
        )
    # Cancelled at once for the client; a running job keeps its place among
    # LADDER_MAX_ACTIVE_JOBS until its run has stopped (within about a second) and set its
    # finished_at.
    s.db.cancel_job(job_id)
    s.runner.cancel(job_id)
    if job["status"] == "queued":
        # Never started, so no run will stop: it has stopped now, and its last event is said
        # here (a job that was starting at that moment says the same, and the database keeps
        # only one).
        s.db.finish_cancelled(job_id)
    return _job_object(_job(s, job_id))


@router.get(
    "/{job_id}/events",
    response_model=EventList,
    responses={200: {"content": {"text/event-stream": {}}}, 429: {"model": ErrorResponse}},
)
async def job_events(
    job_id: str,
    after: str | None = Query(default=None, max_length=128),
    limit: int = Query(default=100, ge=1, le=1000),
    stream: bool = False,
    s: Services = Depends(services),
):
    await to_thread.run_sync(_job, s, job_id)
    if after:
        require_id(after, "after")
    if not stream:
        events, more = await to_thread.run_sync(s.db.list_events, job_id, after, limit)
        return EventList(data=[EventObject(**e) for e in events], has_more=more)
    limit_streams = int(os.environ.get("LADDER_MAX_EVENT_STREAMS", 64))
    # Checked and counted with no await between: no other request runs on the event loop
    # meanwhile, so simultaneous requests cannot all pass the cap.
    if s.streams >= limit_streams:
        raise APIError(
            429,
            "too_many_streams",
            f"this server already serves {limit_streams} "
            f"event streams; page through events with GET .../events?after=... "
            f"or retry later",
            "stream",
        )
    s.streams += 1
    return _CountedStream(s, _stream(s.db, job_id, after))


class _CountedStream(StreamingResponse):
    """An event stream that gives its place among LADDER_MAX_EVENT_STREAMS back however it
    ends: finished, disconnected, or failed before its first event."""

    def __init__(self, s: Services, events):
        super().__init__(events, media_type="text/event-stream")
        self.services = s

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.services.streams -= 1


STREAM_POLL_S = 0.5
# A job that ended without writing its last event (its runner died) closes streams after this.
STREAM_GRACE_S = 30


async def _stream(db: Database, job_id: str, after: str | None):
    """Every event of the job, ending with the job's last one (a terminal status): the status
    can turn terminal before the job has written it (a cancelled job's run stops within about a
    second, and sets finished_at). The database is read in worker threads, never on the event
    loop."""
    while True:
        events, _ = await to_thread.run_sync(db.list_events, job_id, after, 100)
        for event in events:
            after = event["id"]
            yield f"data: {json.dumps(EventObject(**event).model_dump())}\n\n"
            if event["data"].get("status") in TERMINAL:
                yield "data: [DONE]\n\n"
                return
        if not events:
            job = await to_thread.run_sync(db.get_job, job_id)
            if (
                job["status"] in TERMINAL
                and job["finished_at"] is not None
                and time.time() - job["finished_at"] > STREAM_GRACE_S
            ):
                yield "data: [DONE]\n\n"
                return
            await asyncio.sleep(STREAM_POLL_S)


def _job(s: Services, job_id: str) -> dict:
    job = s.db.get_job(require_id(job_id, "job_id"))
    if job is None:
        raise APIError(404, "job_not_found", f"no fine-tuning job with id {job_id!r}", "job_id")
    return job


# A job's columns that are the service's bookkeeping, not the client's business.
_INTERNAL = {"attempts", "store"}


def _job_object(job: dict) -> JobObject:
    return JobObject(**{k: v for k, v in job.items() if k not in _INTERNAL})


def _check_writer(backbone: str) -> None:
    """A generation file needs a backbone that writes: a decoder-only one, or T5."""
    from backbone_worker.backbone import backbone_config
    from backbone_worker.families import DECODER, ENCODER_DECODER

    _, family = backbone_config(backbone)
    if family.name not in (DECODER, ENCODER_DECODER):
        raise APIError(
            400,
            "invalid_model",
            f"backbone {backbone!r} is {family.name}; a chat or prompt/completion file trains "
            f"a generative side network, which needs a decoder-only backbone such as smollm2 "
            f"(or a T5)",
            "model",
        )


def _check_hyperparameters(backbone: str, hp: Hyperparameters) -> None:
    from backbone_worker.backbone import backbone_config
    from backbone_worker.families import DECODER, FamilyError

    config, family = backbone_config(backbone)
    from backbone_worker.options import MAX_SWEEP, settings
    from side_trainer.options import TrainOptions, sweep_size

    swept = [s.http for _, _, s in settings(TrainOptions) if s.sweep]
    size = sweep_size(hp.n_seeds, *(getattr(hp, name) for name in swept))
    if size > MAX_SWEEP:
        raise APIError(
            400,
            "invalid_hyperparameter",
            f"the sweep has {size} configurations ({' x '.join([*swept, 'n_seeds'])}); "
            f"at most {MAX_SWEEP} train together: give fewer values",
            "hyperparameters",
        )

    def values(value, default) -> list:
        value = default if value == "auto" else value
        return value if isinstance(value, list) else [value]

    # Every reduction of a sweep with every count of side heads asked for, or the count
    # training would take by default for it.
    asked = values(hp.side_heads, [])
    for r in values(hp.reduction_factor, TrainOptions.reduction):
        param = "side_heads" if asked else "reduction_factor"
        for heads in asked or [family.default_side_heads(config, r)]:
            try:
                family.side_config(config, r, heads)
            except FamilyError as exc:
                raise APIError(
                    400, "invalid_hyperparameter", str(exc), f"hyperparameters.{param}"
                ) from None
    if isinstance(hp.kept_layers, list):
        n = family.num_layers(config)
        bad = [i for i in hp.kept_layers if i >= n]
        if bad:
            raise APIError(
                400,
                "invalid_hyperparameter",
                f"kept_layers {bad} out of range: {backbone} has layers 0..{n - 1}",
                "hyperparameters.kept_layers",
            )
    if hp.cache_width != "auto":
        from backbone_worker.cache import CacheOptions, projection_for

        projection = {} if hp.cache_projection == "auto" else {"projection": hp.cache_projection}
        try:
            projection_for(
                family.hidden_size(config),
                family.name == DECODER,
                CacheOptions(width=hp.cache_width, **projection),
            )
        except FamilyError as exc:
            raise APIError(
                400, "invalid_hyperparameter", http_message(exc), http_field(exc)
            ) from None
