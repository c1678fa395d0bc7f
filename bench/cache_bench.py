"""Benchmark of the caching and read paths (the Ray-worker issue's figures).

- write overhead: examples/s of the full caching path (tokenize, forward, strip padding, encode,
  compress, write, commit) divided by examples/s of the bare backbone forward (tokenize + forward)
  on the same length-sorted batches;
- scaling: examples/s of the caching path with 1 in-process worker and with N Ray actors, timed
  after the actors have loaded the backbone;
- read path: one training epoch of the side network from the store divided by the same epoch from
  batches already in memory.

Run: python bench/cache_bench.py --limit 2000 --json bench/results/cache.json
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from backbone_worker.backbone import load_backbone
from backbone_worker.cache import (
    CacheOptions,
    encode_part,
    make_plan,
    part_examples,
    store_settings,
    write_importance,
)
from backbone_worker.data import load_dataset
from backbone_worker.pool import PartWorker, RayPool, actor_asks
from cache_store import ActivationStore

log = logging.getLogger("bench.cache")


def bare_forward(backbone, dataset, plan, opts) -> float:
    """Examples/s of tokenize + forward on the batches the caching path uses."""
    n, start = 0, time.perf_counter()
    with torch.inference_mode():
        for part in plan:
            examples = sorted(part_examples(dataset, part), key=lambda e: len(e.text))
            for k in range(0, len(examples), opts.batch_size):
                batch = examples[k : k + opts.batch_size]
                backbone.run(backbone.tokenize([e.text for e in batch], None, opts.max_length))
                n += len(batch)
    return n / (time.perf_counter() - start)


def caching_path(worker: PartWorker, plan) -> float:
    n, start = 0, time.perf_counter()
    worker.run_local(plan, lambda stats: None)
    n = sum(p["n"] for p in plan)
    return n / (time.perf_counter() - start)


def ray_caching(workers: int, args_tuple, plan) -> float:
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = RayPool(workers, actor_asks(workers, 0.0), args_tuple, threads=threads)
    try:
        pool.ray.get([a.ready.remote() for a in pool.actors])  # backbone loaded everywhere
        start = time.perf_counter()
        pool.run(plan, lambda stats: None)
        return sum(p["n"] for p in plan) / (time.perf_counter() - start)
    finally:
        pool.shutdown()


def epoch_seconds(net, batches, device: str = "cpu") -> float:
    from side_trainer.train import to_device

    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    start = time.perf_counter()
    for batch in batches:
        batch = to_device(batch, device)
        loss = net.loss(batch, net(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    from bench.compare import script_parser

    parser = script_parser(__doc__, limit=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="bench/results/cache.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    try:
        dataset = load_dataset(args.data, limit=args.limit)
        opts = CacheOptions(device="cpu")
        backbone = load_backbone(args.backbone)
        layers = backbone.family.default_layers(backbone.config)
        plan = make_plan(dataset, opts.part_size)
        settings = store_settings(backbone, dataset, layers, opts)
        results: dict = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
            },
            "backbone": args.backbone,
            "examples": len(dataset.examples),
        }
        # Warm-up: one part through both paths, so neither pays first-call costs in the timing.
        bare_forward(backbone, dataset, plan[:1], opts)
        bare = bare_forward(backbone, dataset, plan, opts)
        store_url = str(root / "store-1")
        ActivationStore.create_or_open(store_url, settings, plan)
        worker = PartWorker(backbone, dataset, store_url, settings, plan, opts)
        encode_part(backbone, part_examples(dataset, plan[0]), layers, dataset.labels, opts)
        full = caching_path(worker, plan)
        results["write"] = {
            "bare_forward_examples_per_s": round(bare, 1),
            "caching_examples_per_s": round(full, 1),
            "write_overhead_ratio": round(full / bare, 3),
        }
        log.info("write path: %s", results["write"])

        store_n = str(root / f"store-{args.workers}")
        ActivationStore.create_or_open(store_n, settings, plan)
        scaled = ray_caching(
            args.workers, (args.backbone, dataset, store_n, settings, plan, opts), plan
        )
        results["scaling"] = {
            "workers_1_examples_per_s": round(full, 1),
            f"workers_{args.workers}_examples_per_s": round(scaled, 1),
            "speedup": round(scaled / full, 3),
        }
        log.info("scaling: %s", results["scaling"])

        write_importance(store_url, backbone, dataset, layers, opts)
        from bench.methods import read_timings

        memory_s, store_s = read_timings(ActivationStore.open(store_url), 32)
        results["read"] = {
            "epoch_from_memory_s": round(memory_s, 2),
            "epoch_from_store_s": round(store_s, 2),
            "read_vs_memory": round(store_s / memory_s, 3),
        }
        log.info("read path: %s", results["read"])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
