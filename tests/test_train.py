"""The side-network training loop (side_trainer/train.py) on tiny stores."""

from __future__ import annotations

import csv
import math
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import load_file
from test_cli import write_csv

from backbone_worker.cache import CacheOptions, build_cache
from backbone_worker.data import load_dataset, split_of
from cache_store import StoreError
from side_trainer.artifacts import WEIGHTS_FILE
from side_trainer.train import CHECKPOINT, TrainOptions, train


def test_without_a_validation_split_the_last_epoch_is_kept(tmp_path, tiny_bert_dir):
    """A tiny upload may have no validation rows: nothing can choose an epoch, so training runs
    every epoch, keeps the last one, and says so."""
    n = 12
    seed = next(s for s in range(1000) if all(split_of(k, s) != "validation" for k in range(n)))
    data = write_csv(tmp_path / "d.csv", n=n)
    store = str(tmp_path / "store")
    build_cache(
        tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=4), seed=seed
    )
    per_epoch = []

    def keep_epoch_weights(record):
        saved = torch.load(tmp_path / "model" / CHECKPOINT, weights_only=False)
        state = saved["candidates"][0]["net"]
        per_epoch.append({k: v.clone() for k, v in state.items()})

    result = train(
        store,
        tmp_path / "model",
        TrainOptions(epochs=3, reduction=4, lr=1e-2),
        on_epoch=keep_epoch_weights,
    )
    assert result["epochs_run"] == 3 and result["best_epoch"] == 3
    assert result["best_val_accuracy"] is None and "no validation" in result["selection"]
    saved = load_file(tmp_path / "model" / WEIGHTS_FILE)
    assert all(torch.equal(saved[k], v) for k, v in per_epoch[-1].items())
    assert not all(torch.equal(saved[k], v) for k, v in per_epoch[0].items())


@pytest.mark.parametrize("projection", ["pca", "pool"])
def test_a_narrow_store_trains_and_serves_through_the_same_map(
    tmp_path, tiny_backbone_dir, projection
):
    """A store of width K < d holds K numbers per token and state; the saved model carries the
    map, so live predictions see what training saw (up to the store's fp16 rounding)."""
    from api.inference import JointModel
    from backbone_worker.backbone import load_backbone
    from cache_store import ActivationStore
    from side_trainer.artifacts import load_side_model

    backbone = load_backbone(tiny_backbone_dir)
    width = backbone.hidden_size // 4
    data = write_csv(tmp_path / "d.csv", n=60)
    store_url = str(tmp_path / "store")
    store = build_cache(
        tiny_backbone_dir,
        data,
        store_url,
        CacheOptions(layers=[0, 2], fisher_examples=8, width="d/4", projection=projection),
    )
    part = store.read_part(0)
    for states in (s["states"] for s in part["streams"].values()):
        assert {v.shape[1] for v in states.values()} == {width}
    assert store.info()["stored_width"] == width
    train(store_url, tmp_path / "model", TrainOptions(epochs=1, reduction=4))
    net = load_side_model(tmp_path / "model", backbone.path)
    if backbone.family.name == "encoder-decoder":
        return  # T5 scores label texts; its store path is covered by the family tests
    batch = next(ActivationStore.open(store_url).iter_batches("test", 64, shuffle=False))
    with torch.no_grad():
        from_store = net(batch).softmax(-1)
    texts = {e.id: e.text for e in load_dataset(data).examples}
    live = JointModel(backbone, [net], overlap=False).probabilities(
        [texts[i] for i in batch["example_ids"].tolist()]
    )[0]
    torch.testing.assert_close(live, from_store, atol=2e-3, rtol=0)


def test_a_width_that_does_not_fit_is_refused(tmp_path, tiny_bert_dir, capsys):
    from api.cli import main

    data = write_csv(tmp_path / "d.csv", n=30)
    for width, words in (
        ("32", "not below the state width"),
        ("d/5", "does not divide"),
        ("d/x", "positive integer, d/N or full"),
    ):
        with pytest.raises(SystemExit) if width == "d/x" else nullcontext():
            code = main(
                [
                    "cache",
                    "--backbone",
                    tiny_bert_dir,
                    "--data",
                    data,
                    "--width",
                    width,
                    "--store",
                    str(tmp_path / f"s{width.replace('/', '')}"),
                ]
            )
            assert code == 2
        assert words in capsys.readouterr().err


