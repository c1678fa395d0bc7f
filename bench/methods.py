"""The steps of `ladder bench`, each run in its own fresh process by bench/compare.py.

    python -m bench.methods cache CONFIG_JSON      the store of lst_cached (timed: caching cost)
    python -m bench.methods train CONFIG_JSON      one method at one learning rate and seed, its
                                                   model then scored on the whole test split
    python -m bench.methods evaluate CONFIG_JSON   the probe and the majority class on it

Each prints one JSON line on stdout. Every method trains on the same examples, epochs, batch
size, sequence length and schedule (AdamW, linear decay after 6% warm-up, grad clip 1.0), with
batches of similar lengths (each window of 16 batches sorted by length, as the store reader
does), and keeps its best epoch by validation accuracy; only the trainable parameters and the
learning rate differ.

What is timed, alike for every method:
- examples/s: every training step after WARMUP_STEPS, *including* getting its batch: tokenizing
  texts (full, LoRA, BitFit, online LST; online LST also runs the backbone) or reading and
  decoding the store (cached LST);
- time to model: from the process's start of work (loading the backbone or the store) to the
  best epoch's weights in hand, validation included; the bench adds the caching time for cached
  LST;
- memory: peak RSS above the post-load baseline and in total; on a GPU also
  torch.cuda.max_memory_allocated (side_trainer.memory).

After its clocks stop, a train step scores the model it keeps on the whole test split (which
rows it gets right, and its report): a step's record is then a whole result, and a long bench
resumes from its records on another machine (`ladder bench --workdir`) without the models. The
bench reads the test figures of the chosen rate's runs only, and chooses on validation alone.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

WARMUP_STEPS = 3
WINDOW_BATCHES = 16  # batches per length-sorting window, as cache_store.reader.BUCKET_BATCHES

# LoRA targets per family: the attention query and value projections, as in the paper's Table 5.
LORA_TARGETS = {
    "encoder": ["query", "value"],
    "decoder": ["q_proj", "v_proj"],
    "encoder-decoder": ["q", "v"],
}


class Classifier(nn.Module):
    """Backbone + pooling + a linear head: the model of full / LoRA / BitFit. Encoders pool the
    masked mean; decoder-only models the last real token (the only one that has seen them all)."""

    def __init__(self, backbone: nn.Module, width: int, n_labels: int, last_token: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(width, n_labels)
        self.last_token = last_token

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.last_token:
            from side_trainer.model import last_token

            return self.head(last_token(hidden, attention_mask))
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * m).sum(1) / m.sum(1).clamp(min=1))


def load_data(cfg: dict):
    """(the data set every method trains and chooses on, the whole data's test split). Its train
    split is the --limit sample's; its validation split the first `val_rows` of the whole
    data's (a seeded random sample of it, drawn as the test split is: a --limit sample's
    validation split is a tenth of --limit, 80 rows at 800, too few to choose on), or the
    sample's own where `val_rows` is unset."""
    from backbone_worker.data import load_dataset

    data = load_dataset(cfg["data"], limit=cfg["limit"], seed=cfg["split_seed"])
    whole = load_dataset(cfg["data"], seed=cfg["split_seed"])
    if cfg.get("val_rows"):
        data = with_validation(data, whole.split("validation")[: cfg["val_rows"]])
    return data, whole.split("test")


def with_validation(data, validation: list):
    """`data`'s training rows and `validation` (rows of the same split seed's validation split)
    as one data set, with a fingerprint of its own (its store is not the sample's)."""
    import hashlib
    from dataclasses import replace

    kept = {e.id: e for e in data.split("train") + validation}
    digest = hashlib.sha256(
        f"{data.fingerprint}:validation:{','.join(str(e.id) for e in validation)}".encode()
    ).hexdigest()
    return replace(data, examples=[kept[k] for k in sorted(kept)], fingerprint=digest)


def length_batches(examples: list, batch_size: int, seed: int) -> list[list]:
    """One epoch's batches: a seeded shuffle, then each window of WINDOW_BATCHES batches sorted
    by text length and cut, its batches in random order."""
    rng = random.Random(seed)
    order = list(examples)
    rng.shuffle(order)
    window = batch_size * WINDOW_BATCHES
    out = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda e: len(e.text))
        batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out += batches
    return out


