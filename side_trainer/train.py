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
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from backbone_worker.backbone import fingerprint_dir, resolve
from backbone_worker.families import DECODER, ENCODER_DECODER
from cache_store import ActivationStore, StoreError
from side_trainer.artifacts import WEIGHTS_FILE, save_side_model
from side_trainer.memory import PeakMemory
from side_trainer.model import SideConfig, SideNetwork
from side_trainer.options import FAMILY_DEFAULTS, TrainOptions, with_family_defaults  # noqa: F401
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
    """Correct predictions and count: classes, or for T5 whole label sequences (teacher-forced)."""
    if net.cfg.family != ENCODER_DECODER:
        return int((logits.argmax(-1) == batch["labels"]).sum()), len(batch["labels"])
    mask = batch["dec"]["attention_mask"].bool()
    hit = (logits.argmax(-1) == batch["dec"]["input_ids"]) | ~mask
    return int(hit.all(1).sum()), hit.shape[0]


@torch.inference_mode()
def evaluate_store(
    net: SideNetwork, store: ActivationStore, split: str, device: str, batch_size: int = 128
) -> float:
    net.eval()
    hits = total = 0
    for batch in store.iter_batches(split, batch_size, shuffle=False, prefetch=0):
        batch = to_device(batch, device)
        h, n = correct(net, batch, net(batch))
        hits, total = hits + h, total + n
    return hits / max(total, 1)


def build_side_network(store: ActivationStore, opts: TrainOptions) -> SideNetwork:
    from backbone_worker.cache import read_importance

    settings = store.settings
    cfg = SideConfig(
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
    )
    torch.manual_seed(opts.seed)
    net = SideNetwork(cfg)
    if cfg.projection:
        for key, matrix in store.projection_matrices().items():
            stream, name = key.split("/")
            getattr(net.streams[stream], f"projection_{name}").copy_(torch.from_numpy(matrix))
    needs_backbone = opts.init != "random" or cfg.family == ENCODER_DECODER
    if needs_backbone:
        backbone_dir = resolve(cfg.backbone)
        if fingerprint_dir(backbone_dir) != cfg.backbone_fingerprint:
            raise StoreError(
                f"the backbone files at {backbone_dir} changed since the store was cached; "
                f"re-run `ladder cache` into a new --store, or train with --init random"
            )
        if opts.init != "random":
            apply_pruning_init(net, backbone_dir, read_importance(store.location.url), opts.init)
        if cfg.family == ENCODER_DECODER:
            load_lm_head(net, backbone_dir)
    return net


CHECKPOINT = "checkpoint.pt"
METRICS_FILE = "training_metrics.json"  # written last: the training's result and its marker


