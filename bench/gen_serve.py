"""Serving generation, measured against a real `ladder serve` process on loopback, through
`POST /v1/chat/completions` streamed (what an OpenAI client sees): the targets of the serving
issue (docs/benchmarks.md).

1. One stream: tokens/s after the first token and time to first token (a ~64-token prompt), of
   a generative side model and of the bare backbone, best of `--repeats`, alternating.
2. 8 concurrent requests, each for a different side model, `--new-tokens` each: total tokens/s
   (best of `--repeats`, alternating), against 8 concurrent requests to the bare backbone (one
   batched backbone step: the limit) and against the same 8 side-model requests one after
   another; the bare backbone's 8 one after another too, for what batching alone gains here.
3. 64 concurrent requests over the 8 side models: every one answered, p50 / p95 latency.

Every request writes exactly `--new-tokens` tokens (`ignore_eos`, vLLM's extension), greedily.
The side models are copies of one trained generative model (`--model`, a side model directory),
registered under 8 ids: the server loads and runs each as its own network.

    python -m bench.gen_serve --model DIR --backbone smollm2 --json bench/results/gen_serve.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.compare import machine
from bench.serve_many import start_server

PROMPT = (
    "Here is a list of the planets of the solar system in order from the sun: Mercury, Venus, "
    "Earth, Mars, Jupiter, Saturn, Uranus and Neptune. Write one sentence about each."
)


def register(home: Path, model_dir: str, backbone: str, n: int) -> list[str]:
    from api.db import Database

    db = Database(home / "ladder.db")
    ids = []
    for k in range(n):
        path = home / "models" / f"w{k}"
        shutil.copytree(model_dir, path)
        db.add_model(f"ft:w{k}", backbone, str(path), f"bench-{k}")
        ids.append(f"ft:w{k}")
    return ids


def ask(base: str, model: str, new_tokens: int) -> dict:
    """One streamed chat completion: seconds to the first piece of text and in all, tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first, usage = None, None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
    total = time.perf_counter() - started
    return {"ttft_s": first, "seconds": total, "tokens": usage["completion_tokens"],
            "prompt_tokens": usage["prompt_tokens"]}  # fmt: skip


def at_once(base: str, models: list[str], new_tokens: int) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = list(pool.map(lambda m: ask(base, m, new_tokens), models))
    return time.perf_counter() - started, answers


def run(model_dir: str, backbone: str, new_tokens: int, repeats: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="ladder-gen-serve-"))
    try:
        ids = register(home, model_dir, backbone, 8)
        server, base = start_server(home, backbone, {})
        try:
            for m in [backbone, *ids]:  # every model loaded and warm before anything is timed
                ask(base, m, 2)
            single = {"backbone": [], "side": []}
            for _ in range(repeats):
                for name, m in (("backbone", backbone), ("side", ids[0])):
                    single[name].append(ask(base, m, new_tokens))

            def best(name):
                runs = single[name]
                return {
                    "tokens_per_s": round(
                        max((r["tokens"] - 1) / (r["seconds"] - r["ttft_s"]) for r in runs), 1
                    ),  # fmt: skip
                    "ttft_s": round(min(r["ttft_s"] for r in runs), 4),
                    "prompt_tokens": runs[0]["prompt_tokens"],
                }

            one = {name: best(name) for name in single}
            eight = {}
            for _ in range(repeats):  # alternating, the best of each (a shared machine's noise)
                for name, models in (("backbone", [backbone] * 8), ("side_models", ids)):
                    wall, answers = at_once(base, models, new_tokens)
                    rate = round(sum(a["tokens"] for a in answers) / wall, 1)
                    if name not in eight or rate > eight[name]["tokens_per_s"]:
                        eight[name] = {"seconds": round(wall, 3), "tokens_per_s": rate}
            # One after another: the side models', and the bare backbone's, whose gain from
            # concurrency is what batching itself gives on this machine (the side models' limit).
            for name, models in (("side_models", ids), ("backbone", [backbone] * 8)):
                started = time.perf_counter()
                tokens = sum(ask(base, m, new_tokens)["tokens"] for m in models)
                wall = time.perf_counter() - started
                eight[f"{name}_one_after_another"] = {
                    "seconds": round(wall, 3),
                    "tokens_per_s": round(tokens / wall, 1),
                }
            wall, answers = at_once(base, [ids[k % 8] for k in range(64)], new_tokens)
            latencies = sorted(a["seconds"] for a in answers)
            many = {
                "requests": 64,
                "answered": len(answers),
                "all_full_length": all(a["tokens"] == new_tokens for a in answers),
                "p50_s": round(statistics.median(latencies), 3),
                "p95_s": round(latencies[int(0.95 * len(latencies)) - 1], 3),
                "tokens_per_s": round(sum(a["tokens"] for a in answers) / wall, 1),
            }
        finally:
            server.terminate()
            server.wait(timeout=60)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    ratios = {
        "one_stream_tokens_per_s_side_vs_backbone": round(
            one["side"]["tokens_per_s"] / one["backbone"]["tokens_per_s"], 3
        ),
        "ttft_side_vs_backbone": round(one["side"]["ttft_s"] / one["backbone"]["ttft_s"], 3),
        "eight_side_models_vs_eight_backbone": round(
            eight["side_models"]["tokens_per_s"] / eight["backbone"]["tokens_per_s"], 3
        ),
        "eight_side_models_concurrent_vs_sequential": round(
            eight["side_models"]["tokens_per_s"]
            / eight["side_models_one_after_another"]["tokens_per_s"],
            3,
        ),
    }
    # The bare backbone's own gain from batching 8 on this machine: what bounds the side
    # models' (a figure beside the targets, not one of them).
    ceiling = round(
        eight["backbone"]["tokens_per_s"] / eight["backbone_one_after_another"]["tokens_per_s"], 3
    )
    return {
        "config": {
            "backbone": backbone,
            "model": str(model_dir),
            "new_tokens": new_tokens,
            "repeats": repeats,
        },  # fmt: skip
        "machine": machine(),
        "one_stream": one,
        "eight_concurrent": eight,
        "sixty_four_concurrent": many,
        "ratios": ratios,
        "backbone_eight_concurrent_vs_sequential": ceiling,
        "targets": {
            "one_stream_tokens_per_s_side_vs_backbone": ">= 0.7",
            "ttft_side_vs_backbone": "<= 1.3",
            "eight_side_models_vs_eight_backbone": ">= 0.8",
            "eight_side_models_concurrent_vs_sequential": ">= 3",
        },
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a generative side model directory")
    p.add_argument("--backbone", default="smollm2")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default="bench/results/gen_serve.json")
    args = p.parse_args(argv)
    report = run(args.model, args.backbone, args.new_tokens, args.repeats)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios"], indent=2))


if __name__ == "__main__":
    main()