def sorted_batches(examples: list, batch_size: int = 64) -> list[list[int]]:
    """Evaluation: indices in batches of similar lengths (order does not change accuracy)."""
    order = sorted(range(len(examples)), key=lambda k: len(examples[k].text))
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def train_loop(
    step, params, cfg: dict, n_train: int, epoch_batches, validate, device: str, state
) -> dict:
    """Train with `step(batch) -> (loss, examples)` over `epoch_batches(epoch)` (an iterable whose
    batches are made lazily, so making them is timed); after each epoch `validate()` gives the
    validation accuracy and `state()` a copy of the weights worth keeping. Returns the figures."""
    from transformers import get_linear_schedule_with_warmup

    from side_trainer.memory import PeakMemory
    from side_trainer.train import adamw

    steps = math.ceil(n_train / cfg["batch_size"]) * cfg["epochs"]
    optimizer = adamw(params, cfg["lr"])  # every method: the same optimizer
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    timed_examples, timed_seconds, n_step = 0, 0.0, 0
    history, best, best_state = [], -math.inf, None
    with PeakMemory(device) as memory:
        for epoch in range(cfg["epochs"]):
            batches = iter(epoch_batches(epoch))
            while True:
                start = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                loss, n = step(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                n_step += 1
                if n_step > WARMUP_STEPS:
                    timed_seconds += time.perf_counter() - start
                    timed_examples += n
            accuracy = validate()
            history.append(round(accuracy, 4))
            if accuracy > best:
                best, best_state = accuracy, state()
    figures = {
        "examples_per_s": round(timed_examples / max(timed_seconds, 1e-9), 1),
        "peak_mem_mb": round(memory.rss_peak_mb, 1),
        "peak_total_mb": round(memory.rss_total_mb, 1),
        "val_history": history,
        "val_accuracy": best,
        "best_epoch": history.index(round(best, 4)) + 1,
    }
    if memory.cuda:
        figures.update(
            gpu_peak_mem_mb=round(memory.peak_mb, 1), gpu_total_mb=round(memory.total_mb, 1)
        )
    return figures, best_state


# ---- full fine-tuning, LoRA, BitFit ---------------------------------------------------------


def baseline_model(method: str, backbone, n_labels: int, lora_rank: int) -> Classifier:
    """The backbone with the method's trainable parameters, under a fresh linear head."""
    model = backbone.model
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora_rank,
                lora_alpha=2 * lora_rank,
                target_modules=LORA_TARGETS[backbone.family.name],
                lora_dropout=0.0,
            ),
        )
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(method == "full" or name.endswith("bias"))
    return Classifier(
        model, backbone.hidden_size, n_labels, last_token=backbone.family.name == "decoder"
    ).to(backbone.model.device)


def tensors(backbone, chunk: list, labels: list[str], max_length: int):
    enc = backbone.tokenize([e.text for e in chunk], None, max_length)
    y = torch.tensor([labels.index(e.label) for e in chunk], device=enc["input_ids"].device)
    return enc["input_ids"], enc["attention_mask"], y


@torch.inference_mode()
def classifier_predictions(
    net: Classifier, backbone, examples: list, labels: list[str], max_length: int
) -> list[str]:
    """The predicted label of each example, in the examples' order."""
    net.eval()
    predicted = [""] * len(examples)
    for idx in sorted_batches(examples):
        ids, mask, _ = tensors(backbone, [examples[k] for k in idx], labels, max_length)
        for k, p in zip(idx, net(ids, mask).argmax(-1).tolist()):
            predicted[k] = labels[p]
    return predicted


def classifier_correct(
    net: Classifier, backbone, examples: list, labels: list[str], max_length: int
) -> list[bool]:
    predicted = classifier_predictions(net, backbone, examples, labels, max_length)
    return [p == e.label for p, e in zip(predicted, examples)]


