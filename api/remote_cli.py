"""CLI verbs that talk to a running Ladder server through `LadderClient`.

`add_remote_commands` plugs them into the main `ladder` parser. Each handler returns a dict for
the caller to print; progress goes to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import deque

from api.client import DEFAULT_URL, LadderAPIError, LadderClient
from api.hyperparameters import add_flags, from_flags

REMOTE_ERRORS: tuple[type[Exception], ...] = (LadderAPIError,)


def _leaf(sub: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, conflict_handler="resolve")
    p.add_argument(
        "--url",
        default=os.environ.get("LADDER_URL", DEFAULT_URL),
        help="Ladder server (default $LADDER_URL or %(default)s)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LADDER_API_KEY"),
        help="bearer token (default $LADDER_API_KEY)",
    )
    return p


def _client(args: argparse.Namespace) -> LadderClient:
    return LadderClient(args.url, args.api_key)


def cmd_files_upload(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        return client.upload_file(args.path)


def cmd_files_list(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        return {"object": "list", "data": client.list_files()}


def cmd_jobs_create(args: argparse.Namespace) -> dict:
    # Only flags the user gave; the server fills in the rest.
    hyperparameters = from_flags(args)
    with _client(args) as client:
        job = client.create_job(
            args.model,
            args.training_file,
            validation_file=args.validation_file,
            seed=args.seed,
            suffix=args.suffix,
            hyperparameters=hyperparameters,
        )
        if args.wait:
            job = client.wait(job["id"])
        return job


def cmd_jobs_list(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        return client.list_jobs(limit=args.limit, after=args.after)


def cmd_jobs_show(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        return client.get_job(args.id)


def cmd_jobs_cancel(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        return client.cancel_job(args.id)


def cmd_jobs_events(args: argparse.Namespace) -> dict:
    with _client(args) as client:
        if not args.follow:
            return client.list_events(args.id, after=args.after, limit=args.limit)
        # Streams can run for the whole training; keep only the tail for the final result.
        last: deque[dict] = deque(maxlen=args.limit)
        for event in client.stream_events(args.id):
            print(f"{event['level']}: {event['message']}", file=sys.stderr, flush=True)
            last.append(event)
        return {"object": "list", "data": list(last), "has_more": False}


def cmd_remote_predict(args: argparse.Namespace) -> dict:
    # One model keeps the single-model response shape; several get the side-by-side one.
    model = args.model[0] if len(args.model) == 1 else args.model
    with _client(args) as client:
        return client.predict(model, args.texts)


def add_remote_commands(sub: argparse._SubParsersAction) -> None:
    files = sub.add_parser("files", help="training files on a Ladder server")
    files_sub = files.add_subparsers(dest="files_command", metavar="{upload,list}", required=True)
    p = _leaf(files_sub, "upload", "upload a CSV/JSONL training file")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(func=cmd_files_upload)
    p = _leaf(files_sub, "list", "list uploaded files")
    p.set_defaults(func=cmd_files_list)

    jobs = sub.add_parser("jobs", help="fine-tuning jobs on a Ladder server")
    jobs_sub = jobs.add_subparsers(
        dest="jobs_command", required=True, metavar="{create,list,show,cancel,events}"
    )
    p = _leaf(jobs_sub, "create", "start a fine-tuning job")
    p.add_argument("--model", required=True, help="backbone id, e.g. minilm")
    p.add_argument(
        "--training-file",
        required=True,
        metavar="FILE_ID_OR_PATH",
        help="an uploaded file id, or a local CSV/JSONL path to upload first",
    )
    p.add_argument("--validation-file", default=None, metavar="FILE_ID_OR_PATH")
    p.add_argument("--suffix", default=None, help="appended to the fine-tuned model's name")
    p.add_argument("--seed", type=int, default=None)
    add_flags(p)
    p.add_argument("--wait", action="store_true", help="block until the job finishes")
    p.set_defaults(func=cmd_jobs_create)

    p = _leaf(jobs_sub, "list", "list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after", default=None, help="job id to page after")
    p.set_defaults(func=cmd_jobs_list)

    for name, text, func in (
        ("show", "show one job", cmd_jobs_show),
        ("cancel", "cancel a job", cmd_jobs_cancel),
    ):
        p = _leaf(jobs_sub, name, text)
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)

    p = _leaf(jobs_sub, "events", "show a job's events")
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--follow", action="store_true", help="stream events to stderr until the job finishes"
    )
    p.add_argument("--limit", type=int, default=100, help="events to return")
    p.add_argument("--after", default=None, help="event id to page after (without --follow)")
    p.set_defaults(func=cmd_jobs_events)

    p = _leaf(sub, "remote-predict", "classify texts with models served by a Ladder server")
    p.add_argument(
        "--model", action="append", required=True, help="model id; repeat to compare several models"
    )
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.set_defaults(func=cmd_remote_predict)

    # The main CLI adds --json only to its direct subcommands (`files`, `jobs`), so the nested
    # parser would reject `ladder jobs list --json`. SUPPRESS leaves the parent's value alone when
    # the flag is absent, so `ladder jobs --json list` works too; conflict_handler="resolve" lets
    # the caller's own --json replace this one should it ever walk nested parsers as well.
    for nested in (files_sub, jobs_sub):
        for leaf in nested.choices.values():
            leaf.add_argument(
                "--json",
                action="store_true",
                default=argparse.SUPPRESS,
                help="print one JSON object as the last line of stdout",
            )
