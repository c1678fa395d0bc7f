"""The steps of `ladder bench --task generate`, each run in its own fresh process by
bench/gen_compare.py (as bench/methods.py's are for classification).

    python -m bench.gen_methods cache CONFIG_JSON     the generative store of lst_cached (timed)
    python -m bench.gen_methods train CONFIG_JSON     one method at one setting and seed
    python -m bench.gen_methods evaluate CONFIG_JSON  greedy generations of models (or the bare
                                                      backbone: zero-shot) on a split, exact match
    python -m bench.gen_methods speed CONFIG_JSON     tokens/s of generation, side network vs the
                                                      bare backbone, batch 1 and 8, KV caches

Each prints one JSON line. Every method learns the same tokens (backbone_worker/chat.py's loss
mask: the reply and its end of turn) with the same optimizer and schedule as the classification
bench (bench.methods.train_loop: AdamW, linear decay after 6% warm-up, grad clip 1.0), keeps its
best epoch by validation loss, and differs in what it trains:
- full: every backbone weight, the tied embedding / LM head included;
- lora: rank-8 adapters on the attention query and value projections (peft), the rest frozen;
- lst_online: the side network of backbone_worker/gen_cache.py, the backbone run at every step;
- lst_cached: the same side network read from the store, the backbone never run in training.
Timed alike: examples/s over every step after the first WARMUP_STEPS, making its batch included
(rendering and tokenizing, or reading and decoding the store); time to model from the process's
start of work to the best epoch's weights; peak RSS above the post-load baseline.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F

from bench.methods import LORA_TARGETS, WARMUP_STEPS, WINDOW_BATCHES, train_loop
from side_trainer.gen_eval import lm_tensors

__all__ = ["WARMUP_STEPS"]


def load_data(cfg: dict):
    """(the --limit sample's data set: train and validation; the whole file's test split)."""
    from backbone_worker.chat import load_gen_dataset

    data = load_gen_dataset(cfg["data"], limit=cfg["limit"], seed=cfg["split_seed"])
    test = load_gen_dataset(cfg["data"], seed=cfg["split_seed"]).split("test")
    return data, test


def _size(example) -> int:
    return sum(len(m["content"]) for m in example.messages)


def length_batches(examples: list, batch_size: int, seed: int) -> list[list]:
    """bench.methods.length_batches for chats: a seeded shuffle, each window of batches sorted
    by length and cut, the batches in random order."""
    rng = random.Random(seed)
    order = list(examples)
    rng.shuffle(order)
    window = batch_size * WINDOW_BATCHES
    out = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=_size)
        batches = [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
        rng.shuffle(batches)
        out += batches
    return out


# ---- full fine-tuning and LoRA: the backbone writes through its own (tied) LM head ------------


def output_weight(backbone) -> torch.Tensor:
    """The LM head's weight as the model computes with it: the token embedding of a tied model
    (trained with it under full fine-tuning), else the checkpoint's LM head, frozen."""
    if getattr(backbone.config, "tie_word_embeddings", True):
        return backbone.model.get_input_embeddings().weight
    from side_trainer.gen_eval import frozen_head

    return frozen_head(backbone).weight


def with_adapters(backbone, rank: int):
    """Rank-`rank` LoRA adapters on the attention query and value projections (in place: the
    backbone's blocks stay where its hooks find them); returns the peft model."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(
        backbone.model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=LORA_TARGETS[backbone.family.name],
            lora_dropout=0.0,
        ),
    )


def baseline_loss(model, head_weight, ids, mask, targets, reduction: str = "mean"):
    from backbone_worker.gen_cache import IGNORE

    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # after the final norm
    chosen = targets != IGNORE
    logits = hidden[chosen] @ head_weight.T
    return F.cross_entropy(logits.float(), targets[chosen], reduction=reduction), int(chosen.sum())


def train_baseline(method: str, cfg: dict) -> dict:
    from backbone_worker.backbone import load_backbone

    device = cfg["device"]
    started = time.perf_counter()
    backbone = load_backbone(cfg["backbone"], device)
    data, _ = load_data(cfg)
    train, validation = data.split("train"), data.split("validation")
    torch.manual_seed(cfg["seed"])
    model = backbone.model
    n_backbone = sum(p.numel() for p in model.parameters())
    if method == "lora":
        model = with_adapters(backbone, cfg["lora_rank"])
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    head = output_weight(backbone)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def step(batch):
        model.train()
        ids, mask, targets = lm_tensors(backbone, batch, cfg["max_length"])
        loss, _ = baseline_loss(model, head, ids, mask, targets)
        return loss, len(batch)

    @torch.inference_mode()
    def validate() -> float:
        model.eval()
        total, terms = 0.0, 0
        for k in range(0, len(validation), 32):
            ids, mask, targets = lm_tensors(backbone, validation[k : k + 32], cfg["max_length"])
            loss, n = baseline_loss(model, head, ids, mask, targets, reduction="sum")
            total, terms = total + float(loss), terms + n
        return -total / max(terms, 1)  # train_loop keeps the highest: the lowest loss

    def state() -> dict:
        weights = dict(model.named_parameters())
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
    trainable = sum(p.numel() for p in params)
    return {
        **_as_loss(figures),
        "time_to_model_s": round(time.perf_counter() - started, 1),
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / n_backbone,
    }


def _as_loss(figures: dict) -> dict:
    """train_loop's figures with its validation score (minus the loss) back as a loss."""
    history = [-x for x in figures.pop("val_history")]
    figures.pop("val_accuracy")
    return {**figures, "valid_loss_history": history, "valid_loss": min(history)}


