"""One `ladder finetune`, then `ladder evaluate` of its model on the whole test split, and
`ladder cache-info` of its store: the README's fine-tuning tables, written as JSON.

    python -m bench.finetune_check --backbone minilm --limit 3000 \
        --json bench/results/minilm_finetune.json
    python -m bench.finetune_check --backbone minilm --limit 3000 --cache-flags="--width full" \
        --json bench/results/minilm_finetune_full_width.json

`--seeds 3` also trains the store's model with training seeds 1 and 2 and evaluates each.

Each command runs in its own process; the wall times are those processes' (backbone load,
caching and Fisher importance included).
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.compare import _python, machine, script_parser


def main() -> None:
    parser = script_parser(__doc__, limit=3000, epochs=3)
    parser.add_argument(
        "--cache-flags", default="", help='extra `ladder finetune` flags, e.g. "--width full"'
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="also train the store's model with training seeds 1 .. N-1 (`ladder train "
        "--train-seed k`, the finetune's epochs) and evaluate each: the test accuracy's spread",
    )
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ladder-finetune-check-"))
    store, model = workdir / "store", workdir / "model"
    finetune = (
        f"finetune --backbone {args.backbone} --data {args.data} --limit {args.limit} "
        f"--epochs {args.epochs} {args.cache_flags} --store STORE --out MODEL --json"
    )
    evaluate = f"evaluate --model MODEL --data {args.data} --json"
    run = {"commands": [], "machine": machine(), "seconds": {}}
    try:
        for name, command in (("finetune", finetune), ("evaluate", evaluate)):
            argv = [
                {"STORE": str(store), "MODEL": str(model)}.get(a, a) for a in shlex.split(command)
            ]
            start = time.perf_counter()
            run[name] = _python(["-m", "api.cli", *argv], timeout=7200)
            run["seconds"][name] = round(time.perf_counter() - start, 1)
            run["commands"].append("ladder " + " ".join(command.split()))
        info = _python(["-m", "api.cli", "cache-info", "--store", str(store), "--json"], 600)
        run["store"] = {
            k: info[k]
            for k in (
                "bytes_per_example",
                "stored_bytes",
                "n_examples",
                "dtype",
                "stored_width",
                "full_width_ratio",
                "layers",
            )
        }
        for key in ("store", "model_dir"):
            run["finetune"].pop(key, None)
        if args.seeds > 1:
            run["seeds"] = seed_spread(args, store, workdir, run["evaluate"]["accuracy"])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    Path(args.json).write_text(json.dumps(run, indent=2) + "\n")
    print(json.dumps({k: run[k] for k in ("store", "evaluate", "seconds")}))


def seed_spread(args, store: Path, workdir: Path, first: float) -> dict:
    """Whole-test accuracy of the store's model trained with seeds 0 (the finetune's) .. N-1."""
    accuracies = [first]
    for seed in range(1, args.seeds):
        model = workdir / f"model-{seed}"
        _python(
            ["-m", "api.cli", "train", "--store", str(store), "--out", str(model), "--epochs",
             str(args.epochs), "--train-seed", str(seed), "--json"],
            timeout=7200,
        )  # fmt: skip
        evaluated = _python(
            ["-m", "api.cli", "evaluate", "--model", str(model), "--data", args.data, "--json"],
            timeout=7200,
        )
        accuracies.append(evaluated["accuracy"])
    return {
        "command": "ladder train --store STORE --out MODEL-k --epochs "
        f"{args.epochs} --train-seed k, then ladder evaluate (k = 1 .. {args.seeds - 1})",
        "test_accuracy_per_seed": accuracies,
        "mean": statistics.mean(accuracies),
        "sd": statistics.stdev(accuracies),
    }


if __name__ == "__main__":
    main()
