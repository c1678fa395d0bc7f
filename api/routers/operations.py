"""Liveness, readiness, service information and Prometheus metrics."""

from __future__ import annotations

import os
import shutil

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from api.db import ACTIVE, TERMINAL
from api.disk import min_free_bytes
from api.errors import error_body
from api.schemas import ErrorResponse
from api.state import Services, services

router = APIRouter()


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
def ready(s: Services = Depends(services)):
    """Ready to take work: a backbone is loaded and LADDER_HOME has room (LADDER_MIN_FREE_MB,
    default 100) for uploads, stores and models."""
    if not s.ready:
        return JSONResponse(error_body("not_ready", "no backbone is loaded yet"), status_code=503)
    free_mb = shutil.disk_usage(s.home).free / 2**20
    floor = min_free_bytes() / 2**20
    if free_mb < floor:
        return JSONResponse(
            error_body(
                "disk_full",
                f"the server's disk has {free_mb:.0f} MB free, under the {floor:.0f} MB it needs",
            ),
            status_code=503,
        )
    return {"status": "ready", "backbones": sorted(s.registry.backbones)}


@router.get("/info")
def info(s: Services = Depends(services)) -> dict:
    import torch

    return {
        "version": "0.1.0",
        "executor": s.executor,
        "home": str(s.home),
        "ray_address": os.environ.get("RAY_ADDRESS"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "backbones_loaded": sorted(s.registry.backbones),
        "side_models_loaded": sorted(s.registry.sides),
        "auth": bool(os.environ.get("LADDER_API_KEY")),
        "database_recovered_from": s.recovered_from,
    }


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(s: Services = Depends(services)) -> PlainTextResponse:
    metrics = s.metrics
    metrics.queue_depth.set(s.batcher.depth())
    metrics.generations.set(s.generator.depth())
    held = s.registry.held()
    metrics.side_models.set(held["models"])
    metrics.side_bytes.set(held["bytes"])
    metrics.side_loads.set(held["loads"])
    counts = s.db.count_jobs_by_status()
    for status in ACTIVE + TERMINAL:
        metrics.jobs.labels(status).set(counts.get(status, 0))
    return PlainTextResponse(
        generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4"
    )
