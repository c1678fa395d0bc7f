"""Does the reader's bounded shuffle cost accuracy? LST trained from one store with the reader's
shuffle budget (`ladder train --shuffle-mb`, its default unless --budget-mb) and with a budget that
holds the whole store (a full shuffle), for a few training seeds each: best validation accuracy
per run.

    python -m bench.shuffle_check --store STORE --json bench/results/shuffle.json

Use a store several times larger than the budget (an fp16 full-width store of a few thousand
examples), or both budgets hold everything and the comparison says nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from bench.compare import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument(
        "--budget-mb",
        default=None,
        help="the reader's budget(s) to check, comma-separated (default: `ladder train`'s "
        "--shuffle-mb default)",
    )
    parser.add_argument("--json", default="bench/results/shuffle.json")
    args = parser.parse_args()

    from cache_store import ActivationStore
    from side_trainer.options import TrainOptions
    from side_trainer.train import train

    info = ActivationStore.open(args.store).info()
    report = {
        "store": {k: info[k] for k in ("n_examples", "stored_bytes", "dtype", "stored_width")},
        "epochs": args.epochs,
        "machine": machine(),
        "budgets": {},
    }
    budgets = (
        [float(b) for b in args.budget_mb.split(",")]
        if args.budget_mb
        else [TrainOptions.shuffle_mb]
    )
    arms = [(f"reader {b:g} MB" if len(budgets) > 1 else "reader", b) for b in budgets]
    for name, budget_mb in (*arms, ("whole store", 4 * info["stored_bytes"] / 2**20)):
        runs = []
        for seed in map(int, args.seeds.split(",")):
            opts = TrainOptions(epochs=args.epochs, seed=seed, shuffle_mb=budget_mb)
            with tempfile.TemporaryDirectory() as out:
                result = train(args.store, out, opts)
            runs.append(result["best_val_accuracy"])
        report["budgets"][name] = {
            "shuffle_mb": round(budget_mb, 1),
            "best_val_accuracy_per_seed": runs,
            "mean": float(np.mean(runs)),
            "sd": float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
        }
        print(name, report["budgets"][name], flush=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