def load_baseline(backbone, method: str, path: str, lora_rank: int):
    """The backbone with a trained baseline's weights in place (LoRA merged into it) and the
    final norm and LM head it writes with."""
    from side_trainer.gen_eval import frozen_head

    state = torch.load(path, map_location=backbone.model.device)
    if method == "lora":
        peft_model = with_adapters(backbone, lora_rank)
        missing = set(state) - set(dict(peft_model.named_parameters()))
        if missing:
            raise KeyError(f"{path}: weights the model does not have: {sorted(missing)[:3]}")
        peft_model.load_state_dict(state, strict=False)
        peft_model.merge_and_unload()  # the LoRA products folded into the same Linear modules
    else:
        backbone.model.load_state_dict(state)
    head = frozen_head(backbone)
    model = backbone.model
    head.weight.copy_(output_weight(backbone))
    norm = getattr(model, "norm", None) or getattr(model, "final_layernorm", None)
    if norm is None:
        raise KeyError("no final norm on the backbone model")
    head.norm_weight.copy_(norm.weight)
    if getattr(norm, "bias", None) is not None:
        head.norm_bias.copy_(norm.bias)
    return head


# ---- LST: online (backbone every step) and cached (states from the store) -------------------


def train_lst(method: str, cfg: dict) -> dict:
    from backbone_worker.backbone import load_backbone
    from cache_store import ActivationStore
    from side_trainer.artifacts import save_side_model
    from side_trainer.decoding import catching
    from side_trainer.gen_eval import live_batch
    from side_trainer.generative import targets as target_ids
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
    opts = TrainOptions(seed=cfg["seed"], reduction=cfg.get("reduction", 8))
    net = build_side_network(store, opts).to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    n_train = store.n_examples("train")

    def state() -> dict:
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    if method == "lst_online":
        backbone = load_backbone(cfg["backbone"], device)
        data, _ = load_data(cfg)
        train, validation = data.split("train"), data.split("validation")
        layers = list(net.cfg.layers)

        def forward(chunk, reduction="mean"):
            ids, mask, targets = lm_tensors(backbone, chunk, cfg["max_length"])
            with torch.no_grad(), catching(backbone, layers) as states:
                backbone.run({"input_ids": ids, "attention_mask": mask})
            batch = live_batch(states, mask, targets, copy=True)
            logits = net(batch, live=True)
            loss = F.cross_entropy(logits.float(), target_ids(batch), reduction=reduction)
            return loss, len(logits)

        def step(chunk):
            net.train()
            return forward(chunk)[0], len(chunk)

        @torch.inference_mode()
        def validate() -> float:
            net.eval()
            total, terms = 0.0, 0
            for k in range(0, len(validation), 32):
                loss, n = forward(validation[k : k + 32], reduction="sum")
                total, terms = total + float(loss), terms + n
            return -total / max(terms, 1)  # train_loop keeps the highest: the lowest loss

        def epoch_batches(epoch):
            return length_batches(train, cfg["batch_size"], cfg["seed"] * 1000 + epoch)
    else:
        prefetch = 2 if device.startswith("cuda") else 0

        def step(batch):
            net.train()
            batch = to_device(batch, device)
            return net.loss(batch, net(batch)), len(batch["labels"])

        scoring = TrainOptions(batch_size=cfg["batch_size"], device=device)
        group = groups_of([net])

        def validate() -> float:
            return -evaluate_groups(group, 1, store, "validation", scoring)[1][0]

        def epoch_batches(epoch):
            return store.iter_batches(
                "train", cfg["batch_size"], seed=cfg["seed"] * 1000 + epoch, prefetch=prefetch
            )

    figures, best = train_loop(step, params, cfg, n_train, epoch_batches, validate, device, state)
    net.load_state_dict(best)
    save_side_model(net.cpu(), cfg["out"])
    trainable = net.trainable_parameters()
    return {
        **_as_loss(figures),
        "time_to_model_s": round(time.perf_counter() - started, 1),
        "trainable_params": trainable,
        "trainable_pct": 100 * trainable / backbone_parameter_count(net.cfg),
    }


