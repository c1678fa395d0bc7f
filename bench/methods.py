"""One fine-tuning method, run in its own process by `ladder bench` (bench/compare.py).

    python -m bench.methods METHOD CONFIG_JSON   ->  one JSON line on stdout

Every method sees the same examples, batches (seeded order), sequence length, epochs and
optimizer (AdamW, linear decay with 6% warm-up, grad clip 1.0); only the trainable parameters
and the learning rate differ. Peak memory is measured the same way for every method: on a CPU
the peak RSS above the process's RSS after imports and data loading (side_trainer.memory); on a
GPU torch.cuda.max_memory_allocated. Speed is examples/s over the steps after WARMUP_STEPS.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

WARMUP_STEPS = 3

# Learning rates per method (not swept per run: a sweep multiplies the run time). Full fine-tuning
# and the PEFT baselines use the usual values for models of this size; LST uses the trainer's
# default for the backbone's family (None here): the paper's 3e-3, or 1e-3 for decoder-only models.
LEARNING_RATES = {"full": 5e-5, "lora": 5e-4, "bitfit": 1e-3, "lst_online": None,
                  "lst_cached": None}


# LoRA targets per family: the attention query and value projections, as in the paper's Table 5.
LORA_TARGETS = {"encoder": ["query", "value"], "decoder": ["q_proj", "v_proj"],
                "encoder-decoder": ["q", "v"]}


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


def batches(tokenized: dict, indices: list[int], batch_size: int, seed: int):
    order = list(indices)
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids = [tokenized["input_ids"][k] for k in idx]
        t = max(len(x) for x in ids)
        input_ids = torch.zeros(len(idx), t, dtype=torch.long)
        mask = torch.zeros(len(idx), t, dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, :len(x)] = torch.tensor(x)
            mask[row, :len(x)] = 1
        yield input_ids, mask, torch.tensor([tokenized["labels"][k] for k in idx])


def optimise(params, lr: float, total_steps: int):
    from transformers import get_linear_schedule_with_warmup
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, get_linear_schedule_with_warmup(optimizer, int(0.06 * total_steps), total_steps)


def run_epochs(step, params, cfg: dict, n_train: int, make_batches, device: str) -> dict:
    """Train with `step(batch) -> (loss, examples)`; returns timing and memory."""
    from side_trainer.memory import PeakMemory
    steps_per_epoch = math.ceil(n_train / cfg["batch_size"])
    optimizer, scheduler = optimise(params, cfg["lr"], steps_per_epoch * cfg["epochs"])
    timed_examples, timed_seconds, n_step = 0, 0.0, 0
    with PeakMemory(device) as memory:
        for epoch in range(cfg["epochs"]):
            for batch in make_batches(epoch):
                start = time.perf_counter()
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
    return {"peak_mem_mb": round(memory.peak_mb, 1),
            "examples_per_s": round(timed_examples / max(timed_seconds, 1e-9), 1)}


def baseline(method: str, cfg: dict) -> dict:
    """full, lora or bitfit on the backbone itself."""
    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    device = cfg["device"]
    backbone = load_backbone(cfg["backbone"], device)
    data = load_dataset(cfg["data"], limit=cfg["limit"], seed=cfg["seed"])
    texts = [e.text for e in data.examples]
    tokenized = backbone.tokenizer(texts, truncation=True, max_length=cfg["max_length"])
    tokenized = {"input_ids": tokenized["input_ids"],
                 "labels": [data.labels.index(e.label) for e in data.examples]}
    position = {e.id: k for k, e in enumerate(data.examples)}
    train_idx = [position[e.id] for e in data.split("train")]
    test_idx = [position[e.id] for e in data.split("test")]
    model = backbone.model
    model.train()
    torch.manual_seed(cfg["seed"])
    if method == "lora":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"],
                                                 target_modules=LORA_TARGETS[backbone.family.name],
                                                 lora_dropout=0.0))
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(method == "full" or name.endswith("bias"))
    net = Classifier(model, backbone.hidden_size, len(data.labels),
                     last_token=backbone.family.name == "decoder").to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    n_backbone = sum(p.numel() for n, p in backbone.model.named_parameters() if "lora_" not in n)

    def step(batch):
        ids, mask, labels = (x.to(device) for x in batch)
        return F.cross_entropy(net(ids, mask), labels), len(labels)

    stats = run_epochs(step, params, cfg, len(train_idx),
                       lambda e: batches(tokenized, train_idx, cfg["batch_size"], cfg["seed"] + e),
                       device)
    net.eval()
    hits = 0
    with torch.inference_mode():
        for ids, mask, labels in batches(tokenized, test_idx, 64, 0):
            hits += int((net(ids.to(device), mask.to(device)).argmax(-1).cpu() == labels).sum())
    trainable = sum(p.numel() for p in params)
    return {**stats, "trainable_params": trainable, "trainable_pct": 100 * trainable / n_backbone,
            "test_accuracy": hits / len(test_idx), "lr": cfg["lr"]}


def lst(method: str, cfg: dict) -> dict:
    """lst_online (backbone forward every step) or lst_cached (states read from the store)."""
    from api.inference import JointModel, evaluate
    from backbone_worker.data import load_dataset
    from cache_store import ActivationStore
    from side_trainer.train import TrainOptions, build_side_network, to_device
    device = cfg["device"]
    store = ActivationStore.open(cfg["store"])
    data = load_dataset(cfg["data"], limit=cfg["limit"], seed=cfg["seed"])
    from side_trainer.train import FAMILY_DEFAULTS
    cfg["lr"] = cfg["lr"] or FAMILY_DEFAULTS[store.settings["family"]]["lr"]
    opts = TrainOptions(init="fisher", lr=cfg["lr"], seed=cfg["seed"], device=device)
    net = build_side_network(store, opts).to(device)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    n_train = store.n_examples("train")
    backbone = None
    if method == "lst_online":
        from backbone_worker.backbone import load_backbone
        backbone = load_backbone(cfg["backbone"], device)
        train = data.split("train")

        def make_batches(epoch):
            order = list(range(len(train)))
            random.Random(cfg["seed"] + epoch).shuffle(order)
            for start in range(0, len(order), cfg["batch_size"]):
                chunk = [train[k] for k in order[start:start + cfg["batch_size"]]]
                yield chunk

        def step(chunk):
            enc = backbone.tokenize([e.text for e in chunk], None, cfg["max_length"])
            states = backbone.ladder_states(net.cfg.layers, enc)["enc"]
            # Made outside inference mode, the copies can be saved for the side's backward.
            states = {k: v.clone() for k, v in states.items()}
            batch = {"enc": {"states": states, "attention_mask": enc["attention_mask"]},
                     "labels": torch.tensor([data.labels.index(e.label) for e in chunk],
                                            device=device)}
            return net.loss(batch, net(batch)), len(chunk)

        stats = run_epochs(step, params, cfg, n_train, make_batches, device)
    else:
        prefetch = 2 if device.startswith("cuda") else 0

        def step(batch):
            batch = to_device(batch, device)
            return net.loss(batch, net(batch)), len(batch["labels"])

        stats = run_epochs(step, params, cfg, n_train,
                           lambda e: store.iter_batches("train", cfg["batch_size"],
                                                        seed=cfg["seed"] + e, prefetch=prefetch),
                           device)
    net.eval()
    if backbone is None:
        from backbone_worker.backbone import load_backbone
        backbone = load_backbone(cfg["backbone"], device)
    # Test accuracy through the live backbone, as the model is served (not from the fp16 cache).
    accuracy = evaluate(JointModel(backbone, [net]), data.split("test"))["accuracy"][0]
    n_backbone = sum(p.numel() for p in backbone.model.parameters())
    trainable = net.trainable_parameters()
    return {**stats, "trainable_params": trainable, "trainable_pct": 100 * trainable / n_backbone,
            "test_accuracy": accuracy, "lr": cfg["lr"]}


def main() -> None:
    method, cfg = sys.argv[1], json.loads(sys.argv[2])
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    cfg["lr"] = LEARNING_RATES[method]
    result = lst(method, cfg) if method.startswith("lst") else baseline(method, cfg)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