def train_baseline(method: str, cfg: dict) -> dict:
    from backbone_worker.backbone import load_backbone

    device = cfg["device"]
    started = time.perf_counter()
    backbone = load_backbone(cfg["backbone"], device)
    data, _ = load_data(cfg)
    train, validation = data.split("train"), data.split("validation")
    torch.manual_seed(cfg["seed"])
    net = baseline_model(method, backbone, len(data.labels), cfg["lora_rank"])
    params = [p for p in net.parameters() if p.requires_grad]
    names = [n for n, p in net.named_parameters() if p.requires_grad]

    def step(batch):
        net.train()
        ids, mask, y = tensors(backbone, batch, data.labels, cfg["max_length"])
        return F.cross_entropy(net(ids, mask), y), len(y)

    def validate() -> float:
        hits = classifier_correct(net, backbone, validation, data.labels, cfg["max_length"])
        return sum(hits) / max(len(hits), 1)

    def state() -> dict:
        weights = dict(net.named_parameters())
        return {n: weights[n].detach().cpu().clone() for n in names}

    figures, best = train_loop(
        step,
        params,
        cfg,
        len(train),
        lambda epoch: length_batches(train, cfg["batch_size"], cfg["seed"] * 1000 + epoch),
        validate,
        device,
        state,
    )
    torch.save(best, cfg["out"])
    time_to_model = round(time.perf_counter() - started, 1)
    with torch.no_grad():
        weights = dict(net.named_parameters())
        for name in names:
            weights[name].copy_(best[name])
    _, test = load_data(cfg)
    predicted = classifier_predictions(net, backbone, test, data.labels, cfg["max_length"])
    n_backbone = sum(p.numel() for n, p in backbone.model.named_parameters() if "lora_" not in n)
    trainable = sum(p.numel() for p in params)
    return {
        **figures,
        "time_to_model_s": time_to_model,
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / n_backbone,
        **classifier_test_result(test, predicted, data.labels),
    }


def classifier_test_result(test: list, predicted: list[str], labels: list[str]) -> dict:
    from side_trainer.metrics import confusion, report

    index = {label: k for k, label in enumerate(labels)}
    return test_result(
        [p == e.label for p, e in zip(predicted, test)],
        report(
            confusion([index[e.label] for e in test], [index[p] for p in predicted], len(labels)),
            labels,
        ),
    )


def test_result(hits: list[bool], report: dict) -> dict:
    """A model's test figures as a step records them: which rows it got right (hex of the
    packed bits, in the test split's order) and its report (side_trainer.metrics.report)."""
    return {
        "test_correct": np.packbits(np.asarray(hits, dtype=bool)).tobytes().hex(),
        "test_report": report,
    }


# ---- LST: online (backbone every step) and cached (states from the store) -------------------


def train_lst(method: str, cfg: dict) -> dict:
    from backbone_worker.backbone import load_backbone
    from cache_store import ActivationStore
    from side_trainer.artifacts import save_side_model
    from side_trainer.group import groups_of
    from side_trainer.train import (
        TrainOptions,
        backbone_parameter_count,
        build_side_network,
        evaluate_groups,
        to_device,
    )

    device = cfg["device"]
    started = time.perf_counter()
    store = ActivationStore.open(cfg["store"])
    importance = None
    if method == "lst_online":
        # Online LST starts from the Fisher importance as cached LST does, and pays for its own
        # pass here (cached LST's is in its caching time).
        backbone = load_backbone(cfg["backbone"], device)
        data, _ = load_data(cfg)
        begun = time.perf_counter()
        importance = fisher_importance(backbone, data, store.settings["layers"], cfg)
        importance_s = round(time.perf_counter() - begun, 1)
    options = TrainOptions(init="fisher", seed=cfg["seed"])
    net = build_side_network(store, options, importance).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    n_train = store.n_examples("train")

    def state() -> dict:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    if method == "lst_online":
        from api.inference import JointModel

        train, validation = data.split("train"), data.split("validation")

        def step(chunk):
            net.train()
            enc = backbone.tokenize([e.text for e in chunk], None, cfg["max_length"])
            states = backbone.ladder_states(net.cfg.layers, enc)["enc"]
            # Made outside inference mode, the copies can be saved for the side's backward.
            states = {k: v.clone() for k, v in net.project_states("enc", states).items()}
            batch = {
                "enc": {"states": states, "attention_mask": enc["attention_mask"]},
                "labels": torch.tensor([data.labels.index(e.label) for e in chunk], device=device),
            }
            return net.loss(batch, net(batch)), len(chunk)

        def validate() -> float:
            net.eval()
            hits = joint_correct(JointModel(backbone, [net], overlap=False), validation)[0]
            return hits.float().mean().item()

        def epoch_batches(epoch):
            return length_batches(train, cfg["batch_size"], cfg["seed"] * 1000 + epoch)
    else:
        prefetch = 2 if device.startswith("cuda") else 0

        def step(batch):
            net.train()
            batch = to_device(batch, device)
            return net.loss(batch, net(batch)), len(batch["labels"])

        scoring = TrainOptions(batch_size=cfg["batch_size"], device=device)
        group = groups_of([net])  # a group of one runs the network as it is

        def validate() -> float:
            return evaluate_groups(group, 1, store, "validation", scoring)[0][0]

        def epoch_batches(epoch):
            return store.iter_batches(
                "train", cfg["batch_size"], seed=cfg["seed"] * 1000 + epoch, prefetch=prefetch
            )

    figures, best = train_loop(step, params, cfg, n_train, epoch_batches, validate, device, state)
    net.load_state_dict(best)
    save_side_model(net.cpu(), cfg["out"])
    time_to_model = round(time.perf_counter() - started, 1)
    trainable = net.trainable_parameters()
    return {
        **figures,
        "time_to_model_s": time_to_model,
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / backbone_parameter_count(net.cfg),
        # online LST's own Fisher pass, inside its time to model
        **({"importance_s": importance_s} if importance is not None else {}),
        **lst_test_result(cfg, cfg["out"]),
    }