# ---- the store, evaluation by generation, generation speed ----------------------------------


def cache(cfg: dict) -> dict:
    from backbone_worker.cache import CacheOptions, build_cache

    started = time.perf_counter()
    store = build_cache(
        cfg["backbone"],
        cfg["data"],
        cfg["store"],
        CacheOptions(max_length=cfg["max_length"], device=cfg["device"]),
        limit=cfg["limit"],
        seed=cfg["split_seed"],
    )
    seconds = time.perf_counter() - started
    info = store.info()
    # Tokens once: every part's stream "enc" holds one row per token (stream "lm" another).
    tokens = sum(
        store._part_attrs(i)["streams"]["enc"]["n_tokens"] for i in store.committed_parts()
    )
    return {
        "caching_seconds": round(seconds, 1),
        "n_examples": info["n_examples"],
        "n_tokens": tokens,
        "stored_bytes": info["stored_bytes"],
        "bytes_per_token": round(info["stored_bytes"] / max(tokens, 1), 1),
        "bytes_per_element": info["bytes_per_element"],
    }


def evaluate(cfg: dict) -> dict:
    """Greedy generations on `cfg["split"]` ("validation": the --limit sample's; "test": the
    whole file's) of every model in `cfg["models"]` ({key, method, path}; method "zero_shot"
    is the bare backbone): exact match, per-row correctness and loss on the reference."""
    from backbone_worker.backbone import load_backbone
    from side_trainer.artifacts import load_side_model
    from side_trainer.gen_eval import generation_report

    data, test = load_data(cfg)
    rows = test if cfg["split"] == "test" else data.split("validation")
    out = {}
    for model in cfg["models"]:
        backbone = load_backbone(cfg["backbone"], cfg["device"])  # fresh: baselines change it
        net, head = None, None
        if model["method"].startswith("lst"):
            net = load_side_model(model["path"], backbone.path).to(cfg["device"]).eval()
        elif model["method"] != "zero_shot":
            head = load_baseline(backbone, model["method"], model["path"], cfg["lora_rank"])
        started = time.perf_counter()
        report = generation_report(
            backbone, net, rows, cfg["max_length"], head=head, per_row=True, batch_size=16
        )
        out[model["key"]] = {
            "exact_match": report["exact_match"],
            "loss": report["loss"],
            "correct": report["correct"],
            "examples": report["examples"][:3],
            "seconds": round(time.perf_counter() - started, 1),
        }
    return {"n": len(rows), "models": out}


def speed(cfg: dict) -> dict:
    """Generation tokens/s of the side model in `cfg["path"]` and of the bare backbone, batch 1
    and 8, `new_tokens` each (no end token stops them), both with their KV caches; best of
    `repeats`, the two alternating."""
    from backbone_worker.backbone import load_backbone
    from backbone_worker.chat import prompt_ids
    from side_trainer.artifacts import load_side_model
    from side_trainer.decoding import Decoder, Sampling
    from side_trainer.gen_eval import frozen_head

    backbone = load_backbone(cfg["backbone"], cfg["device"])
    net = load_side_model(cfg["path"], backbone.path).to(cfg["device"]).eval()
    _, test = load_data(cfg)
    head = frozen_head(backbone)
    prompts = [prompt_ids(backbone.tokenizer, e.prompt) for e in test[:8]]
    sampling = Sampling(max_tokens=cfg["new_tokens"])
    out = {}
    for batch in (1, 8):
        best = {"backbone": math.inf, "side": math.inf}
        for _ in range(cfg["repeats"]):
            for name, nets in (("backbone", [None]), ("side", [net])):
                decoder = Decoder(backbone, head, nets, end_ids=[])
                started = time.perf_counter()
                done = decoder.generate(prompts[:batch], sampling)
                seconds = time.perf_counter() - started
                assert all(len(g.token_ids) == cfg["new_tokens"] for g in done)
                best[name] = min(best[name], seconds)
        tokens = batch * cfg["new_tokens"]
        out[f"batch_{batch}"] = {
            "backbone_tokens_per_s": round(tokens / best["backbone"], 1),
            "side_tokens_per_s": round(tokens / best["side"], 1),
            "ratio": round(best["backbone"] / best["side"], 3),
            "prompt_tokens": [len(p) for p in prompts[:batch]],
        }
    return out


def run_step(name: str, cfg: dict) -> dict:
    if name == "cache":
        return cache(cfg)
    if name == "evaluate":
        return evaluate(cfg)
    if name == "speed":
        return speed(cfg)
    if cfg["method"].startswith("lst"):
        return train_lst(cfg["method"], cfg)
    return train_baseline(cfg["method"], cfg)


def main() -> None:
    name, cfg = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    print(json.dumps(run_step(name, cfg)))


if __name__ == "__main__":
    main()
