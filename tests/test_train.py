"""The side-network training loop (side_trainer/train.py) on tiny stores."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from backbone_worker.cache import CacheOptions, build_cache
from backbone_worker.data import split_of
from side_trainer.artifacts import WEIGHTS_FILE
from side_trainer.train import CHECKPOINT, TrainOptions, train
from test_cli import write_csv


def test_without_a_validation_split_the_last_epoch_is_kept(tmp_path, tiny_bert_dir):
    """A tiny upload may have no validation rows: nothing can choose an epoch, so training runs
    every epoch, keeps the last one, and says so."""
    n = 12
    seed = next(s for s in range(1000) if all(split_of(k, s) != "validation" for k in range(n)))
    data = write_csv(tmp_path / "d.csv", n=n)
    store = str(tmp_path / "store")
    build_cache(tiny_bert_dir, data, store, CacheOptions(layers=[0, 2], fisher_examples=4),
                seed=seed)
    per_epoch = []

    def keep_epoch_weights(record):
        state = torch.load(tmp_path / "model" / CHECKPOINT, weights_only=False)["net"]
        per_epoch.append({k: v.clone() for k, v in state.items()})

    result = train(store, tmp_path / "model", TrainOptions(epochs=3, reduction=4, lr=1e-2),
                   on_epoch=keep_epoch_weights)
    assert result["epochs_run"] == 3 and result["best_epoch"] == 3
    assert result["best_val_accuracy"] is None and "no validation" in result["selection"]
    saved = load_file(tmp_path / "model" / WEIGHTS_FILE)
    assert all(torch.equal(saved[k], v) for k, v in per_epoch[-1].items())
    assert not all(torch.equal(saved[k], v) for k, v in per_epoch[0].items())
