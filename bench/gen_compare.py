"""`ladder bench --task generate`: generative fine-tuning on tasks generated here
(bench/gen_tasks.py), every method with its own settings chosen on validation.

Per task: the store is cached once (timed, in its own process); each method trains at every
point of its grid on seed 0 (its own epochs: cached epochs cost little, so LST may take more);
the grid point whose model has the highest validation exact match (greedy generation; a tie goes
to the lower validation loss) is chosen; seeds 1.. train at the chosen point; every seed's model
and the bare backbone (zero-shot) generate, greedily, for the whole file's test split. Then the
chosen cached LST model's generation speed against the bare backbone's (batch 1 and 8, KV
caches). Every step runs in its own fresh process (bench.gen_methods), as the classification
bench's do, and a `workdir` keeps finished steps for a resumed run.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.compare import machine, paired, speed_ratios, step
from bench.gen_tasks import write as write_task

log = logging.getLogger("ladder.bench")

MODULE = "bench.gen_methods"
GEN_METHODS = ("full", "lora", "lst_online", "lst_cached")
TASKS = ("arithmetic", "dates")
# Each method's grid (points of its settings) and epochs (its best epoch by validation loss).
GRIDS = {
    "full": [{"lr": 3e-5}, {"lr": 1e-4}],
    "lora": [{"lr": 1e-3}, {"lr": 3e-3}],
    "lst_online": [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}],
    # Cached epochs cost little, so LST's grid is wider: the side width too (d/r).
    "lst_cached": [{"lr": lr, "reduction": r} for r in (8, 4) for lr in (1e-3, 3e-3, 1e-2)],
}
EPOCHS = {"full": 2, "lora": 2, "lst_online": 2, "lst_cached": 6}


def run(
    backbone: str = "smollm2",
    tasks: tuple[str, ...] = TASKS,
    rows: int = 2000,
    limit: int = 800,
    seeds: int = 3,
    batch_size: int = 16,
    max_length: int = 96,
    methods: tuple[str, ...] = GEN_METHODS,
    epochs: dict | None = None,
    grids: dict | None = None,
    out: str = "bench/results/generate.json",
    workdir: str | None = None,
    timeout_s: float = 7200,
    new_tokens: int = 32,
) -> dict:
    """Runs the protocol on each task and writes the report (JSON, and Markdown beside it).
    `rows`: each generated file's rows (its test split is a tenth of them); `limit`: the rows
    training and validation draw from."""
    import torch

    started = time.perf_counter()
    keep = workdir is not None
    work = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="ladder-gen-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    epochs = {**EPOCHS, **(epochs or {})}
    grids = {**GRIDS, **(grids or {})}
    report = {
        "config": {
            "backbone": backbone,
            "tasks": list(tasks),
            "rows": rows,
            "limit": limit,
            "seeds": seeds,
            "batch_size": batch_size,
            "max_length": max_length,
            "epochs": {m: epochs[m] for m in methods},
            "grids": {m: grids[m] for m in methods},
            "lora_rank": 8,
            "new_tokens": new_tokens,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "machine": machine(),
        "tasks": {},
    }
    try:
        for task in tasks:
            data = write_task(task, work / f"{task}.jsonl", rows)
            cfg = {
                **{k: report["config"][k] for k in ("backbone", "limit", "batch_size")},
                **{k: report["config"][k] for k in ("max_length", "lora_rank", "device")},
                "new_tokens": new_tokens,
                "data": str(data),
                "split_seed": 0,
                "store": str(work / f"store-{task}"),
            }
            report["tasks"][task] = run_task(cfg, methods, grids, epochs, seeds, work, timeout_s)
            write_outputs(report, Path(out))  # each finished task on disk at once
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(report, Path(out))
    return report


def _train(cfg, method, point, seed, epochs, work, timeout_s) -> dict:
    name = "-".join([Path(cfg["data"]).stem, method, *(f"{k}{v:g}" for k, v in point.items())])
    path = str(work / f"{name}-s{seed}{'' if method.startswith('lst') else '.pt'}")
    train_cfg = {**cfg, **point, "method": method, "seed": seed, "epochs": epochs, "out": path}
    result = step("train", train_cfg, timeout_s, work, MODULE)
    log.info(
        "%s %s seed %d: valid loss %s, %.1f ex/s",
        method,
        point,
        seed,
        result["valid_loss_history"],
        result["examples_per_s"],
    )
    return {**result, "point": point, "seed": seed, "path": path}


def _evaluate(cfg, split: str, models: list[dict], work, timeout_s) -> dict:
    listed = [{k: m[k] for k in ("key", "method", "path")} for m in models]
    return step("evaluate", {**cfg, "split": split, "models": listed}, timeout_s, work, MODULE)


def run_task(cfg, methods, grids, epochs, n_seeds, work, timeout_s) -> dict:
    cache = step("cache", cfg, timeout_s, work, MODULE)
    log.info("cached %d examples in %.1fs", cache["n_examples"], cache["caching_seconds"])
    runs = {}
    for method in methods:
        grid = [_train(cfg, method, p, 0, epochs[method], work, timeout_s) for p in grids[method]]
        for k, r in enumerate(grid):
            r["key"], r["method"] = f"{method}/grid{k}", method
        valid = _evaluate(cfg, "validation", grid, work, timeout_s)["models"]
        for r in grid:
            r["valid_exact_match"] = valid[r["key"]]["exact_match"]
            # The same loss, computed again from the saved model as generation reads it: a
            # check that what was saved is what was trained (test_gen_bench.py).
            r["valid_loss_reloaded"] = valid[r["key"]]["loss"]
        chosen = max(grid, key=lambda r: (r["valid_exact_match"], -r["valid_loss"]))
        seeds = [chosen] + [
            _train(cfg, method, chosen["point"], s, epochs[method], work, timeout_s)
            for s in range(1, n_seeds)
        ]
        for r in seeds:
            r["key"], r["method"] = f"{method}/seed{r['seed']}", method
        runs[method] = {"grid": grid, "seeds": seeds, "chosen": chosen["point"]}
    zero = {"key": "zero_shot", "method": "zero_shot", "path": ""}
    tested = _evaluate(
        cfg, "test", [zero] + [r for m in runs.values() for r in m["seeds"]], work, timeout_s
    )
    scores = tested["models"]
    results = {"zero_shot": _zero_shot(scores["zero_shot"])}
    for method, m in runs.items():
        results[method] = _summary(method, m, scores, epochs[method], cache)
    correct = {
        method: np.array([scores[r["key"]]["correct"] for r in m["seeds"]])
        for method, m in runs.items()
    }
    correct["zero_shot"] = np.array([scores["zero_shot"]["correct"]])
    if "lora" in correct:
        for method in correct:
            if method != "lora":
                results[method]["vs_lora"] = _paired(correct[method], correct["lora"])
    out = {
        "n_test": tested["n"],
        "methods": results,
        "store": {k: cache[k] for k in cache},
    }
    if "lst_cached" in runs:
        chosen = runs["lst_cached"]["seeds"][0]
        speed_cfg = {**cfg, "path": chosen["path"], "repeats": 3}
        out["generation_speed"] = step("speed", speed_cfg, timeout_s, work, MODULE)
    out["ratios"] = ratios(out)
    return out


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
    figures = paired(a, b)
    return {"exact_match_diff": figures.pop("accuracy_diff"), **figures}


def _zero_shot(score: dict) -> dict:
    return {
        "test_exact_match": score["exact_match"],
        "test_exact_match_sd": None,
        "test_loss": round(score["loss"], 4),
        "examples": score["examples"],
    }


def _summary(method: str, m: dict, scores: dict, epochs: int, cache: dict) -> dict:
    seeds = m["seeds"]
    exact = [scores[r["key"]]["exact_match"] for r in seeds]

    def mean(key):
        return round(float(np.mean([r[key] for r in seeds])), 1)

    time_to_model = float(np.mean([r["time_to_model_s"] for r in seeds]))
    if method == "lst_cached":  # what the user waits for includes making the store
        time_to_model += cache["caching_seconds"]
    return {
        "chosen": m["chosen"],
        "epochs": epochs,
        "grid": [
            {
                **r["point"],
                **{k: r[k] for k in ("valid_exact_match", "valid_loss", "valid_loss_reloaded")},
            }
            for r in m["grid"]
        ],
        "test_exact_match": round(float(np.mean(exact)), 4),
        "test_exact_match_sd": round(float(np.std(exact, ddof=1)), 4) if len(exact) > 1 else None,
        "test_exact_match_per_seed": [round(x, 4) for x in exact],
        "test_loss": round(float(np.mean([scores[r["key"]]["loss"] for r in seeds])), 4),
        "examples_per_s": mean("examples_per_s"),
        "peak_mem_mb": mean("peak_mem_mb"),
        "peak_total_mb": mean("peak_total_mb"),
        "time_to_model_s": round(time_to_model, 1),
        "trainable_pct": round(seeds[0]["trainable_pct"], 3),
        "best_epochs": [r["best_epoch"] for r in seeds],
        "examples": scores[seeds[0]["key"]]["examples"],
    }


def ratios(task: dict) -> dict:
    r = task["methods"]
    c = r.get("lst_cached")
    if not c:
        return {}
    out = speed_ratios(r)
    if r.get("full"):
        out["lst_cached_memory_vs_full"] = round(c["peak_mem_mb"] / r["full"]["peak_mem_mb"], 3)
    if r.get("lora"):
        out["lst_cached_exact_match_minus_lora"] = round(
            c["test_exact_match"] - r["lora"]["test_exact_match"], 4
        )
    for batch, s in task.get("generation_speed", {}).items():
        out[f"generation_{batch}_side_vs_backbone"] = s["ratio"]
    return out


TARGETS = (
    ("lst_cached_exact_match_minus_lora", ">=", -0.05),
    ("lst_cached_speed_vs_full", ">=", 10),
    ("lst_cached_speed_vs_lora", ">=", 3),
    ("lst_cached_memory_vs_full", "<=", 0.25),
    ("generation_batch_1_side_vs_backbone", ">=", 0.7),
    ("generation_batch_8_side_vs_backbone", ">=", 0.7),
)


def markdown(report: dict) -> str:
    cfg = report["config"]
    lines = []
    for task, t in report["tasks"].items():
        lines += [
            f"### {task} ({t['n_test']} test rows)",
            "",
            "| method | chosen (grid) | epochs | trainable % | peak MB above load (total) "
            "| train examples/s | time to model (s) | test exact match | vs LoRA: diff [95% CI] "
            "| test loss |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in t["methods"].items():
            em = f"{r['test_exact_match']:.3f}"
            if r.get("test_exact_match_sd") is not None:
                em += f" ± {r['test_exact_match_sd']:.3f}"
            vs = ""
            if r.get("vs_lora"):
                v = r["vs_lora"]
                vs = (
                    f"{100 * v['exact_match_diff']:+.1f} pts "
                    f"[{100 * v['ci95'][0]:+.1f}, {100 * v['ci95'][1]:+.1f}]"
                )
            if name == "zero_shot":
                lines.append(
                    f"| zero-shot (bare backbone) | | | 0 | | | | {em} | {vs} | "
                    f"{r['test_loss']:.3f} |"
                )
                continue
            chosen = ", ".join(f"{k} {v:g}" for k, v in r["chosen"].items())
            grid = "; ".join(
                f"{', '.join(f'{v:g}' for k, v in g.items() if not k.startswith('valid'))}: "
                f"{g['valid_exact_match']:.2f}"
                for g in r["grid"]
            )
            lines.append(
                f"| {name} | {chosen} ({grid}) | {r['epochs']} | {r['trainable_pct']:.2f} | "
                f"{r['peak_mem_mb']:.0f} ({r['peak_total_mb']:.0f}) | {r['examples_per_s']:.1f} "
                f"| {r['time_to_model_s']:.0f} | {em} | {vs} | {r['test_loss']:.3f} |"
            )
        s = t["store"]
        lines += [
            "",
            f"Store: {s['bytes_per_token']:.0f} bytes per token ({s['n_tokens']:,} tokens of "
            f"{s['n_examples']} examples), caching {s['caching_seconds']:.0f} s.",
        ]
        if t.get("generation_speed"):
            parts = [
                f"batch {b.split('_')[1]}: side model {g['side_tokens_per_s']} tokens/s, bare "
                f"backbone {g['backbone_tokens_per_s']} ({g['ratio']:.2f}x)"
                for b, g in t["generation_speed"].items()
            ]
            tokens = cfg["new_tokens"]
            lines.append(f"Generation ({tokens} new tokens, KV caches): " + "; ".join(parts) + ".")
        lines += ["", "Targets: " + _targets(t["ratios"]), ""]
    lines.append(
        f"Setup: {cfg['backbone']}, {cfg['rows']} generated rows per task (test: the file's "
        f"seeded tenth), training and validation from a {cfg['limit']}-row sample, batch "
        f"{cfg['batch_size']}, length {cfg['max_length']}, {cfg['seeds']} seeds at each method's "
        f"chosen grid point (chosen on seed 0's validation exact match); "
        f"{report['machine'].get('cores', '?')} CPU cores, device {cfg['device']}"
        + (f"; {report['seconds']:.0f} s in all." if report.get("seconds") else ".")
    )
    if report.get("notes"):  # what a reader must know of how the run went, added by hand
        lines += ["", "Notes:", *(f"- {n}" for n in report["notes"])]
    return "\n".join(lines) + "\n"


def _targets(r: dict) -> str:
    out = []
    for key, op, bound in TARGETS:
        if key not in r:
            continue
        met = r[key] >= bound if op == ">=" else r[key] <= bound
        out.append(f"{key} {r[key]} (target {op} {bound}: {'met' if met else 'missed'})")
    return "; ".join(out)


def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
