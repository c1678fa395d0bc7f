"""Every caching setting, declared once: its default, how it is parsed and checked, its flag on
the command line, its name among an HTTP job's hyperparameters, and its help. The CLI, the HTTP
job hyperparameters, the remote CLI, jobs and the README's option table are all built from these
declarations (`side_trainer.options` does the same for training). Torch-free: the CLI and the
service read it without loading a model library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from cache_store.codecs import DTYPES
from cache_store.errors import FixableError, cli_flag
from cache_store.projection import KINDS


class OptionError(FixableError, ValueError):
    """A setting out of its range or choices; the message names the setting (`setting`) and the
    fix."""


@dataclass(frozen=True)
class Setting:
    help: str
    flag: str | None = ""  # "" -> --field-name; None -> no command-line flag
    http: str | None = None  # its name among a job's hyperparameters; None: not over HTTP
    choices: tuple | None = None
    parse: Callable[[str], Any] | None = None  # command-line text -> value (ValueError if bad)
    low: float | None = None  # smallest value allowed
    high: float | None = None  # largest value allowed
    above: float | None = None  # the value must be strictly above this
    auto: str = ""  # what an unset value (None, "auto" over HTTP) becomes
    sweep: bool = False  # takes a list of values too: one training run per value, in lockstep

    def flag_for(self, name: str) -> str | None:
        return None if self.flag is None else (self.flag or cli_flag(name))


def setting(help: str, **kwargs) -> dict:
    return {"setting": Setting(help, **kwargs)}


def settings(cls) -> list[tuple[str, Any, Setting]]:
    """(field name, default, Setting) of every declared field of an options dataclass."""
    return [
        (f.name, f.default if f.default is not MISSING else None, f.metadata["setting"])
        for f in fields(cls)
        if "setting" in f.metadata
    ]


def check(options) -> None:
    """Raise OptionError for the first field (or, for a swept field, list item) out of its
    choices or range."""
    for name, _, s in settings(type(options)):
        value = getattr(options, name)
        which = {"setting": f"{type(options).__name__}.{name}", "flag": s.flag_for(name) or name}
        if isinstance(value, list) and s.sweep:
            if not 1 <= len(value) <= MAX_SWEEP:
                raise OptionError(
                    f"{{setting}} lists {len(value)} values",
                    f"sweep between 1 and {MAX_SWEEP} of them",
                    **which,
                )
            for item in value:
                _check_value(item, s, which)
            continue
        _check_value(value, s, which)


def _check_value(value, s: Setting, which: dict) -> None:
    if value is None or isinstance(value, (list, str)) and s.choices is None:
        return
    if s.choices is not None and value not in s.choices:
        raise OptionError(
            f"{{setting}} {value!r} is not one of {', '.join(map(str, s.choices))}",
            "pick one of those",
            **which,
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (
            (s.low is not None and value < s.low)
            or (s.high is not None and value > s.high)
            or (s.above is not None and value <= s.above)
        ):
            bounds = " and ".join(
                filter(
                    None,
                    [
                        f"at least {s.low:g}" if s.low is not None else "",
                        f"above {s.above:g}" if s.above is not None else "",
                        f"at most {s.high:g}" if s.high is not None else "",
                    ],
                )
            )
            raise OptionError(
                f"{{setting}} {value!r} is out of range", f"it must be {bounds}", **which
            )


# Most configurations one sweep trains together (each holds a side network, its optimizer state
# and its best weights in memory).
MAX_SWEEP = 64


def sweep_parser(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Command-line text of a swept setting: one value, or comma-separated values (a list)."""

    def convert(text: str):
        values = [parse(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise ValueError(f"{text!r} holds no value; pass e.g. 1e-3 or 3e-4,1e-3")
        return values[0] if len(values) == 1 else values

    return convert


def parse_layers(text: str) -> list[int] | str:
    """ "all", or comma-separated layer indices."""
    if text == "all":
        return "all"
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers or any(i < 0 for i in layers):
        raise ValueError(
            f"{text!r} is not a comma-separated list of layer indices; pass e.g. 0,2,4 or all"
        )
    return layers


# An unset stored width: d/AUTO_WIDTH_DIVISOR (PCA) where that leaves at least AUTO_WIDTH_MIN
# numbers per state, else full width. Chosen on validation accuracy by bench/tiers.py
# (bench/results/tiers_*.json: int8 at d/4 is within a point of fp16 at full width).
AUTO_WIDTH_DIVISOR = 4
AUTO_WIDTH_MIN = 64


def auto_width(d: int) -> str:
    """The stored width an unset --width gives a backbone of width d: "d/N" or "full"."""
    return f"d/{AUTO_WIDTH_DIVISOR}" if d // AUTO_WIDTH_DIVISOR >= AUTO_WIDTH_MIN else "full"


def stored_width(width: int | str | None, d: int) -> int | None:
    """K for a backbone of width d, or None for full width. `width`: None (auto), "full",
    "d/N" or an integer."""
    if width is None:
        width = auto_width(d)
    if width == "full":
        return None
    if isinstance(width, str):  # "d/N"
        n = int(width.split("/")[1])
        if d % n:
            raise OptionError(
                f"{n} does not divide the backbone's width {d}; "
                f"pick a divisor of {d}, or an integer width"
            )
        return d // n
    return width


def parse_width(text: str) -> int | str:
    """An integer K, "d/N" (resolved against the backbone's width), or "full"."""
    if text == "full":
        return text
    if re.fullmatch(r"d/[1-9][0-9]*", text):
        return text
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text)
    raise ValueError(f"{text!r} is not a positive integer, d/N or full; pass e.g. 96 or d/4")


@dataclass
class CacheOptions:
    layers: list[int] | str | None = field(
        default=None,
        metadata=setting(
            "kept backbone layers, e.g. 0,2,4, or all",
            http="kept_layers",
            parse=parse_layers,
            auto="the top half of every layer of an encoder or T5, of every third layer of a "
            "decoder-only model",
        ),
    )
    max_length: int = field(
        default=128, metadata=setting("tokens per example (longer texts are cut)", low=1)
    )
    dtype: str = field(
        default="int8",
        metadata=setting(
            "stored precision: int8 (a scale per token; within a point of fp16 in "
            "bench/tiers.py), fp16, bf16",
            http="cache_dtype",
            choices=DTYPES,
        ),
    )
    width: int | str | None = field(
        default=None,
        metadata=setting(
            "stored width: K numbers per token and state instead of the backbone's d, an integer or "
            "d/N (e.g. d/4), or full",
            http="cache_width",
            parse=parse_width,
            auto=f"d/{AUTO_WIDTH_DIVISOR} (PCA) where that leaves at least {AUTO_WIDTH_MIN} "
            "numbers, else full width",
        ),
    )
    projection: str = field(
        default="pca",
        metadata=setting(
            "how a stored width maps d to K: pca (fitted on training states) or pool (channel-group "
            "means)",
            http="cache_projection",
            choices=KINDS,
        ),
    )
    importance: str | None = field(
        default=None,
        metadata=setting(
            "reuse the importance.safetensors of another store of the same backbone, data and "
            "layers (or more layers) instead of a Fisher pass",
            flag="--importance",
        ),
    )
    batch_size: int = field(
        default=64, metadata=setting("backbone forward batch", flag="--cache-batch-size", low=1)
    )
    part_size: int = field(
        default=256,
        metadata=setting(
            "examples per store part: the unit of work, of retry and of resume", low=1
        ),
    )
    fisher_examples: int = field(
        default=1024,
        metadata=setting(
            "training examples the Fisher importance of the pruning init sums over (as the paper)",
            low=1,
        ),
    )
    device: str = field(
        default="auto",
        metadata=setting(
            "backbone device: auto (a GPU where there is one), cpu, cuda", flag="--cache-device"
        ),
    )
    autocast: str | None = field(
        default="bf16",
        metadata=setting(
            "forward precision on a GPU: bf16, fp16, or none for fp32",
            flag=None,
            choices=("bf16", "fp16", None),
        ),
    )
    workers: int = field(
        default=1,
        metadata=setting(
            "backbone workers; more than 1 (or RAY_ADDRESS set) runs a Ray actor pool", low=1
        ),
    )
    gpus_per_worker: float | None = field(
        default=None,
        metadata=setting(
            "GPUs per Ray worker",
            low=0,
            auto="1 when the Ray cluster has GPUs (an equal share where a local Ray has fewer "
            "GPUs than workers), else 0",
        ),
    )
    wait_s: float = field(
        default=0.0,
        metadata=setting(
            "seconds to wait for another run writing the same store", flag="--wait", low=0
        ),
    )

    def __post_init__(self):
        check(self)