def lst_test_result(cfg: dict, path: str) -> dict:
    """test_result of a saved side model, through the live backbone as it is served."""
    from api.inference import JointModel
    from api.inference import evaluate as evaluate_joint
    from backbone_worker.backbone import load_backbone
    from side_trainer.artifacts import load_side_model

    _, test = load_data(cfg)
    side = load_side_model(path).to(cfg["device"])
    joint = JointModel(load_backbone(cfg["backbone"], cfg["device"]), [side])
    scored = evaluate_joint(joint, test)
    return test_result(scored["correct"][0], scored["reports"][0])


def budget(cfg: dict) -> dict:
    """Cached LST given the wall-clock time full fine-tuning takes to its model (`cfg["budget_s"]`,
    the store's caching already taken off): side networks at the chosen rate (`cfg["lr"]`), each
    from a seed of its own, each trained `cfg["budget_epochs"]` epochs keeping its best epoch by
    validation, one after another while the next is expected to fit; the model is their average
    (of probabilities), as one backbone pass serves them all. Timed as a train step is; the
    ensemble's test figures after the clock stops."""
    from api.inference import JointModel
    from backbone_worker.backbone import load_backbone
    from cache_store import ActivationStore
    from side_trainer.train import TrainOptions, build_side_network, to_device

    device = cfg["device"]
    started = time.perf_counter()
    store = ActivationStore.open(cfg["store"])
    n_train = store.n_examples("train")
    run_cfg = {**cfg, "epochs": cfg["budget_epochs"]}
    nets, figures, last = [], [], 0.0
    while not nets or time.perf_counter() - started + last <= cfg["budget_s"]:
        begun = time.perf_counter()
        seed = cfg["seed"] * 1000 + len(nets)
        net = build_side_network(store, TrainOptions(init="fisher", seed=seed)).to(device)
        params = [p for p in net.parameters() if p.requires_grad]

        def step(batch, net=net):
            net.train()
            batch = to_device(batch, device)
            return net.loss(batch, net(batch)), len(batch["labels"])

        def validate(net=net) -> float:
            return float(validation_hits([net], store, cfg)[0][0].mean())

        def state(net=net) -> dict:
            return {k: v.detach().clone() for k, v in net.state_dict().items()}

        def epoch_batches(epoch, seed=seed):
            return store.iter_batches("train", cfg["batch_size"], seed=seed * 1000 + epoch)

        result, best = train_loop(
            step, params, run_cfg, n_train, epoch_batches, validate, device, state
        )
        net.load_state_dict(best)
        nets.append(net.eval())
        figures.append(result)
        last = time.perf_counter() - begun
    per_net, averaged = validation_hits(nets, store, cfg)
    time_to_model = round(time.perf_counter() - started, 1)
    data, test = load_data(cfg)
    joint = JointModel(load_backbone(cfg["backbone"], device), nets)
    predicted = [""] * len(test)
    with torch.inference_mode():
        for idx in sorted_batches(test):
            probs = joint.probabilities([test[k].text for k in idx])
            for k, p in zip(idx, torch.stack(probs).mean(0).argmax(-1).tolist()):
                predicted[k] = nets[0].cfg.labels[p]
    return {
        "networks": len(nets),
        "epochs": cfg["budget_epochs"],
        "val_accuracy": float(averaged.mean()),
        "val_accuracy_networks": [round(float(h.mean()), 4) for h in per_net],
        "examples_per_s": round(sum(f["examples_per_s"] for f in figures) / len(figures), 1),
        "peak_mem_mb": max(f["peak_mem_mb"] for f in figures),
        "peak_total_mb": max(f["peak_total_mb"] for f in figures),
        "time_to_model_s": time_to_model,
        "budget_s": cfg["budget_s"],
        **classifier_test_result(test, predicted, data.labels),
    }


