"""A job's hyperparameters: the caching and training settings that have an HTTP name in their
declaration (backbone_worker/options.py, side_trainer/options.py), and the one mapping between
them and the options the cacher and the trainer take. The HTTP model, the remote CLI's flags and
jobs all come from here; "auto" means the declaration's default, or a default that depends on
the upload's size or the backbone's family (AUTO below). Torch-free.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, create_model

from backbone_worker.options import (
    MAX_SWEEP,
    CacheOptions,
    Setting,
    auto_width,
    parse_layers,
    parse_width,
    settings,
    sweep_parser,
)
from side_trainer.options import FAMILY_DEFAULTS, TrainOptions

OWNERS = (CacheOptions, TrainOptions)


def declared() -> list[tuple[type, str, Any, Setting]]:
    """(options class, field, default, Setting) of every setting a job may set."""
    return [
        (cls, name, default, s)
        for cls in OWNERS
        for name, default, s in settings(cls)
        if s.http is not None
    ]


def _http_type(cls, name: str, s: Setting):
    """The JSON shape a hyperparameter takes: "auto", or what its declaration allows."""
    if s.parse is parse_layers:
        layer = Annotated[int, Field(ge=0, le=1000)]
        return Literal["auto", "all"] | Annotated[list[layer], Field(min_length=1, max_length=1000)]
    if s.parse is parse_width:
        return (
            Literal["auto", "full"]
            | Annotated[int, Field(ge=1)]
            | Annotated[str, Field(pattern=r"^d/[1-9][0-9]*$")]
        )
    if s.choices is not None:
        return Literal[("auto", *[c for c in s.choices if c is not None])]
    kind = {f.name: f.type for f in fields(cls)}[name]
    number = Annotated[
        float if "float" in str(kind) else int, Field(ge=s.low, le=s.high, gt=s.above)
    ]
    if s.sweep:  # a list trains one network per value, the best on validation kept
        return (
            Literal["auto"]
            | number
            | Annotated[list[number], Field(min_length=1, max_length=MAX_SWEEP)]
        )
    return Literal["auto"] | number


def http_name(setting: str) -> str | None:
    """A declared setting, as an error names it ("CacheOptions.layers"), by its name among a
    job's hyperparameters ("kept_layers"); None if a job cannot set it."""
    owner, _, field = setting.partition(".")
    return next(
        (s.http for cls, name, _, s in declared() if (cls.__name__, name) == (owner, field)), None
    )


Hyperparameters = create_model(
    "Hyperparameters",
    __config__=ConfigDict(extra="forbid"),
    **{
        s.http: (_http_type(cls, name, s), Field(default="auto", description=s.help))
        for cls, name, _, s in declared()
    },
)


def resolve(
    hp: dict,
    n_rows: int,
    family: str,
    default_layers: list[int],
    hidden_size: int,
    side_heads: Callable[[int], int],
) -> dict:
    """Every hyperparameter with "auto" replaced: by what suits the upload's size and the
    backbone (its family, its width) where AUTO says so, else by the declaration's default.
    `side_heads(r)` is the backbone family's count of side heads at reduction factor r (the
    trainer's default for a network whose heads are unset); over a sweep of reduction factors
    each takes its own, so side_heads stays unset (null) there."""
    auto = {
        "cache_width": auto_width(hidden_size),
        "n_epochs": 10 if n_rows < 1000 else 5 if n_rows < 10000 else 3,
        "batch_size": FAMILY_DEFAULTS[family]["batch_size"],
        "learning_rate": FAMILY_DEFAULTS[family]["lr"],
        "kept_layers": default_layers,
    }
    out = {}
    for _, _, default, s in declared():
        value = hp.get(s.http, "auto")
        out[s.http] = auto.get(s.http, default) if value == "auto" else value
    if out["side_heads"] is None and isinstance(out["reduction_factor"], int):
        out["side_heads"] = side_heads(out["reduction_factor"])
    return out


def options(hp: dict, **given) -> tuple[CacheOptions, TrainOptions]:
    """Resolved hyperparameters -> the cacher's and the trainer's options (plus `given`
    fields that are not hyperparameters, such as the device or a seed)."""
    kwargs: dict[type, dict] = {cls: {} for cls in OWNERS}
    for cls, name, _, s in declared():
        kwargs[cls][name] = hp[s.http]
    for cls in OWNERS:
        names = {f.name for f in fields(cls)}
        kwargs[cls].update({k: v for k, v in given.items() if k in names})
    return CacheOptions(**kwargs[CacheOptions]), TrainOptions(**kwargs[TrainOptions])


def add_flags(p: argparse.ArgumentParser) -> None:
    """One remote-CLI flag per hyperparameter, its name the HTTP name with dashes."""
    for cls, name, _, s in declared():
        kwargs = {"dest": s.http, "default": None, "help": f"{s.help} (default: auto)"}
        if s.choices is not None:
            kwargs["choices"] = ["auto", *[c for c in s.choices if c is not None]]
        else:
            kwargs["type"] = _flag_type(cls, name, s)
        p.add_argument("--" + s.http.replace("_", "-"), **kwargs)


def _flag_type(cls, name: str, s: Setting):
    if s.parse is not None:
        parse = s.parse
    else:
        kind = {f.name: f.type for f in fields(cls)}[name]
        parse = float if "float" in str(kind) else int

    if s.sweep:
        parse = sweep_parser(parse)

    def convert(text: str):
        if text == "auto":
            return "auto"
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"--{s.http.replace('_', '-')} {exc}") from None

    return convert


def from_flags(args: argparse.Namespace) -> dict:
    """The hyperparameters a remote-CLI user gave (the server fills in the rest)."""
    return {
        s.http: getattr(args, s.http) for *_, s in declared() if getattr(args, s.http) is not None
    }
