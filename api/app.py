"""The Ladder HTTP service (FastAPI): files, fine-tuning jobs, models, joint predictions.

Shapes follow the OpenAI fine-tuning API (README: "The service"). Every error is
`{"error": {"code", "message", "param"}}` with a fitting status; state lives in SQLite under
LADDER_HOME; jobs run on Ray (or a worker thread with LADDER_EXECUTOR=thread). The routes live in
api/routers/, one module per resource; what they share is `api.state.Services`.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sqlite3
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.db import open_database
from api.disk import collect_garbage
from api.errors import APIError, error_body
from api.gen_service import GenerationService
from api.guard import RequestGuard, RequestMetrics
from api.jobs import JobRunner
from api.routers import completions, console, files, jobs, models, operations
from api.schemas import ErrorResponse
from api.serving import MicroBatcher, ModelRegistry
from api.state import Metrics, Services
from api.uploads import sweep

log = logging.getLogger(__name__)

_UNION_TAG = re.compile(
    r"^(int|float|str|bool|list\[.*\]|literal\[.*\]|function-.*|constrained-.*)$"
)


_MISMATCH = re.compile(r"^(literal_error|.*_type|.*_parsing)$")


def _telling_error(errors: list[dict]) -> dict:
    """The error to report. A value of a union field (a hyperparameter: "auto", a number or a
    list) fails every member: report the member whose kind of value it was (0 epochs: "greater
    than or equal to 1", not "should be 'auto'"); if it fits none, every member's message."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}

    def place(e: dict) -> list:
        return [p for p in e.get("loc", ()) if not _UNION_TAG.match(str(p))]

    first = errors[0]
    field = place(first)
    same = [e for e in errors if place(e)[: len(field)] == field]
    if len(same) < 2:
        return first
    for e in same:
        if not _MISMATCH.match(e.get("type", "")):
            return e
    return {**first, "msg": "; or ".join(dict.fromkeys(e["msg"] for e in same))}


def create_app(
    home: str | Path | None = None,
    executor: str | None = None,
    preload: list[str] | None = None,
    convert_at_start: bool | None = None,
) -> FastAPI:
    home = Path(home or os.environ.get("LADDER_HOME", "~/.ladder")).expanduser()
    executor = executor or os.environ.get("LADDER_EXECUTOR", "ray")
    if preload is None:
        preload = [b for b in os.environ.get("LADDER_PRELOAD", "minilm").split(",") if b]
    if convert_at_start is None:
        convert_at_start = os.environ.get("LADDER_CONVERT_AT_START", "1") != "0"
    s = Services(home=home, executor=executor, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        (home / "files").mkdir(parents=True, exist_ok=True)
        s.db, s.recovered_from = open_database(home)
        # What a crash left: uploads that never got their record (api/uploads.py).
        sweep(home / "files", s.db.has_file_path)
        # Stores and checkpoints nothing needs any more (api/disk.py).
        collect_garbage(home, s.db)
        s.registry = ModelRegistry(s.db)
        metrics = s.metrics
        s.batcher = MicroBatcher(
            s.registry,
            on_batch=lambda n, r: (
                metrics.batch_size.observe(n),
                metrics.batch_requests.observe(r),
            ),
        )
        s.batcher.start()
        s.generator = GenerationService(s.registry)
        s.generator.start()
        s.runner = JobRunner(s.db, home, executor)

        def warm() -> None:
            for name in preload:
                try:
                    s.registry.backbone(name)
                except Exception:  # noqa: BLE001 - a missing backbone leaves /ready at 503
                    log.exception("could not preload backbone %s", name)
            s.ready = bool(s.registry.backbones)
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
        s.runner.stop()
        await s.batcher.stop()
        s.generator.stop()

    app = FastAPI(
        title="Ladder",
        version="0.1.0",
        lifespan=lifespan,
        description="Ladder Side-Tuning as a service: fine-tuning jobs and joint "
        "backbone + side-network predictions.",
        responses={
            400: {"model": ErrorResponse},
            401: {"model": ErrorResponse},
            403: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            409: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    app.state.ladder = s

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.code, exc.message, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = _telling_error(exc.errors())
        if first.get("type") == "json_invalid":  # its location is a character offset
            where = first.get("loc", ())[-1] if first.get("loc") else "?"
            return JSONResponse(
                error_body(
                    "invalid_request_error",
                    f"the request body is not valid JSON (at character "
                    f"{where}: {first.get('ctx', {}).get('error', first['msg'])})",
                ),
                status_code=400,
            )
        # pydantic adds union-member tags ("int", "literal['auto']") to the location: keep only
        # the field names, so param names the field a client sent.
        loc = [
            str(p)
            for p in first.get("loc", ())
            if p not in ("body", "query", "path", "form") and not _UNION_TAG.match(str(p))
        ]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return JSONResponse(error_body("invalid_request_error", message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = getattr(exc, "code", None) or codes.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(OSError)
    async def storage_error(request: Request, exc: OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("disk full under %s on %s: %r", home, request.url.path, exc)
            return JSONResponse(
                error_body(
                    "insufficient_storage",
                    "the server's disk is full; nothing of this request was "
                    "kept. Retry once its operator has freed space",
                ),
                status_code=507,
            )
        return await internal_error(request, exc)

    @app.exception_handler(sqlite3.OperationalError)
    async def database_error(request: Request, exc: sqlite3.OperationalError):
        log.error("database error on %s: %r", request.url.path, exc)
        if "full" in str(exc):
            return JSONResponse(
                error_body(
                    "insufficient_storage",
                    "the server's disk is full, so its database cannot "
                    "grow; retry once its operator has freed space",
                ),
                status_code=507,
            )
        return JSONResponse(
            error_body(
                "storage_unavailable",
                "the server's database is unavailable right now; retry shortly",
            ),
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(
            error_body("internal_error", "the server hit an unexpected error; see its log"),
            status_code=500,
        )

    for router in (
        operations.router,
        files.router,
        jobs.defaults_router,
        jobs.router,
        models.router,
        completions.router,
    ):
        app.include_router(router)
    console.mount(app)
    # The last added runs first: metrics see every answer, the guard's 401s and 413s included.
    app.add_middleware(RequestGuard)
    app.add_middleware(RequestMetrics, metrics=s.metrics)
    return app
