"""int8 and outlier tokens, measured: the per-token reconstruction error of each stored state of a
backbone's real ladder states, at full width and through the default width map, with each
token's k largest channels kept apart (k = 0: one scale for the whole row, the store's scheme
before cache_store.codecs.INT8_OUTLIERS).

    python -m bench.int8_outliers --backbone smollm2 --json bench/results/int8_outliers.json

The error of a token is measured on its channels other than its largest: ||x' - x|| / ||x||
over those channels, so one huge channel cannot hide what happened to the rest (over the whole
row, an attention sink's error is ~0.05 whichever way the rest were flattened).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.compare import machine, script_parser

OUTLIERS = (0, 1, 2, 4)


def rest_error(x: np.ndarray, outliers: int) -> np.ndarray:
    """(T,) error of each token's channels other than its largest, int8 with `outliers` apart."""
    from cache_store.codecs import decode, encode

    got = decode(encode(x, "int8", outliers), "int8")
    rest = np.ones_like(x, dtype=bool)
    rest[np.arange(len(x)), np.abs(x).argmax(1)] = False
    diff = np.where(rest, got - x, 0.0)
    norm = np.linalg.norm(np.where(rest, x, 0.0), axis=1)
    return np.linalg.norm(diff, axis=1) / np.maximum(norm, 1e-12)


def measure(backbone_name: str, data: str, examples: int, max_length: int) -> dict:
    from backbone_worker.backbone import load_backbone
    from backbone_worker.cache import encode_part, kept_layers, projection_for
    from backbone_worker.data import load_dataset
    from backbone_worker.options import CacheOptions
    from cache_store import projection

    backbone = load_backbone(backbone_name, "cpu")
    dataset = load_dataset(data, limit=max(examples * 2, 100), seed=0)
    sample = dataset.split("train")[:examples]
    opts = CacheOptions(max_length=max_length)
    layers = kept_layers(backbone, None)
    spec = projection_for(backbone.hidden_size, backbone.family.name == "decoder", opts)
    arrays = encode_part(backbone, sample, layers, dataset.labels, opts)
    states = {}
    for stream, parts in arrays["streams"].items():
        for name, rows in parts["states"].items():
            x = np.concatenate(rows).astype(np.float32)
            widths = {"full": x}
            if spec is not None:
                widths[f"{spec.kind} {spec.width}"] = projection.apply(
                    spec, projection.fit(spec, x), x
                )
            for width, values in widths.items():
                ratio = np.abs(values).max(1) / np.median(np.abs(values), axis=1).clip(1e-12)
                entry = {
                    "tokens": len(values),
                    "abs_max": round(float(np.abs(values).max()), 1),
                    "max_over_median_per_token": {
                        "median": round(float(np.median(ratio)), 1),
                        "max": round(float(ratio.max()), 1),
                    },
                }
                for k in OUTLIERS:
                    err = rest_error(values, k)
                    entry[f"k{k}"] = {
                        "mean": round(float(err.mean()), 4),
                        "p99": round(float(np.quantile(err, 0.99)), 4),
                        "max": round(float(err.max()), 4),
                        "tokens_over_10pct": int((err > 0.1).sum()),
                    }
                states[f"{stream}/{name} {width}"] = entry
    return {"examples": len(sample), "layers": layers, "states": states}


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--json", default="bench/results/int8_outliers.json")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    started = time.perf_counter()
    report = {
        "backbone": args.backbone,
        "data": args.data,
        "max_length": args.max_length,
        **measure(args.backbone, args.data, args.examples, args.max_length),
        "machine": machine(),
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["command"] = (
        f"python -m bench.int8_outliers --backbone {args.backbone} --data {args.data} "
        f"--examples {args.examples} --json {args.json}"
    )
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
