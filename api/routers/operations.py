"""Liveness, readiness, service information and Prometheus metrics."""
from __future__ import annotations

import os

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from api.db import ACTIVE, TERMINAL
from api.errors import error_body
from api.schemas import ErrorResponse
from api.state import Services, services

router = APIRouter()


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"model": ErrorResponse}})
def ready(s: Services = Depends(services)):
    if not s.ready:
        return JSONResponse(error_body("not_ready", "no backbone is loaded yet"), status_code=503)
    return {"status": "ready", "backbones": sorted(s.registry.backbones)}


@router.get("/info")
def info(s: Services = Depends(services)) -> dict:
    import torch
    return {"version": "0.1.0", "executor": s.executor, "home": str(s.home),
            "ray_address": os.environ.get("RAY_ADDRESS"),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "backbones_loaded": sorted(s.registry.backbones),
            "side_models_loaded": sorted(s.registry.sides),
            "auth": bool(os.environ.get("LADDER_API_KEY"))}


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(s: Services = Depends(services)) -> PlainTextResponse:
    metrics = s.metrics
    metrics.queue_depth.set(s.batcher.depth())
    counts = s.db.count_jobs_by_status()
    for status in ACTIVE + TERMINAL:
        metrics.jobs.labels(status).set(counts.get(status, 0))
    return PlainTextResponse(generate_latest(metrics.registry).decode(),
                             media_type="text/plain; version=0.0.4")