def validation_hits(nets: list, store, cfg: dict) -> tuple[list, np.ndarray]:
    """Which stored validation rows each network gets right ((N,) bool each), and which the
    networks' averaged probabilities get right, the split read once."""
    from side_trainer.train import to_device

    per_net, averaged = [[] for _ in nets], []
    with torch.inference_mode():
        for batch in store.iter_batches("validation", cfg["batch_size"], shuffle=False):
            batch = to_device(batch, cfg["device"])
            probs = [F.softmax(net.eval()(batch).float(), -1) for net in nets]
            for hits, p in zip(per_net, probs):
                hits.append((p.argmax(-1) == batch["labels"]).cpu().numpy())
            mean = torch.stack(probs).mean(0)
            averaged.append((mean.argmax(-1) == batch["labels"]).cpu().numpy())
    return [np.concatenate(h) for h in per_net], np.concatenate(averaged)


def fisher_importance(backbone, data, layers: list[int], cfg: dict) -> dict:
    """The importance scores `ladder cache` writes beside a store (the Fisher pass and the
    weights' magnitudes), computed here with the cache step's settings."""
    import tempfile

    from backbone_worker.cache import CacheOptions, read_importance, write_importance

    with tempfile.TemporaryDirectory() as scratch:
        opts = CacheOptions(max_length=cfg["max_length"])
        write_importance(scratch, backbone, data, layers, opts)
        return read_importance(scratch)


def read_timings(store, batch_size: int, device: str = "cpu", repeats: int = 10) -> tuple:
    """Seconds of one epoch of a side network from batches already in memory and of the same
    epoch from the store (best of `repeats` each, alternating: a quick-store epoch is under a
    second, and on a shared 2-core machine a single pair varies by 10% or more)."""
    from bench.cache_bench import epoch_seconds
    from side_trainer.train import TrainOptions, build_side_network

    net = build_side_network(store, TrainOptions(init="random")).to(device).train()
    in_memory = list(store.iter_batches("train", batch_size, seed=0))
    epoch_seconds(net, in_memory[:3], device)
    memory_s = store_s = float("inf")
    prefetch = 2 if device == "cuda" else 0  # what the trainer uses (side_trainer/train.py)
    for _ in range(repeats):
        memory_s = min(memory_s, epoch_seconds(net, in_memory, device))
        batches = store.iter_batches("train", batch_size, seed=0, prefetch=prefetch)
        store_s = min(store_s, epoch_seconds(net, batches, device))
    return memory_s, store_s


def read_path(cfg: dict) -> dict:
    """The cost of reading and decoding the store: an epoch from it over the same epoch from
    memory (read_timings)."""
    from cache_store import ActivationStore

    store = ActivationStore.open(cfg["store"])
    memory_s, store_s = read_timings(store, cfg["batch_size"], cfg["device"])
    return {"read_vs_memory": round(store_s / memory_s, 3)}


SWEEPS = ("single", "k8", "k8_halving")


