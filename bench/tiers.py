"""Store tiers, measured: what a store of each precision, stored width and kept layers costs
(bytes per example, caching examples/s, epoch seconds from the store, training peak memory) and
what it gives (accuracy), under one protocol for every tier:

- one split seed; train and validation rows from the --limit sample;
- each tier's store is cached in full (the Fisher importance, which depends on the backbone and
  data only, is computed once and shared, so caching rates compare the tiers' own work);
- LST trains at each rate of the family's grid with seed 0, the rate with the best validation
  accuracy is kept, then seeds 1 and 2 train at that rate (every run in its own process); with
  `--recipe default`, every seed trains with `ladder train`'s own defaults instead (the family's
  rate, 10 epochs with early stopping, the collapse retries): what a user gets;
- every model is scored on the whole data's validation split and its whole test split through
  the live backbone, all models of a backbone in one backbone pass per split. The default tier
  is chosen on the validation split; the test split is reported, never used to choose.

    python -m bench.tiers --backbone minilm --limit 3000 --json bench/results/tiers_minilm.json

The default tier is the smallest whose validation accuracy (mean of 3 seeds, default recipe) is
within 0.3 points of fp16 at full width on every backbone (`choose`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.compare import _python, machine, script_parser

log = logging.getLogger("ladder.tiers")
ROOT = Path(__file__).parents[1]


def tiers_for(family: str, layers: list[int]) -> dict[str, dict]:
    """Tier name -> ladder cache options (every option given: the defaults are one of these).
    `layers`: the family's ladder layers."""
    halves = {"every-second-layer": layers[1::2], "top-half-layers": layers[len(layers) // 2 :]}
    tiers = {
        "fp16": {"dtype": "fp16", "width": "full"},
        "bf16": {"dtype": "bf16", "width": "full"},
        "int8": {"dtype": "int8", "width": "full"},
        "fp16-pca-d/2": {"dtype": "fp16", "width": "d/2"},
        "fp16-pca-d/4": {"dtype": "fp16", "width": "d/4"},
        "fp16-pool-d/4": {"dtype": "fp16", "width": "d/4", "projection": "pool"},
        "fp16-pca-d/8": {"dtype": "fp16", "width": "d/8"},
        "int8-pca-d/4": {"dtype": "int8", "width": "d/4"},
        "int8-pca-d/8": {"dtype": "int8", "width": "d/8"},
        "fp16-every-second-layer": {"dtype": "fp16", "width": "full"},
        "fp16-top-half-layers": {"dtype": "fp16", "width": "full"},
        "int8-pca-d/4-every-second-layer": {"dtype": "int8", "width": "d/4"},
        "int8-pca-d/4-top-half-layers": {"dtype": "int8", "width": "d/4"},
    }
    for name, options in tiers.items():
        options["layers"] = next((v for k, v in halves.items() if name.endswith(k)), layers)
    return tiers


GRIDS = {"encoder": (1e-3, 3e-3), "decoder": (5e-4, 1e-3), "encoder-decoder": (1e-3, 3e-3)}
SEEDS = (0, 1, 2)


def run(
    backbone: str,
    data: str,
    limit: int,
    epochs: int | None,
    out: Path,
    only: list[str] | None,
    workdir: Path,
    recipe: str = "grid",
) -> dict:
    from backbone_worker.backbone import load_backbone
    from backbone_worker.cache import CacheOptions, write_importance
    from backbone_worker.data import load_dataset

    started = time.perf_counter()
    model = load_backbone(backbone)
    # Tiers choose among the family's ladder layers (every layer of an encoder, every third of a
    # decoder-only model); the default keeps the top half of them.
    family, ladder_layers = model.family.name, model.family.ladder_layers(model.config)
    dataset = load_dataset(data, limit=limit)
    shared = workdir / "importance"
    shared.mkdir(parents=True)
    write_importance(str(shared), model, dataset, ladder_layers, CacheOptions())
    del model
    tiers = {k: v for k, v in tiers_for(family, ladder_layers).items() if not only or k in only}
    report = {
        "tiers": {},
        **(json.loads(out.read_text()) if only and out.exists() else {}),
        "backbone": backbone,
        "data": data,
        "limit": limit,
        "epochs": epochs,
        "family": family,
        "recipe": recipe,
        "lr_grid": list(GRIDS[family]) if recipe == "grid" else None,
        "seeds": list(SEEDS),
        "machine": machine(),
    }
    models = []
    for name, options in tiers.items():
        store = workdir / name.replace("/", "_")
        args = [
            "cache",
            "--backbone",
            backbone,
            "--data",
            data,
            "--limit",
            str(limit),
            "--store",
            str(store),
            "--importance",
            str(shared / "importance.safetensors"),
            "--json",
        ]
        for key, value in options.items():
            args += [f"--{key}", ",".join(map(str, value)) if key == "layers" else str(value)]
        start = time.perf_counter()
        info = _python(["-m", "api.cli", *args], timeout=7200)
        caching_s = time.perf_counter() - start
        runs = {}
        grid = GRIDS[family] if recipe == "grid" else (None,)  # None: the family's default
        for lr in grid:
            runs[lr, 0] = _train(store, workdir, name, lr, 0, epochs)
        lr = max(grid, key=lambda r: runs[r, 0]["best_val_accuracy"])
        for seed in SEEDS[1:]:
            runs[lr, seed] = _train(store, workdir, name, lr, seed, epochs)
        chosen = [runs[lr, seed] for seed in SEEDS]
        models += [(name, seed, r["model_dir"]) for seed, r in zip(SEEDS, chosen)]
        report["tiers"][name] = {
            "options": options,
            "bytes_per_example": info["bytes_per_example"],
            "stored_width": info["stored_width"],
            "dtype": info["dtype"],
            "layers": info["layers"],
            "full_width_ratio": info["full_width_ratio"],
            "stored_mb": round(info["stored_bytes"] / 2**20, 1),
            # Wall clock of `ladder cache` (process start, backbone load, width fit, all parts;
            # the shared Fisher importance was already in place).
            "caching_examples_per_s": round(info["n_examples"] / caching_s, 1),
            "lr": lr if lr is not None else chosen[0]["options"]["lr"],
            "grid_val_accuracy": {str(r): runs[r, 0]["best_val_accuracy"] for r in grid},
            # Attempts a collapse retry added (0 everywhere: no run collapsed).
            "retries": [len(r["attempts"] or [None]) - 1 for r in chosen],
            "epochs_run": [r["epochs_run"] for r in chosen],
            "epoch_seconds_from_store": round(
                float(np.mean([r["n_train"] / r["train_examples_per_s"] for r in chosen])), 2
            ),
            "train_peak_mem_mb": round(float(np.mean([r["train_peak_mem_mb"] for r in chosen])), 1),
        }
        log.info("%s: %s", name, report["tiers"][name])
    scores = _python(
        [
            "-m",
            "bench.tiers",
            "--score",
            json.dumps({"data": data, "models": [m[2] for m in models]}),
        ],
        timeout=7200,
    )
    for k, (name, _seed, _) in enumerate(models):
        tier = report["tiers"][name]
        for split, key in (("val", "validation"), ("test", "test")):
            for figure in ("accuracy", "macro_f1"):
                values = tier.setdefault(f"{split}_{figure}_per_seed", [])
                values.append(scores[key][k][figure])
    for tier in (report["tiers"][name] for name in tiers):  # those measured now
        for split in ("val", "test"):
            for figure in ("accuracy", "macro_f1"):
                values = tier[f"{split}_{figure}_per_seed"][-len(SEEDS) :]
                tier[f"{split}_{figure}_per_seed"] = values
                tier[f"{split}_{figure}"] = float(np.mean(values))
                tier[f"{split}_{figure}_sd"] = float(np.std(values, ddof=1))
    report["n_validation"], report["n_test"] = scores["n_validation"], scores["n_test"]
    report["seconds"] = round(time.perf_counter() - started, 1) + (
        report.get("seconds", 0) if only else 0
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


WITHIN = 0.003  # the default tier's allowance below fp16 at full width: 0.3 points


def choose(reports: list[dict], figure: str = "val_accuracy") -> dict:
    """The default tier: of the tiers measured on every backbone (`reports`, default recipe),
    the smallest (mean share of fp16's bytes over the backbones) whose `figure` (mean of the
    seeds) is within WITHIN of fp16 at full width on every backbone. Chosen on validation;
    `figure="test_accuracy"` applies the same rule to the test split, to report, never to
    choose."""
    names = set.intersection(*(set(r["tiers"]) for r in reports))
    rows = {}
    for name in names:
        gaps = {
            r["backbone"]: r["tiers"][name][figure] - r["tiers"]["fp16"][figure] for r in reports
        }
        share = np.mean(
            [
                r["tiers"][name]["bytes_per_example"] / r["tiers"]["fp16"]["bytes_per_example"]
                for r in reports
            ]
        )
        rows[name] = {"gaps": gaps, "share_of_fp16": float(share)}
    passing = [n for n, row in rows.items() if all(g >= -WITHIN for g in row["gaps"].values())]
    return {
        "figure": figure,
        "tier": min(passing, key=lambda n: rows[n]["share_of_fp16"]),
        "tiers": dict(sorted(rows.items(), key=lambda kv: kv[1]["share_of_fp16"])),
    }


def _train(
    store: Path, workdir: Path, tier: str, lr: float | None, seed: int, epochs: int | None
) -> dict:
    """One `ladder train` in a process of its own; None: that option's default."""
    out = workdir / "models" / f"{tier.replace('/', '_')}-{lr or 'default'}-{seed}"
    args = ["-m", "api.cli", "train", "--store", str(store), "--out", str(out)]
    args += ["--epochs", str(epochs)] if epochs is not None else []
    args += ["--lr", str(lr)] if lr is not None else []
    return _python([*args, "--train-seed", str(seed), "--json"], timeout=7200)


def score(spec: dict) -> dict:
    """Every model's report (side_trainer.metrics) on the whole validation and test splits, all
    models in one backbone pass per split."""
    from api.inference import JointModel, evaluate
    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    from side_trainer.artifacts import load_side_model

    sides = [load_side_model(path) for path in spec["models"]]
    joint = JointModel(load_backbone(sides[0].cfg.backbone), sides)
    whole = load_dataset(spec["data"])
    out = {}
    for split, key in (("validation", "validation"), ("test", "test")):
        examples = whole.split(split)
        out[key] = [
            {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
            for r in evaluate(joint, examples)["reports"]
        ]
        out[f"n_{key}"] = len(examples)
    return out


def main() -> None:
    parser = script_parser(__doc__, limit=3000, epochs=3)
    parser.add_argument(
        "--tiers",
        default="",
        help="comma-separated subset of the tier names; their results are added to an existing "
        "--json file of the same backbone and data",
    )
    parser.add_argument("--json", default="bench/results/tiers.json")
    parser.add_argument(
        "--recipe",
        choices=("grid", "default"),
        default="grid",
        help="grid: each tier's rate chosen on validation from the family's grid (--epochs); "
        "default: ladder train's defaults for every seed (--epochs 0: its default too)",
    )
    parser.add_argument("--score", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.score:
        print(json.dumps(score(json.loads(args.score))))
        return
    workdir = Path(tempfile.mkdtemp(prefix="ladder-tiers-"))
    try:
        run(
            args.backbone,
            args.data,
            args.limit,
            args.epochs or None,
            Path(args.json),
            [t for t in args.tiers.split(",") if t],
            workdir,
            args.recipe,
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