@pytest.fixture
def no_dropout(monkeypatch):
    """Dropout off everywhere, so a network's training is a function of its data and seed."""
    monkeypatch.setattr(torch.nn.Dropout, "forward", lambda self, x: x)
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, *a, **k: x)  # T5 attention


def test_a_sweep_trains_each_configuration_as_it_would_alone(
    tmp_path, tiny_backbone_dir, no_dropout
):
    """Configurations trained together (one pass over the store, grouped execution) follow the
    same path as each trained alone, and the best on validation is the one saved."""
    data = write_csv(tmp_path / "d.csv", n=80)
    store = str(tmp_path / "store")
    build_cache(tiny_backbone_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    # A rate too small to learn stops at its patience while the other trains on, as alone.
    rates = [1e-7, 3e-2]
    # (No collapse retries: these compare the sweep's own mechanics, which retries would mix.)
    settings = {"epochs": 4, "reduction": 4, "patience": 1, "retries": 0}
    sweep = train(store, tmp_path / "sweep", TrainOptions(lr=rates, **settings))
    assert sweep["sweep"] == {"lr": rates}
    assert [c["lr"] for c in sweep["candidates"]] == rates
    alone = [
        train(store, tmp_path / f"alone-{lr}", TrainOptions(lr=lr, **settings)) for lr in rates
    ]
    assert [len(c["history"]) for c in sweep["candidates"]] == [s["epochs_run"] for s in alone]
    for candidate, single in zip(sweep["candidates"], alone):
        assert candidate["best_val_accuracy"] == single["best_val_accuracy"]
        for a, b in zip(candidate["history"], single["history"], strict=True):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    chosen = max(range(2), key=lambda k: (alone[k]["best_val_accuracy"], -k))
    assert sweep["chosen"] == chosen and sweep["options"]["lr"] == rates[chosen]
    saved = load_file(tmp_path / "sweep" / WEIGHTS_FILE)
    expected = load_file(tmp_path / f"alone-{rates[chosen]}" / WEIGHTS_FILE)
    # Float-level agreement: fused attention's CPU kernel is not bitwise reproducible between a
    # network run alone and the same network inside a vmapped group (seen: 3e-6 after 4 epochs).
    assert all(torch.allclose(saved[k], expected[k], atol=1e-4) for k in expected)


def test_a_sweep_over_reductions_and_seeds_reports_every_candidate(tmp_path, tiny_bert_dir):
    data = write_csv(tmp_path / "d.csv", n=80)
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    epochs = []
    result = train(
        store,
        tmp_path / "model",
        TrainOptions(epochs=2, reduction=[2, 4], lr=1e-2, n_seeds=2, retries=0),
        on_epoch=epochs.append,
    )
    grid = [(c["reduction"], c["seed"]) for c in result["candidates"]]
    assert grid == [(2, 0), (2, 1), (4, 0), (4, 1)]
    assert all(len(c["history"]) == 2 for c in result["candidates"])
    # Seeds differ in their initialisation: not four copies of one run.
    assert result["candidates"][0]["history"] != result["candidates"][1]["history"]
    assert len(epochs) == 2 and all(len(e["candidates"]) == 4 for e in epochs)
    chosen = result["candidates"][result["chosen"]]
    assert result["best_val_accuracy"] == max(c["best_val_accuracy"] for c in result["candidates"])
    assert result["options"]["reduction"] == chosen["reduction"]
    from side_trainer.artifacts import load_side_model

    assert load_side_model(tmp_path / "model").cfg.reduction == chosen["reduction"]


def test_successive_halving_rounds():
    from side_trainer.train import halving_steps

    assert halving_steps(1, 100) == []
    assert halving_steps(2, 100) == [50]
    assert halving_steps(8, 64) == [8, 16, 32]
    assert halving_steps(9, 64) == [4, 8, 16, 32]  # 9, 5, 3, 2, 1
    assert halving_steps(8, 2) == [1, 1, 1]  # fewer steps than rounds: all three at step 1


def test_a_halving_sweep_keeps_the_better_half_and_its_survivor_trains_as_alone(
    tmp_path, tiny_backbone_dir, no_dropout
):
    """Successive halving: after 1/4 and 1/2 of the steps the better half on validation goes
    on, the rest stop (and cost nothing more); the last one trains to the end exactly as it
    would alone, and is the model kept when its epochs score best."""
    data = write_csv(tmp_path / "d.csv", n=80)
    store = str(tmp_path / "store")
    build_cache(tiny_backbone_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    rates = [1e-7, 1e-3, 3e-2, 1e-1]
    settings = {"epochs": 2, "reduction": 4, "batch_size": 8, "retries": 0}
    epochs = []
    sweep = train(
        store,
        tmp_path / "sweep",
        TrainOptions(lr=rates, sweep_schedule="halving", **settings),
        on_epoch=epochs.append,
    )
    total = 2 * math.ceil(sweep["n_train"] / 8)  # steps of a run: 2 epochs of batches of 8
    steps = [c["steps"] for c in sweep["candidates"]]
    assert sorted(steps) == [total // 4, total // 4, total // 2, total]
    for at in (total // 4, total // 2):  # each round: the kept scored at least the stopped
        scores = [r for c in sweep["candidates"] for r in c.get("halving", []) if r["step"] == at]
        kept = [r["val_accuracy"] for r in scores if r["kept"]]
        stopped = [r["val_accuracy"] for r in scores if not r["kept"]]
        assert len(kept) == len(stopped) and min(kept) >= max(stopped)
    survivor = steps.index(total)
    lr = rates[survivor]
    alone = train(store, tmp_path / "alone", TrainOptions(lr=lr, **settings))
    history = sweep["candidates"][survivor]["history"]
    assert [h["val_accuracy"] for h in history] == [h["val_accuracy"] for h in alone["history"]]
    for a, b in zip(history, alone["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    # The ones stopped in the first epoch have no epoch of their own, and are reported stopped.
    assert all(c["best_epoch"] is None for c in sweep["candidates"] if c["steps"] < total // 2)
    assert sum(e["stopped"] for e in epochs[-1]["candidates"]) == 3
    assert sweep["chosen"] == survivor or sweep["best_val_accuracy"] >= alone["best_val_accuracy"]


def test_a_halving_sweep_resumes_from_its_checkpoint_as_if_never_stopped(
    tmp_path, tiny_bert_dir, no_dropout
):
    data = write_csv(tmp_path / "d.csv", n=80)
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    opts = TrainOptions(
        lr=[1e-3, 3e-2, 1e-1, 1e-7],
        sweep_schedule="halving",
        epochs=3,
        reduction=4,
        batch_size=8,
        retries=0,
    )
    whole = train(store, tmp_path / "whole", opts)

    class Killed(Exception):
        pass

    def kill_after_the_first_epoch(record):
        raise Killed

    with pytest.raises(Killed):
        train(store, tmp_path / "resumed", opts, on_epoch=kill_after_the_first_epoch)
    resumed = train(store, tmp_path / "resumed", opts)
    assert [c["steps"] for c in resumed["candidates"]] == [c["steps"] for c in whole["candidates"]]
    rounds = [c.get("halving") for c in whole["candidates"]]
    assert [c.get("halving") for c in resumed["candidates"]] == rounds
    assert sum(len(r or []) for r in rounds) == 4 + 2  # two rounds: 4 scored, then 2


def test_a_sweep_without_a_validation_split_is_refused(tmp_path, tiny_bert_dir):
    n = 12
    seed = next(s for s in range(1000) if all(split_of(k, s) != "validation" for k in range(n)))
    store = str(tmp_path / "store")
    data = write_csv(tmp_path / "d.csv", n=n)
    build_cache(
        tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=4), seed=seed
    )
    with pytest.raises(StoreError, match="no validation split, and a sweep chooses"):
        train(store, tmp_path / "m", TrainOptions(epochs=1, reduction=4, lr=[1e-3, 1e-2]))


def test_micro_batches_train_as_the_whole_batch(tmp_path, tiny_backbone_dir, no_dropout):
    """A batch over the token limit runs as micro-batches whose share-weighted gradients add up
    to the whole batch's: the same losses and weights as training without a limit."""
    data = write_csv(tmp_path / "d.csv", n=60)
    store = str(tmp_path / "store")
    build_cache(tiny_backbone_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    settings = {"epochs": 2, "reduction": 4, "lr": 3e-2, "batch_size": 8}
    whole = train(store, tmp_path / "whole", TrainOptions(micro_batch_tokens=0, **settings))
    split = train(store, tmp_path / "split", TrainOptions(micro_batch_tokens=12, **settings))
    for a, b in zip(whole["history"], split["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_accuracy"] == b["val_accuracy"]
    saved, expected = (load_file(tmp_path / d / WEIGHTS_FILE) for d in ("split", "whole"))
    # A BERT key bias adds the same q.b to every score of a query, which softmax cancels: its
    # gradient is zero but for rounding, and AdamW turns that noise into lr-sized steps whose
    # sign the order of the sums decides. It is the one weight with no path to follow.
    noise = [k for k in expected if k.endswith("attention.self.key.bias")]
    assert all(torch.allclose(saved[k], expected[k], atol=1e-4) for k in expected if k not in noise)


def test_packed_training_follows_the_padded_one(tmp_path, tiny_bert_dir, no_dropout, monkeypatch):
    """A sweep whose every piece runs packed (real tokens only, through the group's vmap, and in
    validation) trains as it does padded: the same losses, scores and weights."""
    import random

    from side_trainer import packing

    rng = random.Random(0)
    data = tmp_path / "d.csv"
    with open(data, "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["text", "label"])
        for k in range(60):  # lengths from 4 to 16 words: padding in every batch
            words = " ".join(rng.choice(["fine", "awful", "ok"]) for _ in range(rng.randint(1, 13)))
            out.writerow([f"the ride was {words}", "pos" if k % 2 else "neg"])
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, str(data), store, CacheOptions(layers=[0, 2], fisher_examples=8))
    settings = {"epochs": 2, "reduction": 4, "lr": [1e-2, 3e-2], "batch_size": 8}
    packings = []
    of = packing.Packing.of
    monkeypatch.setattr(packing.Packing, "of", lambda mask: packings.append(1) or of(mask))
    results = {}
    for name, share in (("padded", 1.01), ("packed", 0.0)):  # never / always worth packing
        monkeypatch.setattr(packing, "MIN_PADDING", share)
        packings.clear()
        results[name] = train(store, tmp_path / name, TrainOptions(**settings))
        assert bool(packings) == (name == "packed")
    for a, b in zip(results["padded"]["candidates"], results["packed"]["candidates"], strict=True):
        for x, y in zip(a["history"], b["history"], strict=True):
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
            assert x["val_accuracy"] == y["val_accuracy"]
    saved, expected = (load_file(tmp_path / d / WEIGHTS_FILE) for d in ("packed", "padded"))
    # Not the attention key biases: adding one to every key shifts each query's scores by a
    # constant, which softmax ignores, so their gradient is rounding noise that Adam scales up to
    # learning-rate-sized steps, different for any other order of summation.
    compared = [k for k in expected if not k.endswith("key.bias")]
    assert len(compared) > 20
    assert all(torch.allclose(saved[k], expected[k], atol=1e-4) for k in compared)


def test_validation_runs_as_micro_batches(tmp_path, tiny_bert_dir, monkeypatch):
    """Validation decodes at most --micro-batch-tokens at a time (a split's longest text would
    otherwise set the peak), and scores as the whole batches do."""
    from cache_store import ActivationStore
    from cache_store.reader import PaddedBatch
    from side_trainer.group import groups_of
    from side_trainer.train import build_side_network, evaluate_groups

    data = write_csv(tmp_path / "d.csv", n=60)
    store_dir = str(tmp_path / "store")
    build_cache(tiny_bert_dir, data, store_dir, CacheOptions(layers=[0, 2], fisher_examples=8))
    store = ActivationStore.open(store_dir)
    torch.manual_seed(0)
    nets = [build_side_network(store, TrainOptions(init="random", reduction=4)) for _ in range(2)]
    decode = PaddedBatch.decode
    shapes: dict[int, list] = {}
    scores = {}
    for limit in (0, 12):
        shapes[limit] = []

        def watched(self, rows=slice(None), device=None, seen=shapes[limit]):
            out = decode(self, rows, device)
            seen.append(tuple(out["enc"]["attention_mask"].shape))
            return out

        monkeypatch.setattr(PaddedBatch, "decode", watched)
        opts = TrainOptions(micro_batch_tokens=limit, batch_size=8)
        scores[limit] = evaluate_groups(groups_of(nets), 2, store, "validation", opts)
    assert max(rows * length for rows, length in shapes[0]) > 12  # the limit splits batches
    assert all(rows * length <= 12 or rows == 1 for rows, length in shapes[12])
    assert scores[0][0] == scores[12][0]
    assert scores[0][1] == pytest.approx(scores[12][1], rel=1e-5)


def test_a_backbone_changed_after_caching_is_refused(tmp_path, tiny_bert_dir):
    """Training checks the backbone files against the store's fingerprint (hashed once per
    process for unchanged files): a weight file rewritten after caching is caught."""
    import shutil

    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_bert_dir, backbone)
    data = write_csv(tmp_path / "d.csv", n=30)
    store = str(tmp_path / "store")
    build_cache(str(backbone), data, store, CacheOptions(layers=[0, 2], fisher_examples=4))
    train(store, tmp_path / "m1", TrainOptions(epochs=1, reduction=4))
    weights = next(backbone.glob("*.safetensors"))
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF  # same size, one weight byte changed
    weights.write_bytes(bytes(content))
    with pytest.raises(StoreError, match="changed since the store was cached"):
        train(store, tmp_path / "m2", TrainOptions(epochs=1, reduction=4))


@pytest.fixture
def keyword_store(tmp_path, tiny_bert_dir):
    store = str(tmp_path / "store")
    data = write_csv(tmp_path / "d.csv", n=160)
    build_cache(tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=8))
    return store


def test_a_collapsed_model_is_trained_again_at_a_lower_rate_and_the_best_kept(
    tmp_path, keyword_store, monkeypatch
):
    """At lr 1.0 the tiny network predicts one class for every validation row; the retry, at
    lr 1.0 x the factor and seed 1, learns the keywords (both checked beforehand by training
    each alone); its model is the one saved."""
    import json

    import side_trainer.train as trainer
    from cache_store import ActivationStore
    from side_trainer.artifacts import load_side_model
    from side_trainer.group import groups_of
    from side_trainer.train import evaluate_groups

    monkeypatch.setattr(trainer, "RETRY_LR_FACTOR", 3e-3)
    out = tmp_path / "model"
    opts = TrainOptions(init="random", reduction=4, epochs=6, lr=1.0)
    result = train(keyword_store, out, opts)
    first, retry = result["attempts"]
    assert first["lr"] == 1.0 and "for every one of the" in first["collapsed"]
    assert retry["lr"] == pytest.approx(3e-3) and retry["seed"] == 1 and retry["collapsed"] is None
    assert result["warning"] is None
    assert result["validation"]["macro_f1"] == retry["val_macro_f1"] > 0.8
    assert result["options"]["lr"] == pytest.approx(3e-3)
    assert not (out / "retry-1").exists()
    assert json.loads((out / "training_metrics.json").read_text())["attempts"] == result["attempts"]
    # The model in `out` is the retry's: it scores the retry's validation accuracy.
    saved = groups_of([load_side_model(out)])
    store = ActivationStore.open(keyword_store)
    accuracy = evaluate_groups(saved, 1, store, "validation", TrainOptions(batch_size=8))[0][0]
    assert accuracy == retry["val_accuracy"] > first["val_accuracy"]
    # A rerun (a resumed job) finds the finished result instead of training again.
    assert train(keyword_store, out, opts)["attempts"] == result["attempts"]


def test_a_model_that_cannot_beat_the_majority_class_says_so(tmp_path, tiny_bert_dir):
    """Every row has the same text, so every prediction is one class: three attempts, then a
    warning a program can read."""
    path = tmp_path / "same.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for k in range(120):
            writer.writerow(["the ride was a ride", "neg" if k % 4 else "pos"])
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, str(path), store, CacheOptions(layers=[0, 2], fisher_examples=8))
    result = train(store, tmp_path / "model", TrainOptions(init="random", reduction=4, epochs=1))
    assert len(result["attempts"]) == 3
    assert [a["lr"] for a in result["attempts"]] == pytest.approx([3e-3, 1e-3, 1e-3 / 3])
    assert all(a["collapsed"] for a in result["attempts"])
    assert result["warning"]["code"] == "majority_class"
    assert "no better than the majority class" in result["warning"]["message"]
    assert result["validation"]["predicted_classes"] == 1
