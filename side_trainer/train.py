"""Train a side network from an activation store; the backbone is never loaded here.

Recipe (the reference's, with two changes): AdamW without weight decay, lr 3e-3 and batch 32
(1e-3 and 16 for decoder-only backbones, see FAMILY_DEFAULTS), linear warm-up then linear decay,
grad-norm clip 1.0. Changes: warm-up is a fraction of the total steps (the
reference's fixed 500 steps suits 100k-row sets, not a 300-row upload), and training stops early
when validation accuracy has not improved for `patience` epochs, keeping the best epoch's weights.
Optional feature-space augmentation (dropout / Gaussian noise on ladder states) stands in for the
backbone dropout that caching removes; it is off by default.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import get_linear_schedule_with_warmup

from backbone_worker.backbone import fingerprint_dir, resolve
from backbone_worker.families import DECODER, ENCODER_DECODER, family_by_name
from cache_store import ActivationStore, StoreError
from cache_store.progress import Bar, check
from side_trainer import metrics
from side_trainer.artifacts import WEIGHTS_FILE, save_side_model
from side_trainer.generative import targets
from side_trainer.group import groups_of
from side_trainer.memory import PeakMemory, allocator
from side_trainer.model import SideConfig, SideNetwork, side_network
from side_trainer.options import (  # noqa: F401
    FAMILY_DEFAULTS,
    TrainOptions,
    expand,
    swept,
    with_family_defaults,
)
from side_trainer.packing import pack_batch
from side_trainer.pruning import apply_pruning_init, load_lm_head

log = logging.getLogger(__name__)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def to_device(batch: dict, device: str) -> dict:
    return {
        k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()
    }


def augment(batch: dict, dropout: float, noise: float) -> dict:
    if not dropout and not noise:
        return batch
    for stream in ("enc", "dec"):
        if stream not in batch:
            continue
        states = batch[stream]["states"]
        for name, x in states.items():
            if noise:
                x = x + noise * x.pow(2).mean().sqrt() * torch.randn_like(x)
            states[name] = torch.nn.functional.dropout(x, dropout) if dropout else x
    return batch


def correct(net: SideNetwork, batch: dict, logits: torch.Tensor) -> tuple[int, int]:
    """Correct predictions and count: classes, for T5 whole label sequences (teacher-forced),
    for a generative network the target tokens (teacher-forced: mean token accuracy)."""
    if net.cfg.task == "generate" and net.cfg.family == ENCODER_DECODER:
        mask = batch["dec"]["attention_mask"].bool()
        wanted = batch["dec"]["input_ids"][mask]
        return int((logits[mask].argmax(-1) == wanted).sum()), len(wanted)
    if net.cfg.task == "generate":
        wanted = targets(batch)
        return int((logits.argmax(-1) == wanted).sum()), len(wanted)
    if net.cfg.family != ENCODER_DECODER:
        return int((logits.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])
    mask = batch["dec"]["attention_mask"].bool()
    hit = (logits.argmax(-1) == batch["dec"]["input_ids"]) | ~mask
    return int(hit.all(1).sum()), hit.shape[0]


def build_side_network(
    store: ActivationStore, opts: TrainOptions, importance: dict | None = None
) -> SideNetwork:
    """A side network for `store`'s states, initialised by `opts.init` from the store's
    importance scores (or `importance`, scores computed elsewhere for the same backbone and
    layers)."""
    from backbone_worker.cache import read_importance

    settings = store.settings
    generate = settings.get("task") == "generate"
    cfg = SideConfig(
        task=settings.get("task", "classify"),
        final_norm=settings.get("final_norm"),
        join="post_norm",
        end_ids=settings.get("end_ids", []),
        template=settings.get("template"),
        family=settings["family"],
        backbone=settings["backbone"],
        backbone_fingerprint=settings["backbone_fingerprint"],
        backbone_config=settings["backbone_config"],
        layers=settings["layers"],
        labels=settings["labels"],
        reduction=opts.reduction,
        pooling=opts.pooling,
        init=opts.init,
        max_length=settings["max_length"],
        store_fingerprint=store.fingerprint,
        label_texts=settings["labels"] if settings["family"] == ENCODER_DECODER else [],
        text_pair=settings.get("text_pair", False),
        projection=settings.get("projection"),
        heads=opts.side_heads,
    )
    if generate and opts.init == "fisher":
        # A generative store keeps magnitude scores only (backbone_worker/cache.py).
        opts = replace(opts, init="magnitude")
        cfg = replace(cfg, init="magnitude")
    if cfg.heads is None:  # the family's default for this width, recorded with the model
        family = family_by_name(cfg.family)
        cfg = replace(cfg, heads=family.default_side_heads(cfg.hf_backbone_config(), cfg.reduction))
    torch.manual_seed(opts.seed)
    net = side_network(cfg)
    if cfg.projection:
        for key, matrix in store.projection_matrices().items():
            stream, name = key.split("/")
            getattr(net.streams[stream], f"projection_{name}").copy_(torch.from_numpy(matrix))
    needs_backbone = opts.init != "random" or cfg.family == ENCODER_DECODER or generate
    if needs_backbone:
        backbone_dir = resolve(cfg.backbone)
        if fingerprint_dir(backbone_dir) != cfg.backbone_fingerprint:
            raise StoreError(
                f"the backbone files at {backbone_dir} changed since the store was cached; "
                f"re-run `ladder cache` into a new --store, or train with --init random"
            )
        if opts.init != "random":
            if importance is None:
                importance = read_importance(store.location.url)
            apply_pruning_init(net, backbone_dir, importance, opts.init)
        if generate and cfg.family == DECODER:
            net.load_frozen(backbone_dir)
        elif cfg.family == ENCODER_DECODER:
            load_lm_head(net, backbone_dir)
    return net


CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "training_metrics.json"  # written last: the training's result and its marker


@dataclass
class Candidate:
    """One configuration of a run (a single run has one): its network and its selection state."""

    opts: TrainOptions
    net: SideNetwork
    best: float = -1.0
    best_state: dict | None = None
    best_validation: dict | None = None  # metrics.report of the best epoch (class outputs only)
    history: list = field(default_factory=list)
    stale: int = 0
    steps: int = 0  # optimizer steps it trained
    # Successive halving: the validation accuracy at each round it took part in, and whether it
    # went on ({"step", "val_accuracy", "kept"}); a candidate not kept trains no further.
    rounds: list = field(default_factory=list)

    def running(self, patience: int) -> bool:
        return self.stale < patience and all(r["kept"] for r in self.rounds)

    def summary(self, axes: dict) -> dict:
        scored = self.history and self.history[0]["val_accuracy"] is not None
        epoch = best_epoch(self.history, self.best) if self.history else None
        if scored and "valid_loss" in self.history[0]:  # a generative network: by its loss
            kept = self.history[epoch - 1]
            best = {
                "best_val_accuracy": kept["val_accuracy"],
                "best_valid_loss": kept["valid_loss"],
            }
        else:
            best = {"best_val_accuracy": self.best if scored else None}
        return {
            **{name: getattr(self.opts, name) for name in axes},
            **best,
            "best_epoch": epoch,
            "steps": self.steps,
            "history": self.history,
            **({"halving": self.rounds} if self.rounds else {}),
        }


def halving_steps(n_candidates: int, total_steps: int) -> list[int]:
    """The steps after which successive halving keeps the better half of the configurations
    still training: for 2^n configurations n rounds, at 1/2^n, ..., 1/4 and 1/2 of the steps,
    so one is left for the second half (8 configurations: 8 x 1/8 + 4 x 1/8 + 2 x 1/4 + 1 x 1/2
    = 2.5 runs' steps). Configurations in between round up (9 take 4 rounds: 9, 5, 3, 2, 1).
    With fewer steps than that, rounds fall on one step and are taken there together (a step
    listed twice halves twice)."""
    rounds = math.ceil(math.log2(n_candidates)) if n_candidates > 1 else 0
    return [max(1, round(total_steps / 2 ** (rounds - r))) for r in range(rounds)]


def adamw(params, lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay (the recipe), as one fused kernel per step where torch has one
    for the parameters' device (CPU and CUDA do). Measured on 2 CPU cores: a step of 8 MiniLM
    side networks' AdamW 3.4 ms fused against 11 ms in torch's default per-parameter loop."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    # torch checks this only at the first step: a device without the kernel would fail there.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused)


def best_epoch(history: list, best: float) -> int:
    """The first epoch whose score was `best`: its validation accuracy, or for a generative
    network minus its validation loss."""
    if history and history[0]["val_accuracy"] is None:
        return len(history)  # no validation split: the last epoch
    return next(h["epoch"] for h in history if _score(h) == best)


def _score(record: dict) -> float:
    if "valid_loss" in record:
        loss = record["valid_loss"]
        return -loss if loss is not None else -math.inf
    return record["val_accuracy"]


# A model no better than the majority class is trained again (TrainOptions.retries times at most),
# each time at this share of the last learning rate and the next seed: a rate too high for the
# data, or an unlucky initialisation, is the usual cause.
RETRY_LR_FACTOR = 1 / 3


def train(
    store_url: str, out_dir: str | Path, opts: TrainOptions, on_epoch=None, sampler=None
) -> dict:
    """`train_once`, and a guard against a collapsed model: when the kept model predicts one
    class for all validation rows, or its validation macro-F1 is no better than the majority
    class's, training runs again (`opts.retries` times at most, at a lower rate and another
    seed) and the attempt with the best validation macro-F1 is kept. Its result then lists
    every attempt (`attempts`); `warning` ({"code", "message"}, else None) says when none beat
    the majority class. `on_epoch` records of a retry carry `attempt` (1, 2, ...)."""
    out_dir = Path(out_dir)
    result = train_once(store_url, out_dir, opts, on_epoch, sampler)
    if "attempts" in result:  # a finished run of this guard, found again (a resumed job)
        return result
    if result.get("task") == "generate":  # no classes, so no majority class to fall to
        return {**result, "attempts": None, "warning": None}
    reason = metrics.collapsed(result["validation"])
    attempts = [(result, reason, out_dir)]
    while reason and len(attempts) <= opts.retries:
        k = len(attempts)
        last = TrainOptions(**attempts[-1][0]["options"])
        retry = replace(last, lr=last.lr * RETRY_LR_FACTOR, seed=last.seed + 1)
        log.warning(
            "the model is no better than the majority class (%s); training again at learning "
            "rate %.3g with seed %d (retry %d of %d)",
            reason,
            retry.lr,
            retry.seed,
            k,
            opts.retries,
        )
        where = out_dir / f"retry-{k}"
        hook = None if on_epoch is None else lambda r, k=k: on_epoch({**r, "attempt": k})
        result = train_once(store_url, where, retry, hook)
        reason = metrics.collapsed(result["validation"])
        attempts.append((result, reason, where))
    if len(attempts) == 1:
        return {**result, "attempts": None, "warning": None}
    best, reason, where = max(attempts, key=lambda a: a[0]["validation"]["macro_f1"])
    for path in where.iterdir() if where != out_dir else ():
        path.replace(out_dir / path.name)
    for _, _, path in attempts[1:]:
        shutil.rmtree(path, ignore_errors=True)
    # A sweep's retries train its chosen configuration: the sweep's own account stays.
    sweep = {k: v for k, v in attempts[0][0].items() if k in ("sweep", "data_seed", "chosen")}
    result = {
        **best,
        **sweep,
        **({"candidates": attempts[0][0]["candidates"]} if sweep else {}),
        "model_dir": str(out_dir),
        # train_once's identity in out_dir is the first attempt's: a rerun finds this result.
        "identity": attempts[0][0]["identity"],
        "attempts": [
            {
                "lr": r["options"]["lr"],
                "seed": r["options"]["seed"],
                "val_accuracy": r["best_val_accuracy"],
                "val_macro_f1": r["validation"]["macro_f1"],
                "collapsed": why,
            }
            for r, why, _ in attempts
        ],
        "warning": None
        if reason is None
        else {
            "code": "majority_class",
            "message": f"after {len(attempts)} attempts the model is still no better than "
            f"the majority class: {reason}; add rows of the smaller classes, or try a lower "
            f"learning rate",
        },
    }
    write_result(out_dir, result)
    log.log(
        logging.WARNING if reason else logging.INFO,
        "kept attempt %d of %d (validation macro-F1 %.3f)%s",
        attempts.index(next(a for a in attempts if a[0] is best)) + 1,
        len(attempts),
        best["validation"]["macro_f1"],
        f"; still no better than the majority class: {reason}" if reason else "",
    )
    return result


def write_result(out_dir: Path, result: dict) -> None:
    """Written last and atomically: its presence says the model beside it is complete."""
    finished = out_dir / METRICS_FILE
    finished.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
    finished.with_suffix(".tmp").replace(finished)


def train_once(
    store_url: str, out_dir: str | Path, opts: TrainOptions, on_epoch=None, sampler=None
) -> dict:
    """Train, keep the best validation epoch, save artifacts; returns the run's metrics.

    A sweep (lists of learning rates or reductions, several seeds: see `expand`) trains every
    configuration in lockstep from one pass over the store: each batch is read and decoded once
    and fed to all of them, networks of one architecture running as one group (group.py). The
    configuration with the best validation accuracy is saved; every candidate's curve is in the
    result under `candidates`.

    After every epoch the full training state goes to `out_dir/checkpoint.pt`, so a run that is
    killed resumes at its last finished epoch (same store and options only). `on_epoch(record)`
    is called after each epoch; an exception it raises (e.g. a cancelled job) stops training."""
    store = ActivationStore.open(store_url)
    n_train = store.n_examples("train")
    if n_train == 0:
        raise StoreError(
            f"store {store_url} has no committed training examples; run or finish "
            f"`ladder cache --store {store_url}` first"
        )
    opts = with_family_defaults(opts, store.settings["family"])
    # A generative store: networks that write (side_trainer/generative.py), scored by their
    # loss on the validation split's target tokens, with OpenAI's metric names.
    generate = store.settings.get("task") == "generate"
    if generate and opts.pooling != TrainOptions.pooling:
        warn_once(f"pooling {opts.pooling!r} has no effect on a generative side network")
    elif store.settings["family"] == DECODER and opts.pooling != TrainOptions.pooling:
        warn_once(
            f"pooling {opts.pooling!r} has no effect on a decoder-only backbone: its side "
            f"network pools the last token"
        )
    axes = swept(opts)
    has_validation = store.n_examples("validation") > 0
    if axes and not has_validation:
        raise StoreError(
            f"store {store_url} has no validation split, and a sweep chooses its configuration "
            f"by validation accuracy: train one configuration (no lists, --n-seeds 1), or cache "
            f"more rows so that some fall in the validation split"
        )
    candidates = [Candidate(o, build_side_network(store, o).to(opts.device)) for o in expand(opts)]
    if generate:  # scores are minus losses: any finite one beats the start
        for c in candidates:
            c.best = -math.inf
    n_cand, labels = len(candidates), store.settings["labels"]
    trainable = [[p for p in c.net.parameters() if p.requires_grad] for c in candidates]
    optimizer = adamw(
        [{"params": ps, "lr": c.opts.lr} for c, ps in zip(candidates, trainable)],
        lr=opts.lr if not isinstance(opts.lr, list) else opts.lr[0],
    )
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    total_steps = steps_per_epoch * opts.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(opts.warmup * total_steps), total_steps
    )
    # A prefetch thread overlaps reading with GPU compute; on a CPU the training step already
    # uses every core, and the thread's Python work contends for the GIL: measured on 2 cores,
    # an epoch from the store took 1.6-2.1x the in-memory epoch with the thread, 1.1-1.2x without.
    prefetch = 2 if str(opts.device).startswith("cuda") else 0
    train_seconds, seen, step = 0.0, 0, 0  # step: optimizer steps taken, for halving's rounds
    out_dir = Path(out_dir)
    checkpoint = out_dir / CHECKPOINT
    identity = {"store": store.fingerprint, "options": asdict(opts)}
    finished = out_dir / METRICS_FILE
    if finished.is_file() and (out_dir / WEIGHTS_FILE).is_file():
        done = json.loads(finished.read_text())
        if done.get("identity") == identity:
            # A run killed after saving its model, before its caller (a job) committed it.
            log.info(
                "%s already holds the model of this training (same store and options); "
                "delete the directory to train again",
                out_dir,
            )
            return done
    if checkpoint.is_file():
        # weights_only: tensors and plain data only, so a planted pickle in a shared directory
        # cannot run code here.
        state = torch.load(checkpoint, map_location=opts.device, weights_only=True)
        if state.get("identity") == identity and "candidates" in state:
            for c, saved in zip(candidates, state["candidates"]):
                c.net.load_state_dict(saved["net"])
                c.best, c.best_state = saved["best"], saved["best_state"]
                c.best_validation = saved["best_validation"]
                c.history, c.stale = saved["history"], saved["stale"]
                c.steps, c.rounds = saved["steps"], saved["rounds"]
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            train_seconds, seen, step = state["train_seconds"], state["seen"], state["step"]
            log.info(
                "resuming training after epoch %d from %s",
                max(len(c.history) for c in candidates),
                checkpoint,
            )

    def running_groups() -> list[tuple[list[int], object]]:
        """Groups of the candidates still training, in training mode, with their indices among
        all candidates: a candidate that stopped leaves its group, so it costs no more compute.
        Rebuilt after each validation pass (epoch ends, halving rounds), where one may stop."""
        alive = [k for k, c in enumerate(candidates) if c.running(opts.patience)]
        return [
            ([alive[i] for i in indices], group.train())
            for indices, group in groups_of([candidates[k].net for k in alive])
        ]

    halving = (
        halving_steps(len(candidates), total_steps) if opts.sweep_schedule == "halving" else []
    )
    groups = running_groups()
    log.info(
        "training %s side network%s: %s trainable parameters, %d steps",
        candidates[0].net.cfg.family,
        f"s ({len(candidates)} configurations in {len(groups)} group(s))"
        if len(candidates) > 1
        else "",
        "+".join(str(c.net.trainable_parameters()) for c in candidates[:4])
        + ("+..." if len(candidates) > 4 else ""),
        total_steps,
    )
    if halving:
        log.info("successive halving after steps %s", ", ".join(map(str, halving)))
    done_epochs = max(len(c.history) for c in candidates)
    samples = None  # the last epoch's sample generations (a generative run with a sampler)
    with PeakMemory(opts.device) as memory:
        for epoch in range(done_epochs, opts.epochs):
            if not any(c.running(opts.patience) for c in candidates):
                break
            start = time.perf_counter()
            losses = [[] for _ in candidates]
            bar = Bar(
                store.iter_batches(
                    "train",
                    opts.batch_size,
                    seed=opts.seed + epoch,
                    prefetch=prefetch,
                    shuffle_bytes=int(opts.shuffle_mb * 2**20),
                    decode=False,
                ),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{opts.epochs}",
                leave=False,
                phase="training",
                start=epoch * steps_per_epoch,
                overall=total_steps,
            )
            first = candidates[0].net  # every candidate has the family, so the same loss terms
            due = 0  # a halving round due after the step just taken
            for padded in bar:
                if due:  # taken here, before the next step: a round due at the epoch's end is
                    # taken after it, on the epoch's own validation scores (below)
                    halve(candidates, groups, store, opts, due, halving.count(due))
                    due = 0
                    groups = running_groups()
                optimizer.zero_grad(set_to_none=True)
                # A candidate that stopped (out of patience, or halved) is in no group: it has
                # no gradient, and AdamW leaves it be, as it would alone.
                terms = first.loss_terms(padded.head())
                totals = [0.0] * len(groups)  # per group (len(indices),): losses on the whole batch
                # A batch over micro_batch_tokens runs as micro-batches, each decoded when it is
                # reached, whose share-weighted gradients add up to the batch's. A cancel is
                # seen between them: a batch of thousands of rows for many configurations takes
                # seconds.
                for piece in padded.pieces(opts.micro_batch_tokens, opts.device):
                    check()
                    piece = augment(piece, opts.feature_dropout, opts.feature_noise)
                    # Real tokens only, where the piece has much padding (side_trainer/packing)
                    piece = pack_batch(piece, first.cfg.family)
                    share = first.loss_terms(piece) / terms
                    for g, (_, group) in enumerate(groups):
                        outputs = group(piece)
                        piece_losses = (
                            torch.stack([group.nets[0].loss(piece, out) for out in outputs]) * share
                        )
                        piece_losses.sum().backward()
                        totals[g] = totals[g] + piece_losses.detach()
                for (indices, _), total in zip(groups, totals):
                    for k, loss in zip(indices, total.tolist()):  # one sync a group
                        losses[k].append(loss)
                        candidates[k].steps += 1
                        torch.nn.utils.clip_grad_norm_(trainable[k], opts.grad_clip)
                optimizer.step()
                scheduler.step()
                seen += padded.rows
                step += 1
                due = step if step in halving else 0
                bar.set_postfix(loss=f"{next(ls[-1] for ls in losses if ls):.4f}")
            train_seconds += time.perf_counter() - start
            # Validation batches are training-sized, run as micro-batches: a padded batch of every
            # kept layer's states was the largest allocation here (SmolLM2 validation at 128 rows:
            # 464 MB, at 32: 232 MB).
            # Without a validation split (a tiny upload) nothing can pick an epoch, so the
            # latest one is kept: its score rises with the epoch and early stopping never fires.
            validation = (
                evaluate_groups(groups, len(candidates), store, "validation", opts)
                if has_validation
                else ([float(epoch)] * n_cand, [0.0] * n_cand, [None] * n_cand)
            )
            trained = {k for indices, _ in groups for k in indices}
            for k, (c, score, valid_loss, counts, ls) in enumerate(
                zip(candidates, validation[0], validation[1], validation[2], losses)
            ):
                if k not in trained:  # stopped, in an earlier epoch or halved in this one
                    continue
                loss = sum(ls) / len(ls)
                split = None if counts is None else metrics.report(counts.numpy(), labels)
                c.history.append(
                    {
                        "epoch": epoch + 1,
                        "train_loss": loss if math.isfinite(loss) else None,
                        "val_accuracy": score if has_validation else None,
                        **({"val_macro_f1": split["macro_f1"]} if split else {}),
                        **(generation_metrics(valid_loss, score) if generate else {}),
                    }
                )
                if generate and has_validation:
                    # Chosen by validation loss (lower is better), as OpenAI's jobs are.
                    score = -valid_loss if math.isfinite(valid_loss) else -math.inf
                if score > c.best:
                    c.best, c.stale, c.best_validation = score, 0, split
                    c.best_state = {k: v.detach().clone() for k, v in c.net.state_dict().items()}
                else:
                    c.stale += 1
            if due:
                halve(candidates, groups, store, opts, due, halving.count(due), validation)
            groups = running_groups()
            record = epoch_record(candidates, axes, epoch + 1)
            if sampler is not None and generate:
                # A few generations on validation prompts by the configuration kept so far.
                lead = max(range(len(candidates)), key=lambda k: (candidates[k].best, -k))
                record["samples"] = samples = sampler(candidates[lead].net)
                for sample in record["samples"]:
                    log.info("sample: %r -> %r", sample["prompt"][-60:], sample["completion"])
            scored = (
                f"validation loss {record['valid_loss']:.4f}, token accuracy "
                f"{record['valid_mean_token_accuracy']:.4f}"
                if generate and has_validation and record.get("valid_loss") is not None
                else "validation accuracy "
                + (f"{record['val_accuracy']:.4f}" if has_validation else "n/a")
            )
            log.info(
                "epoch %d: train loss %s, %s%s",
                epoch + 1,
                "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}",
                scored,
                f" (the best so far of {len(candidates)} configurations)" if axes else "",
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "identity": identity,
                    "candidates": [
                        {
                            "net": c.net.state_dict(),
                            "best": c.best,
                            "best_state": c.best_state,
                            "best_validation": c.best_validation,
                            "history": c.history,
                            "stale": c.stale,
                            "steps": c.steps,
                            "rounds": c.rounds,
                        }
                        for c in candidates
                    ],
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "train_seconds": train_seconds,
                    "seen": seen,
                    "step": step,
                },
                checkpoint.with_suffix(".tmp"),
            )
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: never half a file
            if on_epoch is not None:
                on_epoch(record)
            if not any(c.running(opts.patience) for c in candidates):
                log.info("early stop: no validation improvement for %d epochs", opts.patience)
    # The first best on validation, in the sweep's order.
    chosen = max(range(len(candidates)), key=lambda k: (candidates[k].best, -k))
    winner = candidates[chosen]
    epoch_kept = best_epoch(winner.history, winner.best)
    selection = (
        f"epoch {epoch_kept}, the lowest validation loss"
        if has_validation and generate
        else f"epoch {epoch_kept}, the best validation accuracy"
        if has_validation
        else f"epoch {epoch_kept}, the last one: the store has no validation split to choose by"
    )
    if axes:
        chosen_settings = ", ".join(f"{name} {getattr(winner.opts, name)}" for name in axes)
        selection = f"{chosen_settings} of {len(candidates)} configurations; {selection}"
    log.info("keeping %s", selection)
    net = winner.net
    net.load_state_dict(winner.best_state)
    save_side_model(net.cpu(), out_dir)
    n_backbone = backbone_parameter_count(net.cfg)
    result = {
        "model_dir": str(out_dir),
        "n_train": n_train,
        "epochs_run": len(winner.history),
        "best_val_accuracy": (
            winner.history[epoch_kept - 1]["val_accuracy"] if generate else winner.best
        )
        if has_validation
        else None,
        "best_epoch": epoch_kept,
        "selection": selection,
        # The kept epoch's validation figures: macro-F1, per class, the confusion matrix.
        "validation": winner.best_validation,
        "trainable_params": net.trainable_parameters(),
        "backbone_params": n_backbone,
        "trainable_pct": 100 * net.trainable_parameters() / n_backbone,
        "train_peak_mem_mb": round(memory.peak_mb, 1),
        # The device's whole peak (on a CPU the process's, libraries and store handles
        # included; on a GPU the allocated peak): what the device must have. train_peak_mem_mb
        # is what training adds to the start.
        "train_total_mem_mb": round(memory.total_mb, 1),
        "allocator": allocator(),
        "train_examples_per_s": round(seen / max(train_seconds, 1e-9), 1),
        "history": winner.history,
        "task": "generate" if generate else "classify",
        **({"samples": samples} if generate else {}),
        **(
            {k: winner.history[epoch_kept - 1].get(k) for k in GENERATION_METRICS}
            if generate
            else {}
        ),
        "options": asdict(winner.opts),
        "identity": identity,
    }
    if axes:
        result["sweep"] = axes
        # Every configuration read the batches in the order of this seed (the first one).
        result["data_seed"] = opts.seed
        result["chosen"] = chosen
        result["candidates"] = [c.summary(axes) for c in candidates]
    write_result(out_dir, result)
    checkpoint.unlink(missing_ok=True)
    return result


GENERATION_METRICS = ("valid_loss", "valid_mean_token_accuracy", "full_valid_loss")


def generation_metrics(valid_loss: float, token_accuracy: float) -> dict:
    """A generative epoch's validation figures under OpenAI's names. The whole validation split
    is scored every epoch, so `valid_loss` and `full_valid_loss` are the same figure."""
    loss = valid_loss if math.isfinite(valid_loss) else None
    return {
        "valid_loss": loss,
        "valid_mean_token_accuracy": token_accuracy,
        "full_valid_loss": loss,
    }


def epoch_record(candidates: list[Candidate], axes: dict, epoch: int) -> dict:
    """What an epoch reports. One configuration: its loss and validation accuracy this epoch.
    A sweep: those of the configuration that would be kept now (the best validation accuracy so
    far; `val_accuracy` is that best), and every configuration's latest epoch, each marked
    `stopped` once out of patience or halved out."""
    lead = max(range(len(candidates)), key=lambda k: (candidates[k].best, -k))
    record = {**candidates[lead].history[-1], "epoch": epoch}
    if axes:
        if record["val_accuracy"] is not None and "valid_loss" not in record:
            record["val_accuracy"] = candidates[lead].best
        # A candidate halved in the first epoch has no epoch of its own: nulls, and its rounds.
        none = {"epoch": None, "train_loss": None, "val_accuracy": None}
        record["candidates"] = [
            {
                **{name: getattr(c.opts, name) for name in axes},
                **(c.history[-1] if c.history else none),
                "stopped": not c.history or c.history[-1]["epoch"] < epoch,
                **({"halving": c.rounds} if c.rounds else {}),
            }
            for c in candidates
        ]
    return record


@torch.inference_mode()
def evaluate_groups(
    groups: list, n: int, store: ActivationStore, split: str, opts: TrainOptions
) -> tuple[list[float], list[float], list]:
    """Accuracy, mean loss and confusion matrix (a torch (K, K) count, rows true; None for T5,
    whose outputs are label texts) of every network of the groups on a stored split, the split
    read once (n: the number of candidates; those in no group score 0). A listener's check
    (cache_store.progress: a cancelled job) may stop it between batches."""
    hits, total, loss, terms = [0] * n, [0] * n, [0.0] * n, [0] * n
    classes = len(store.settings["labels"])
    counts = (
        [torch.zeros(classes * classes, dtype=torch.long) for _ in range(n)]
        if store.settings["family"] != ENCODER_DECODER and store.settings.get("task") != "generate"
        else [None] * n
    )
    for _, group in groups:
        group.eval()
    for padded in store.iter_batches(split, opts.batch_size, shuffle=False, decode=False):
        check()
        # Micro-batches, as in training: a batch holding the split's longest text would
        # otherwise set the run's peak memory, and a larger split holds longer texts.
        for batch in padded.pieces(opts.micro_batch_tokens, opts.device):
            batch = pack_batch(batch, store.settings["family"])
            for indices, group in groups:
                net = group.nets[0]
                count = net.loss_terms(batch)
                for k, logits in zip(indices, group(batch)):
                    h, m = correct(net, batch, logits)
                    hits[k], total[k] = hits[k] + h, total[k] + m
                    if counts[k] is not None:
                        cells = batch["labels"] * classes + logits.argmax(-1)
                        counts[k] += torch.bincount(cells.cpu(), minlength=classes * classes)
                    loss[k] += float(net.loss(batch, logits)) * count
                    terms[k] += count
    return (
        [h / max(t, 1) for h, t in zip(hits, total)],
        [x / max(t, 1) for x, t in zip(loss, terms)],
        [c if c is None else c.view(classes, classes) for c in counts],
    )


def halve(
    candidates: list,
    groups: list,
    store: ActivationStore,
    opts,
    step: int,
    times: int = 1,
    validation: tuple | None = None,
) -> None:
    """Successive halving after `step`: the candidates still training are scored on validation
    (`validation`: scores already taken at this step) and the better half (by accuracy, then
    lower loss; generative networks by loss, then accuracy; the sweep's order breaks a tie) goes on; `times` rounds falling on one step keep
    1/2^times."""
    accuracy, loss, _ = validation or evaluate_groups(
        groups, len(candidates), store, "validation", opts
    )
    finite = [x if math.isfinite(x) else math.inf for x in loss]  # a diverged one ranks last
    if store.settings.get("task") == "generate":  # chosen by loss, as its epochs are
        rank = lambda k: (finite[k], -accuracy[k], k)  # noqa: E731
    else:
        rank = lambda k: (-accuracy[k], finite[k], k)  # noqa: E731
    alive = sorted((k for indices, _ in groups for k in indices), key=rank)
    keep = set(alive[: math.ceil(len(alive) / 2**times)])
    for k in alive:
        candidates[k].rounds.append({"step": step, "val_accuracy": accuracy[k], "kept": k in keep})
    log.info(
        "successive halving after step %d: %d of %d configurations go on (validation accuracy %s)",
        step,
        len(keep),
        len(alive),
        " ".join(f"{accuracy[k]:.4f}{'' if k in keep else '-'}" for k in alive),
    )


def backbone_parameter_count(cfg: SideConfig) -> int:
    """Parameter count of the backbone, from its checkpoint headers (no weights are read)."""
    from safetensors import safe_open

    from side_trainer.pruning import CheckpointReader

    reader = CheckpointReader(resolve(cfg.backbone))
    total = 0
    for file in reader.files:
        with safe_open(file, "pt") as handle:
            for key in handle.keys():
                if not key.endswith("position_ids"):
                    total += math.prod(handle.get_slice(key).get_shape())
    return total
