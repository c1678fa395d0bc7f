"""The Ladder HTTP service (FastAPI): files, fine-tuning jobs, models, joint predictions.

Shapes follow the OpenAI fine-tuning API (DESIGN.md section 5). Every error is
`{"error": {"code", "message", "param"}}` with a fitting status; state lives in SQLite under
LADDER_HOME; jobs run on Ray (or a worker thread with LADDER_EXECUTOR=thread).
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import re
import secrets
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.db import TERMINAL, Database, new_id
from api.jobs import JobRunner
from api.serving import MicroBatcher, ModelNotFound, ModelRegistry

log = logging.getLogger(__name__)

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9:_.-]{0,127}$"   # no slashes, no "..": ids never become paths
MAX_UPLOAD_BYTES = int(os.environ.get("LADDER_MAX_UPLOAD_BYTES", 50 * 2**20))
MIN_ROWS = 10
UPLOAD_SUFFIXES = (".csv", ".jsonl", ".json")
_UNION_TAG = re.compile(r"^(int|float|str|bool|list\[.*\]|literal\[.*\]|function-.*|constrained-.*)$")


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_body(code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"code": code, "message": message, "param": param}}


# ---- request and response models --------------------------------------------------------------

class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    rows: int
    labels: list[str]


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=100)] = "auto"
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"
    learning_rate: Literal["auto"] | Annotated[float, Field(gt=0, le=1)] = "auto"
    reduction_factor: Literal["auto"] | Annotated[int, Field(ge=1, le=64)] = "auto"
    kept_layers: Literal["auto", "all"] | Annotated[list[Annotated[int, Field(ge=0, le=1000)]],
                                                    Field(min_length=1, max_length=1000)] = "auto"
    init: Literal["auto", "fisher", "magnitude", "random"] = "auto"
    cache_dtype: Literal["auto", "fp16", "bf16", "int8"] = "auto"


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=128)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(default=None, max_length=128)
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[str, Field(max_length=40, pattern=r"^[A-Za-z0-9_-]+$")] | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    model: str
    created_at: int
    finished_at: int | None = None
    status: Literal["validating_files", "queued", "caching", "training", "succeeded", "failed",
                    "cancelled"]
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any]
    fine_tuned_model: str | None = None
    error: JobError | None = None
    result: dict[str, Any] | None = None
    seed: int | None = None
    suffix: str | None = None


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] = {}


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["backbone", "side"]
    backbone: str


class DeletedModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    has_more: bool = False


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]
    has_more: bool = False


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1, max_length=128)] | Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(min_length=1, max_length=16)]
    inputs: Annotated[list[Annotated[str, Field(max_length=10000)]], Field(min_length=1,
                                                                          max_length=256)]

    @field_validator("inputs")
    @classmethod
    def no_empty_text(cls, inputs: list[str]) -> list[str]:
        for k, text in enumerate(inputs):
            if not text.strip():
                raise ValueError(f"inputs[{k}] is empty; send non-empty texts")
        return inputs


class PredictionObject(BaseModel):
    label: str
    scores: dict[str, float]


class PredictResponse(BaseModel):
    model: str | None = None
    models: list[str] | None = None
    predictions: list[PredictionObject] | list[list[PredictionObject]]


# ---- the app ------------------------------------------------------------------------------------

class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ladder_requests", "HTTP requests", ["route", "method", "status"],
                                registry=self.registry)
        self.latency = Histogram("ladder_request_seconds", "HTTP request latency", ["route"],
                                 registry=self.registry)
        self.batch_size = Histogram("ladder_predict_batch_texts", "texts per backbone pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.batch_requests = Histogram("ladder_predict_batch_requests",
                                        "requests grouped into one backbone pass",
                                        buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.queue_depth = Gauge("ladder_predict_queue_depth", "requests waiting for a pass",
                                 registry=self.registry)
        self.jobs = Gauge("ladder_jobs", "fine-tuning jobs by status", ["status"],
                          registry=self.registry)


def require_id(value: str, param: str) -> str:
    if not re.match(ID_PATTERN, value) or ".." in value:
        raise APIError(400, "invalid_id", f"{param} {value!r} is not a valid id", param)
    return value


def create_app(home: str | Path | None = None, executor: str | None = None,
               preload: list[str] | None = None, convert_at_start: bool | None = None) -> FastAPI:
    home = Path(home or os.environ.get("LADDER_HOME", "~/.ladder")).expanduser()
    executor = executor or os.environ.get("LADDER_EXECUTOR", "ray")
    if preload is None:
        preload = [b for b in os.environ.get("LADDER_PRELOAD", "minilm").split(",") if b]
    if convert_at_start is None:
        convert_at_start = os.environ.get("LADDER_CONVERT_AT_START", "1") != "0"
    state: dict[str, Any] = {}
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        (home / "files").mkdir(parents=True, exist_ok=True)
        db = Database(home / "ladder.db")
        registry = ModelRegistry(db)
        batcher = MicroBatcher(registry, on_batch=lambda n, r: (metrics.batch_size.observe(n),
                                                                 metrics.batch_requests.observe(r)))
        batcher.start()
        runner = JobRunner(db, home, executor)
        state.update(db=db, registry=registry, batcher=batcher, runner=runner, ready=False)
        runner.recover()

        def warm() -> None:
            for name in preload:
                try:
                    registry.backbone(name)
                except Exception:  # noqa: BLE001 - a missing backbone leaves /ready at 503
                    log.exception("could not preload backbone %s", name)
            state["ready"] = bool(registry.backbones)
            if convert_at_start:
                # GGUF backbones convert here, off the request path: otherwise the first job
                # created on one would wait for the conversion inside its HTTP request.
                from backbone_worker.backbone import convert_gguf_aliases
                try:
                    convert_gguf_aliases()
                except Exception:  # noqa: BLE001 - a request that needs it will say why
                    log.exception("could not convert the GGUF backbones")

        threading.Thread(target=warm, name="ladder-preload", daemon=True).start()
        yield
        await batcher.stop()

    app = FastAPI(title="Ladder", version="0.1.0", lifespan=lifespan,
                  description="Ladder Side-Tuning as a service: fine-tuning jobs and joint "
                              "backbone + side-network predictions.",
                  responses={400: {"model": ErrorResponse}, 401: {"model": ErrorResponse},
                             404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}})

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.code, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # pydantic adds union-member tags ("int", "literal['auto']") to the location: keep only
        # the field names, so param names the field a client sent.
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form")
               and not _UNION_TAG.match(str(p))]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(error_body("invalid_request_error", message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return JSONResponse(error_body(codes.get(exc.status_code, "http_error"), str(exc.detail)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal_error", "the server hit an unexpected error; "
                                       "see its log"), status_code=500)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics.requests.labels(path, request.method, str(response.status_code)).inc()
        metrics.latency.labels(path).observe(time.perf_counter() - start)
        return response

    def auth(request: Request) -> None:
        key = os.environ.get("LADDER_API_KEY")
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "invalid_api_key", "missing or wrong API key; send the header "
                           "'Authorization: Bearer <LADDER_API_KEY>'")

    v1 = [Depends(auth)]

    # ---- operations ------------------------------------------------------------------------

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"model": ErrorResponse}})
    def ready():
        if not state.get("ready"):
            return JSONResponse(error_body("not_ready", "no backbone is loaded yet"),
                                status_code=503)
        return {"status": "ready", "backbones": sorted(state["registry"].backbones)}

    @app.get("/info")
    def info() -> dict:
        import torch
        return {"version": app.version, "executor": executor, "home": str(home),
                "ray_address": os.environ.get("RAY_ADDRESS"),
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "backbones_loaded": sorted(state["registry"].backbones),
                "side_models_loaded": sorted(state["registry"].sides),
                "auth": bool(os.environ.get("LADDER_API_KEY"))}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        metrics.queue_depth.set(state["batcher"].depth())
        counts = state["db"].count_jobs_by_status()
        for status in ("validating_files", "queued", "caching", "training") + TERMINAL:
            metrics.jobs.labels(status).set(counts.get(status, 0))
        return PlainTextResponse(generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    # ---- files ---------------------------------------------------------------------------------

    @app.post("/v1/files", dependencies=v1, response_model=FileObject)
    async def upload(file: UploadFile = File(...), purpose: str = Form(...)) -> FileObject:
        from backbone_worker.data import DataError, load_dataset
        if purpose != "fine-tune":
            raise APIError(400, "invalid_purpose", f"purpose {purpose!r} is not supported; use "
                           f"'fine-tune'", "purpose")
        name = Path(file.filename or "").name
        suffix = Path(name).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise APIError(400, "invalid_file", f"file {name!r} must be .csv or .jsonl with "
                           f"columns text and label (optional text_pair)", "file")
        data = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise APIError(413, "file_too_large", f"file is larger than {MAX_UPLOAD_BYTES} bytes; "
                           f"split it or raise LADDER_MAX_UPLOAD_BYTES", "file")
        file_id = new_id("file")
        path = home / "files" / f"{file_id}{suffix}"
        path.write_bytes(data)
        has_pair = _has_column(data, suffix, "text_pair")
        try:
            dataset = load_dataset(str(path), text_pair_column="text_pair" if has_pair else None)
            if len(dataset.examples) < MIN_ROWS:
                raise DataError(f"the file has {len(dataset.examples)} rows; a fine-tuning file "
                                f"needs at least {MIN_ROWS}")
        except DataError as exc:
            path.unlink(missing_ok=True)
            raise APIError(400, "invalid_file", str(exc).replace(str(path), name), "file") from None
        record = {"id": file_id, "filename": name, "bytes": len(data),
                  "created_at": int(time.time()), "purpose": purpose,
                  "rows": len(dataset.examples), "labels": dataset.labels, "has_pair": has_pair,
                  "path": str(path)}
        state["db"].add_file(record)
        return FileObject(**record)

    @app.get("/v1/files", dependencies=v1, response_model=FileList)
    def list_files() -> FileList:
        return FileList(data=[FileObject(**f) for f in state["db"].list_files()])

    @app.get("/v1/files/{file_id}", dependencies=v1, response_model=FileObject)
    def get_file(file_id: str) -> FileObject:
        return FileObject(**_file(require_id(file_id, "file_id"), "file_id"))

    def _file(file_id: str, param: str, status: int = 404) -> dict:
        record = state["db"].get_file(file_id)
        if record is None:
            raise APIError(status, "file_not_found", f"no file with id {file_id!r}; upload it with "
                           f"POST /v1/files", param)
        return record

    # ---- jobs ----------------------------------------------------------------------------------

    @app.post("/v1/fine_tuning/jobs", dependencies=v1, response_model=JobObject)
    def create_job(body: JobCreate) -> JobObject:
        registry: ModelRegistry = state["registry"]
        if body.model not in registry.available_backbones():
            raise APIError(400, "model_not_found", f"backbone {body.model!r} is not available; "
                           f"use one of {', '.join(registry.available_backbones())}", "model")
        _file(require_id(body.training_file, "training_file"), "training_file", 400)
        if body.validation_file:
            _file(require_id(body.validation_file, "validation_file"), "validation_file", 400)
        _check_hyperparameters(body.model, body.hyperparameters)
        job = state["db"].add_job({
            "id": new_id("ftjob"), "created_at": int(time.time()), "model": body.model,
            "training_file": body.training_file, "validation_file": body.validation_file,
            "seed": body.seed, "suffix": body.suffix, "status": "queued",
            "hyperparameters": body.hyperparameters.model_dump()})
        state["db"].add_event(job["id"], "job created", data={"status": "queued"})
        state["runner"].submit(job["id"])
        return _job_object(job)

    @app.get("/v1/fine_tuning/jobs", dependencies=v1, response_model=JobList)
    def list_jobs(after: str | None = Query(default=None, max_length=128),
                  limit: int = Query(default=20, ge=1, le=100)) -> JobList:
        jobs, more = state["db"].list_jobs(require_id(after, "after") if after else None, limit)
        return JobList(data=[_job_object(j) for j in jobs], has_more=more)

    @app.get("/v1/fine_tuning/jobs/{job_id}", dependencies=v1, response_model=JobObject)
    def get_job(job_id: str) -> JobObject:
        return _job_object(_job(job_id))

    @app.post("/v1/fine_tuning/jobs/{job_id}/cancel", dependencies=v1, response_model=JobObject)
    def cancel_job(job_id: str) -> JobObject:
        job = _job(job_id)
        if job["status"] in TERMINAL:
            raise APIError(409, "job_not_cancellable", f"job {job_id} is already {job['status']}",
                           "job_id")
        state["db"].update_job(job_id, only_if_active=True, status="cancelled")
        state["runner"].cancel(job_id)
        return _job_object(_job(job_id))

    @app.get("/v1/fine_tuning/jobs/{job_id}/events", dependencies=v1,
             response_model=EventList, responses={200: {"content": {"text/event-stream": {}}}})
    async def job_events(job_id: str, after: str | None = Query(default=None, max_length=128),
                         limit: int = Query(default=100, ge=1, le=1000),
                         stream: bool = False):
        _job(job_id)
        if after:
            require_id(after, "after")
        if not stream:
            events, more = state["db"].list_events(job_id, after, limit)
            return EventList(data=[EventObject(**e) for e in events], has_more=more)
        return StreamingResponse(_stream(job_id, after), media_type="text/event-stream")

    async def _stream(job_id: str, after: str | None):
        db: Database = state["db"]
        while True:
            events, _ = db.list_events(job_id, after, 100)
            for event in events:
                after = event["id"]
                yield f"data: {json.dumps(EventObject(**event).model_dump())}\n\n"
            if not events and db.get_job(job_id)["status"] in TERMINAL:
                yield "data: [DONE]\n\n"
                return
            if not events:
                await asyncio.sleep(0.5)

    def _job(job_id: str) -> dict:
        job = state["db"].get_job(require_id(job_id, "job_id"))
        if job is None:
            raise APIError(404, "job_not_found", f"no fine-tuning job with id {job_id!r}", "job_id")
        return job

    def _job_object(job: dict) -> JobObject:
        return JobObject(**{k: v for k, v in job.items() if k != "attempts"})

    def _check_hyperparameters(backbone: str, hp: Hyperparameters) -> None:
        from transformers import AutoConfig

        from backbone_worker.backbone import resolve
        from backbone_worker.families import FamilyError, family_of
        config = AutoConfig.from_pretrained(resolve(backbone), local_files_only=True)
        family = family_of(config)
        if hp.reduction_factor != "auto":
            try:
                family.side_config(config, hp.reduction_factor)
            except FamilyError as exc:
                raise APIError(400, "invalid_hyperparameter", str(exc),
                               "hyperparameters.reduction_factor") from None
        if isinstance(hp.kept_layers, list):
            n = family.num_layers(config)
            bad = [i for i in hp.kept_layers if i >= n]
            if bad:
                raise APIError(400, "invalid_hyperparameter", f"kept_layers {bad} out of range: "
                               f"{backbone} has layers 0..{n - 1}", "hyperparameters.kept_layers")

    # ---- models and predictions ------------------------------------------------------------------

    @app.get("/v1/models", dependencies=v1, response_model=ModelList)
    def list_models() -> ModelList:
        registry: ModelRegistry = state["registry"]
        data = [ModelObject(id=b, created=0, owned_by="ladder", kind="backbone", backbone=b)
                for b in registry.available_backbones()]
        data += [ModelObject(id=m["id"], created=m["created"], owned_by="user", kind="side",
                             backbone=m["backbone"]) for m in state["db"].list_models()]
        return ModelList(data=data)

    @app.delete("/v1/models/{model_id}", dependencies=v1, response_model=DeletedModel)
    def delete_model(model_id: str) -> DeletedModel:
        require_id(model_id, "model_id")
        if model_id in state["registry"].available_backbones():
            raise APIError(400, "model_not_deletable", f"{model_id} is a backbone; only "
                           f"fine-tuned side models can be deleted", "model_id")
        record = state["db"].get_model(model_id)
        if record is None:
            raise APIError(404, "model_not_found", f"no model with id {model_id!r}", "model_id")
        state["db"].delete_model(model_id)
        state["registry"].forget(model_id)
        state["runner"].delete_model_files(record["path"])
        return DeletedModel(id=model_id, deleted=True)

    @app.post("/v1/predict", dependencies=v1, response_model=PredictResponse)
    async def predict(body: PredictRequest) -> PredictResponse:
        ids = [body.model] if isinstance(body.model, str) else body.model
        for model_id in ids:
            require_id(model_id, "model")
        try:
            results = await state["batcher"].predict(ids, body.inputs)
        except ModelNotFound as exc:
            raise APIError(404, "model_not_found", f"no fine-tuned model with id {exc.args[0]!r}; "
                           f"list them with GET /v1/models", "model") from None
        except ValueError as exc:
            raise APIError(400, "invalid_request_error", str(exc), "model") from None
        as_objects = [[PredictionObject(label=p.label, scores=p.scores) for p in r] for r in results]
        if isinstance(body.model, str):
            return PredictResponse(model=body.model, predictions=as_objects[0])
        return PredictResponse(models=ids, predictions=as_objects)

    return app


def _has_column(data: bytes, suffix: str, column: str) -> bool:
    """Whether an upload names `column` (header of a CSV, keys of the first JSON line)."""
    text = data.decode("utf-8-sig", errors="replace")
    if suffix == ".csv":
        return column in next(csv.reader(io.StringIO(text)), [])
    for line in text.splitlines():
        if line.strip():
            try:
                return column in json.loads(line)
            except (json.JSONDecodeError, TypeError):
                return False
    return False
