"""Serving many side models, measured against a real `ladder serve` process on loopback.

1. Many models, bounded memory: 200 side models of one backbone registered, the side-model
   cache bounded to hold 20 (LADDER_MAX_SIDE_MODEL_MB); every model is asked twice in a
   shuffled order by 8 concurrent clients. Reports whether every request answered, the
   server's resident memory (sampled from /proc every 20 ms) above its level once the backbone
   and one side model had served a request, the bytes of side models held (the service's
   /metrics) and how many loads the evictions caused.
2. Latency under load, in the style of S-LoRA / Punica: N in {1, 8, 64} side models, every
   request naming the same model, a uniformly random one, or a Zipf(1)-skewed one; requests of
   one tweet arriving as a Poisson process at a few rates; p50 / p95 latency and throughput.

Side networks are freshly initialised at the real shapes (the default ladder layers, r=8):
latency and memory do not depend on trained weights.

    python -m bench.serve_many --json bench/results/serve_many.json
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.compare import machine, script_parser
from side_trainer.memory import allocator

ROOT = Path(__file__).parents[1]
MIB = 2**20


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / MIB


class RssSampler:
    def __init__(self, pid: int, interval_s: float = 0.02):
        self.pid, self.interval_s, self.peak = pid, interval_s, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self.peak = rss_mb(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def register_models(home: Path, backbone_name: str, n: int) -> tuple[list[str], int]:
    """n fresh side models saved and registered; returns their ids and one model's bytes as the
    server counts them."""
    import torch

    from api.db import Database
    from backbone_worker.backbone import load_backbone
    from bench.serve_bench import side_network
    from side_trainer.artifacts import load_side_model, save_side_model
    from side_trainer.memory import module_bytes

    backbone = load_backbone(backbone_name)
    db = Database(home / "ladder.db")
    ids = []
    for k in range(n):
        torch.manual_seed(k)
        # Full width, as in the committed results (a default-tier model also carries its
        # store's width maps: ~0.37 MB more for MiniLM).
        side = side_network(backbone, ["negative", "positive"], width="full")
        path = home / "models" / f"m{k}"
        save_side_model(side, path)
        db.add_model(f"ft:m{k}", backbone_name, str(path), f"bench-{k}")
        ids.append(f"ft:m{k}")
    # What the server's cache counts for a model: its weights and its Python objects.
    return ids, module_bytes(load_side_model(path))


def start_server(home: Path, backbone_name: str, env_extra: dict) -> tuple:
    import os

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "LADDER_HOME": str(home),
        "LADDER_EXECUTOR": "thread",
        "LADDER_PRELOAD": backbone_name,
        **env_extra,
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "api.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    for _ in range(1500):
        try:
            if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise RuntimeError("ladder serve exited before it was ready")
        time.sleep(0.2)
    server.terminate()
    raise RuntimeError("ladder serve was not ready within 5 minutes")


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


async def ask_all(base: str, models: list[str], texts: list[str], clients: int) -> list[int]:
    """Each model once, shared out among concurrent clients; the status codes."""
    todo = list(models)
    statuses: list[int] = []

    async with httpx.AsyncClient(base_url=base, timeout=300) as http:

        async def client() -> None:
            while todo:
                model = todo.pop()
                r = await http.post("/v1/predict", json={"model": model, "inputs": texts})
                statuses.append(r.status_code)

        await asyncio.gather(*(client() for _ in range(clients)))
    return statuses


def many_models(
    backbone_name: str,
    n_models: int,
    budget_models: int,
    texts: list[str],
    server_env: dict | None = None,
) -> dict:
    home = Path(tempfile.mkdtemp(prefix="ladder-serve-many-"))
    ids, model_bytes = register_models(home, backbone_name, n_models)
    budget_mb = budget_models * model_bytes / MIB * 1.02  # room for 20, not 21
    server, base = start_server(
        home, backbone_name, {"LADDER_MAX_SIDE_MODEL_MB": str(budget_mb), **(server_env or {})}
    )
    try:
        asyncio.run(ask_all(base, ids[:1], texts, 1))  # backbone and one side model warm
        baseline = rss_mb(server.pid)
        # The backbone's working memory at the run's pass size (8 clients' texts in one pass),
        # with one side model: what serving costs before any more side models are held. Its
        # peak counts the pass's activations, which a pass frees (the level after it does not
        # show them). Sampled every 2 ms, as the run is: activations live for milliseconds, and
        # a coarser sampler would catch the run's many passes at their peak more often than the
        # warm-up's few.
        with RssSampler(server.pid, 0.002) as warm:
            for _ in range(10):
                asyncio.run(ask_all(base, ids[:1] * 8, texts, 8))
        shaped = rss_mb(server.pid)
        held_bytes = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(0.25):
                held_bytes.append(metric(base, "ladder_side_models_bytes"))

        watcher = threading.Thread(target=watch, daemon=True)
        order = ids * 2
        random.Random(0).shuffle(order)
        with RssSampler(server.pid, 0.002) as rss:
            watcher.start()
            started = time.perf_counter()
            statuses = asyncio.run(ask_all(base, order, texts, 8))
            seconds = time.perf_counter() - started
            stop.set()
            watcher.join()
        settled = rss_mb(server.pid)  # what stays: the cache full, no pass running
        return {
            "server_allocator": allocator(server.pid),
            "models_registered": n_models,
            "budget_models": budget_models,
            "model_bytes": model_bytes,
            "budget_mb": round(budget_mb, 2),
            "requests": len(order),
            "answered_200": sum(s == 200 for s in statuses),
            "every_model_answered": all(s == 200 for s in statuses) and len(statuses) == len(order),
            "seconds": round(seconds, 1),
            "rss_after_warmup_mb": round(baseline, 1),
            "rss_peak_mb": round(rss.peak, 1),
            "rss_peak_above_warmup_mb": round(rss.peak - baseline, 1),
            "rss_end_above_warmup_mb": round(settled - baseline, 1),
            "rss_after_shaped_warmup_mb": round(shaped, 1),
            "rss_peak_above_shaped_warmup_mb": round(rss.peak - shaped, 1),
            "rss_end_above_shaped_warmup_mb": round(settled - shaped, 1),
            "rss_shaped_warmup_peak_mb": round(warm.peak, 1),
            # Side models and all they bring, beyond the backbone serving the same passes: what
            # LADDER_MAX_SIDE_MODEL_MB should bound.
            "rss_peak_above_warmup_peak_mb": round(rss.peak - warm.peak, 1),
            "side_bytes_held_max_mb": round(max(held_bytes, default=0) / MIB, 2),
            "side_models_held_end": metric(base, "ladder_side_models_loaded"),
            "side_model_loads": metric(base, "ladder_side_model_loads"),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


async def poisson_run(
    base: str, models: list[str], pick, texts: list[str], rate: float, seconds: float, seed: int
) -> dict:
    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0

    async with httpx.AsyncClient(base_url=base, timeout=300) as http:

        async def one(model: str, text: str) -> None:
            nonlocal errors
            start = time.perf_counter()
            r = await http.post("/v1/predict", json={"model": model, "inputs": [text]})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

        tasks = []
        begin = time.perf_counter()
        at = 0.0
        while at < seconds:
            delay = begin + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(pick(rng), rng.choice(texts))))
            at += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - begin
    ms = sorted(1000 * x for x in latencies)
    if not ms:
        raise RuntimeError(f"no request succeeded at {rate}/s ({errors} errors)")
    q = statistics.quantiles(ms, n=100) if len(ms) > 1 else ms * 99
    return {
        "rate": rate,
        "requests": len(tasks),
        "errors": errors,
        "p50_ms": round(statistics.median(ms), 1),
        "p95_ms": round(q[94], 1),
        "throughput_per_s": round(len(ms) / elapsed, 2),
    }


def pickers(models: list[str]) -> dict:
    n = len(models)
    weights = np.array([1 / (k + 1) for k in range(n)])
    cumulative = np.cumsum(weights / weights.sum())
    out = {"same": lambda rng: models[0]}
    if n > 1:
        out["uniform"] = lambda rng: models[rng.randrange(n)]
        out["zipf"] = lambda rng: models[min(int(np.searchsorted(cumulative, rng.random())), n - 1)]
    return out


def latency_under_load(
    backbone_name: str, sizes: list[int], rates: list[float], seconds: float, texts: list[str]
) -> list[dict]:
    home = Path(tempfile.mkdtemp(prefix="ladder-serve-load-"))
    ids, _ = register_models(home, backbone_name, max(sizes))
    server, base = start_server(home, backbone_name, {})
    rows = []
    server_allocator = allocator(server.pid)
    try:
        asyncio.run(ask_all(base, ids, texts[:1], 4))  # every model loaded once
        for n in sizes:
            for pattern, pick in pickers(ids[:n]).items():
                for k, rate in enumerate(rates):
                    loads = metric(base, "ladder_side_model_loads")
                    # One arrival sequence per rate, whatever the models and their popularity.
                    row = asyncio.run(
                        poisson_run(base, ids[:n], pick, texts, rate, seconds, seed=k)
                    )
                    row = {
                        "server_allocator": server_allocator,
                        "models": n,
                        "popularity": pattern,
                        **row,
                        # Loads from disk during the run (0: every model stayed in memory).
                        "side_model_loads": metric(base, "ladder_side_model_loads") - loads,
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    keys = sorted({(r["models"], r["popularity"]) for r in rows})
    for n, pattern in keys:
        line = [r for r in rows if (r["models"], r["popularity"]) == (n, pattern)]
        label = f"{n} model{'s' if n > 1 else ''}, {pattern}"
        axes[0].plot([r["rate"] for r in line], [r["p95_ms"] for r in line], "o-", label=label)
        axes[1].plot(
            [r["rate"] for r in line], [r["throughput_per_s"] for r in line], "o-", label=label
        )
    axes[0].set(xlabel="arrival rate (requests/s)", ylabel="p95 latency (ms)", yscale="log")
    axes[1].set(xlabel="arrival rate (requests/s)", ylabel="throughput (requests/s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("ladder serve: one-tweet requests, Poisson arrivals")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--budget-models", type=int, default=20)
    parser.add_argument("--sizes", default="1,8,64")
    parser.add_argument("--rates", default="4,16")
    parser.add_argument("--seconds", type=float, default=12)
    parser.add_argument(
        "--no-latency", action="store_true", help="only the many-models memory check"
    )
    parser.add_argument(
        "--server-allocator",
        choices=("auto", "jemalloc", "system"),
        default="auto",
        help="LADDER_ALLOCATOR of the measured server (auto: its default, the system's malloc)",
    )
    parser.add_argument("--json", default="bench/results/serve_many.json")
    args = parser.parse_args()
    from backbone_worker.data import load_dataset

    texts = [e.text for e in load_dataset(args.data, limit=256).examples]
    report = {
        "backbone": args.backbone,
        "machine": machine(),
        "many_models": many_models(
            args.backbone,
            args.models,
            args.budget_models,
            texts[:2],
            {"LADDER_ALLOCATOR": args.server_allocator},
        ),
    }
    print(json.dumps(report["many_models"]), flush=True)
    report["latency"] = (
        []
        if args.no_latency
        else latency_under_load(
            args.backbone,
            [int(x) for x in args.sizes.split(",")],
            [float(x) for x in args.rates.split(",")],
            args.seconds,
            texts,
        )
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    if report["latency"]:
        plot(report["latency"], out.with_suffix(".png"))


if __name__ == "__main__":
    main()