def sweep(cfg: dict) -> dict:
    """Seconds of `ladder train` (side_trainer.train, everything it does: building the networks
    from the backbone's pruned weights, reading the store, validation) for `cfg["sweep"]`: one
    configuration ("single"), or a sweep of 8 (4 learning rates x 2 seeds) trained in lockstep,
    same epochs, every configuration trained to the end ("k8") or with successive halving
    ("k8_halving"); with the validation accuracy of the model it keeps and its peak memory. Each
    kind runs in a process of its own (bench/compare.py): a peak above the process's start is
    only comparable between runs that start alike."""
    import tempfile

    from side_trainer.train import TrainOptions, train

    rates = [3e-4, 1e-3, 3e-3, 1e-2]
    common = {"epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "device": cfg["device"]}
    name = cfg["sweep"]
    opts = {
        "single": TrainOptions(lr=1e-3, **common),
        "k8": TrainOptions(lr=rates, n_seeds=2, **common),
        "k8_halving": TrainOptions(lr=rates, n_seeds=2, sweep_schedule="halving", **common),
    }[name]
    out = {}
    with tempfile.TemporaryDirectory() as model_dir:
        started = time.perf_counter()
        result = train(cfg["store"], model_dir, opts)
        out[f"{name}_s"] = round(time.perf_counter() - started, 2)
        out[f"{name}_peak_mem_mb"] = result["train_peak_mem_mb"]
        out[f"{name}_val_accuracy"] = result["best_val_accuracy"]
        out[f"{name}_pid"] = os.getpid()  # its own process (bench/compare.py's test)
        if "candidates" in result:  # which it kept, and the steps all candidates trained
            out[f"{name}_chosen"] = {k: result["options"][k] for k in ("lr", "seed")}
            out[f"{name}_steps"] = sum(c["steps"] for c in result["candidates"])
    return out


def joint_correct(joint, examples: list) -> torch.Tensor:
    """(n_sides, N) bool: each side model's correctness on each example, through the live
    backbone (as the model is served)."""
    from api.inference import evaluate

    return torch.tensor(evaluate(joint, examples)["correct"])


# ---- caching, and evaluation on the whole test split ----------------------------------------


def cache(cfg: dict) -> dict:
    from backbone_worker.cache import CacheOptions, build_cache

    started = time.perf_counter()
    data, _ = load_data(cfg)
    store = build_cache(
        cfg["backbone"],
        data,
        cfg["store"],
        CacheOptions(max_length=cfg["max_length"], device=cfg["device"]),
    )
    seconds = time.perf_counter() - started
    info = store.info()
    return {
        "caching_seconds": round(seconds, 1),
        "n_examples": info["n_examples"],
        "bytes_per_element": info["bytes_per_element"],
        "compression_ratio": info["compression_ratio"],
        "stored_bytes": info["stored_bytes"],
    }


def evaluate(cfg: dict) -> dict:
    """The baselines on the whole test split: the majority class of the training rows and a
    linear probe tuned on validation (each method's models score the test split in their own
    train steps)."""
    from backbone_worker.backbone import load_backbone

    data, test = load_data(cfg)
    backbone = load_backbone(cfg["backbone"], cfg["device"])
    train_labels = [e.label for e in data.split("train")]
    majority = max(sorted(set(train_labels)), key=train_labels.count)
    return {
        "n_test": len(test),
        "n_validation": len(data.split("validation")),
        "probe": probe(backbone, data, test, cfg["max_length"]),
        "majority": {
            "label": majority,
            "test_accuracy": sum(e.label == majority for e in test) / len(test),
        },
    }


PROBE_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)


def probe(backbone, data, test: list, max_length: int) -> dict:
    """A linear probe on the frozen backbone's pooled last-layer features, its weight decay
    chosen on validation."""
    from backbone_worker.importance import pooled_features, train_probe

    splits = {"train": data.split("train"), "validation": data.split("validation"), "test": test}
    feats = {
        k: pooled_features(backbone, [e.text for e in v], None, max_length)
        for k, v in splits.items()
    }
    targets = {k: torch.tensor([data.labels.index(e.label) for e in v]) for k, v in splits.items()}
    mean, std = feats["train"].mean(0), feats["train"].std(0).clamp(min=1e-6)
    feats = {k: (v - mean) / std for k, v in feats.items()}

    def accuracy(model, split):
        with torch.no_grad():
            return (model(feats[split]).argmax(-1) == targets[split]).float().mean().item()

    torch.manual_seed(0)
    fitted = {
        wd: train_probe(feats["train"], targets["train"], len(data.labels), wd)
        for wd in PROBE_WEIGHT_DECAYS
    }
    val = {wd: accuracy(model, "validation") for wd, model in fitted.items()}
    chosen = max(PROBE_WEIGHT_DECAYS, key=lambda wd: (val[wd], wd))
    with torch.no_grad():
        hits = (fitted[chosen](feats["test"]).argmax(-1) == targets["test"]).tolist()
    return {
        "weight_decay": chosen,
        "weight_decay_grid": list(PROBE_WEIGHT_DECAYS),
        "val_accuracy": val[chosen],
        "test_accuracy": sum(hits) / len(hits),
        "correct": hits,
    }


def main() -> None:
    step, cfg = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    if step == "cache":
        result = cache(cfg)
    elif step == "evaluate":
        result = evaluate(cfg)
    elif step == "sweep":
        result = sweep(cfg)
    elif step == "budget":
        result = budget(cfg)
    elif step == "read_path":
        result = read_path(cfg)
    elif cfg["method"].startswith("lst"):
        result = train_lst(cfg["method"], cfg)
    else:
        result = train_baseline(cfg["method"], cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