def train(store_url: str, out_dir: str | Path, opts: TrainOptions, on_epoch=None) -> dict:
    """Train, keep the best validation epoch, save artifacts; returns the run's metrics.

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
    if store.settings["family"] == DECODER and opts.pooling != TrainOptions.pooling:
        warn_once(
            f"pooling {opts.pooling!r} has no effect on a decoder-only backbone: its side "
            f"network pools the last token"
        )
    net = build_side_network(store, opts).to(opts.device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=opts.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(n_train / opts.batch_size)
    total_steps = steps_per_epoch * opts.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(opts.warmup * total_steps), total_steps
    )
    # A prefetch thread overlaps reading with GPU compute; on a CPU the training step already
    # uses every core, and the thread's Python work contends for the GIL: measured on 2 cores,
    # an epoch from the store took 1.6-2.1x the in-memory epoch with the thread, 1.1-1.2x without.
    prefetch = 2 if str(opts.device).startswith("cuda") else 0
    has_validation = store.n_examples("validation") > 0
    best, best_state, history, stale = -1.0, None, [], 0
    train_seconds, seen = 0.0, 0
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
        if state["identity"] == identity:
            net.load_state_dict(state["net"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            best, best_state, history, stale = (
                state["best"],
                state["best_state"],
                state["history"],
                state["stale"],
            )
            train_seconds, seen = state["train_seconds"], state["seen"]
            log.info("resuming training after epoch %d from %s", len(history), checkpoint)
    log.info(
        "training %s side network: %d trainable parameters, %d steps",
        net.cfg.family,
        net.trainable_parameters(),
        total_steps,
    )
    with PeakMemory(opts.device) as memory:
        for epoch in range(len(history), opts.epochs if stale < opts.patience else 0):
            net.train()
            start = time.perf_counter()
            losses = []
            bar = tqdm(
                store.iter_batches(
                    "train", opts.batch_size, seed=opts.seed + epoch, prefetch=prefetch
                ),
                total=steps_per_epoch,
                desc=f"epoch {epoch + 1}/{opts.epochs}",
                leave=False,
            )
            for batch in bar:
                batch = augment(
                    to_device(batch, opts.device), opts.feature_dropout, opts.feature_noise
                )
                loss = net.loss(batch, net(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, opts.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                seen += len(batch["labels"])
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            train_seconds += time.perf_counter() - start
            # Validation batches are training-sized: a padded batch of every kept layer's states is
            # the largest allocation here (SmolLM2 validation at 128 rows: 464 MB, at 32: 232 MB).
            # Without a validation split (a tiny upload) nothing can pick an epoch, so the
            # latest one is kept: its score rises with the epoch and early stopping never fires.
            score = (
                evaluate_store(net, store, "validation", opts.device, opts.batch_size)
                if has_validation
                else float(epoch)
            )
            history.append(
                {
                    "epoch": epoch + 1,
                    "train_loss": sum(losses) / len(losses),
                    "val_accuracy": score if has_validation else None,
                }
            )
            log.info(
                "epoch %d: train loss %.4f, validation accuracy %s",
                epoch + 1,
                history[-1]["train_loss"],
                f"{score:.4f}" if has_validation else "n/a",
            )
            if score > best:
                best, stale = score, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
            out_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "identity": identity,
                    "net": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "best": best,
                    "best_state": best_state,
                    "history": history,
                    "stale": stale,
                    "train_seconds": train_seconds,
                    "seen": seen,
                },
                checkpoint.with_suffix(".tmp"),
            )
            checkpoint.with_suffix(".tmp").replace(checkpoint)  # atomic: never half a file
            if on_epoch is not None:
                on_epoch(history[-1])
            if stale >= opts.patience:
                log.info("early stop: no validation improvement for %d epochs", stale)
                break
    best_epoch = (
        next(h["epoch"] for h in history if h["val_accuracy"] == best)
        if has_validation
        else len(history)
    )
    selection = (
        f"epoch {best_epoch}, the best validation accuracy"
        if has_validation
        else f"epoch {best_epoch}, the last one: the store has no validation split to choose by"
    )
    log.info("keeping %s", selection)
    net.load_state_dict(best_state)
    save_side_model(net.cpu(), out_dir)
    n_backbone = backbone_parameter_count(net.cfg)
    result = {
        "model_dir": str(out_dir),
        "n_train": n_train,
        "epochs_run": len(history),
        "best_val_accuracy": best if has_validation else None,
        "best_epoch": best_epoch,
        "selection": selection,
        "trainable_params": net.trainable_parameters(),
        "backbone_params": n_backbone,
        "trainable_pct": 100 * net.trainable_parameters() / n_backbone,
        "train_peak_mem_mb": round(memory.peak_mb, 1),
        "train_examples_per_s": round(seen / max(train_seconds, 1e-9), 1),
        "history": history,
        "options": asdict(opts),
        "identity": identity,
    }
    # Written last and atomically: its presence says the model above is complete.
    finished.with_suffix(".tmp").write_text(json.dumps(result, indent=2) + "\n")
    finished.with_suffix(".tmp").replace(finished)
    checkpoint.unlink(missing_ok=True)
    return result


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
