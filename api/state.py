"""What the routes share: the database, loaded models, the micro-batcher, the job runner, the
metrics. Built once per app in its lifespan; routes get it with `Depends(services)`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from api.db import Database
from api.gen_service import GenerationService
from api.jobs import JobRunner
from api.serving import MicroBatcher, ModelRegistry


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ladder_requests",
            "HTTP requests",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ladder_request_seconds", "HTTP request latency", ["route"], registry=self.registry
        )
        self.batch_size = Histogram(
            "ladder_predict_batch_texts",
            "texts per backbone pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "ladder_predict_batch_requests",
            "requests grouped into one backbone pass",
            buckets=(1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "ladder_predict_queue_depth", "requests waiting for a pass", registry=self.registry
        )
        self.generations = Gauge(
            "ladder_generations_in_flight",
            "chat and completion requests queued or decoding",
            registry=self.registry,
        )
        self.jobs = Gauge(
            "ladder_jobs", "fine-tuning jobs by status", ["status"], registry=self.registry
        )
        self.side_models = Gauge(
            "ladder_side_models_loaded", "side models held in memory", registry=self.registry
        )
        self.side_bytes = Gauge(
            "ladder_side_models_bytes",
            "bytes of the side models held (bounded by LADDER_MAX_SIDE_MODEL_MB)",
            registry=self.registry,
        )
        self.side_loads = Gauge(
            "ladder_side_model_loads",
            "side models loaded from disk since start (an evicted model loads again)",
            registry=self.registry,
        )


@dataclass
class Services:
    home: Path
    executor: str
    metrics: Metrics
    db: Database | None = None
    registry: ModelRegistry | None = None
    batcher: MicroBatcher | None = None
    generator: GenerationService | None = None
    runner: JobRunner | None = None
    ready: bool = False
    streams: int = 0  # event streams open now (capped by LADDER_MAX_EVENT_STREAMS)
    recovered_from: str | None = None  # where a damaged database was moved at start


def services(request: Request) -> Services:
    return request.app.state.ladder
