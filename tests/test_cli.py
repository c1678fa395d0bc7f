"""The `ladder` CLI end to end on a tiny backbone, and its bad-input contract (exit 2, one line,
nothing stored is damaged)."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cache_argv, finetune_argv

from api import allocator
from api.cli import main
from api.jobs import resolved_hyperparameters

WORDS = {"pos": ["good", "great", "lovely", "fine"], "neg": ["bad", "awful", "sad", "poor"]}


def write_csv(path, n=120, seed=0):
    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for k in range(n):
            label = "pos" if k % 2 else "neg"
            writer.writerow([f"the ride was {rng.choice(WORDS[label])} number {k}", label])
    return str(path)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_bert_dir):
    """A tiny CSV cached once for the tests below."""
    root = tmp_path_factory.mktemp("cli")
    data = write_csv(root / "data.csv")
    store = str(root / "store")
    assert (
        main(
            [
                *cache_argv(tiny_bert_dir, data),
                "--store",
                store,
                "--layers",
                "0,2",
                "--json",
            ]
        )
        == 0
    )
    return {"root": root, "data": data, "store": store, "backbone": tiny_bert_dir}


def test_cache_info_reports_every_example_once(cached, capsys):
    code, out, _ = run(capsys, "cache-info", "--store", cached["store"], "--json")
    info = last_json(out)
    assert code == 0
    assert info["n_examples"] == info["unique_example_ids"] == 120
    # The default tier: int8, and full width here, as d/4 of the 32-wide backbone is below 64.
    assert info["layers"] == [0, 2] and info["dtype"] == "int8" and info["stored_width"] == 32
    assert info["committed_parts"] == info["total_parts"]


def test_train_evaluate_predict(cached, capsys, tmp_path):
    out_dir = str(tmp_path / "model")
    code, out, _ = run(
        capsys,
        "train",
        "--store",
        cached["store"],
        "--out",
        out_dir,
        "--epochs",
        "2",
        "--reduction",
        "4",
        "--json",
    )
    assert code == 0
    result = last_json(out)
    assert result["trainable_params"] > 0 and result["train_examples_per_s"] > 0
    # The side heads are recorded: the family's default for the width (tiny BERT, r 4: one),
    # the count a job's hyperparameters show before it runs.
    config = json.loads((Path(out_dir) / "side_config.json").read_text())
    shown = resolved_hyperparameters(cached["backbone"], {"reduction_factor": 4}, 120)
    assert config["heads"] == shown["side_heads"] == 1
    code, out, _ = run(capsys, "evaluate", "--model", out_dir, "--data", cached["data"], "--json")
    assert code == 0 and last_json(out)["n"] > 0 and 0 <= last_json(out)["accuracy"] <= 1
    code, out, _ = run(capsys, "predict", "--model", out_dir, "what a lovely ride", "--json")
    prediction = last_json(out)["predictions"][0]
    assert code == 0 and prediction["label"] in ("pos", "neg")
    assert abs(sum(prediction["scores"].values()) - 1) < 1e-4


def test_finetune_json_has_the_documented_fields(tmp_path, capsys, tiny_backbone_dir):
    data = write_csv(tmp_path / "data.csv", n=60)
    code, out, err = run(
        capsys,
        *finetune_argv(tiny_backbone_dir, data, tmp_path / "s", tmp_path / "m"),
    )
    assert code == 0, err
    result = last_json(out)
    for key in (
        "test_accuracy",
        "n_train",
        "n_test",
        "model_dir",
        "trainable_params",
        "train_peak_mem_mb",
        "train_total_mem_mb",
        "train_examples_per_s",
    ):
        assert key in result
    # The process holds at least what training added to it (which can round to 0 on a tiny model).
    assert result["train_total_mem_mb"] > 0
    assert result["train_total_mem_mb"] >= result["train_peak_mem_mb"] >= 0
    assert result["n_train"] + result["n_test"] <= 60
    # Unset --lr and --batch-size resolve to the family's defaults, and the result says which.
    family = json.loads((tmp_path / "m" / "side_config.json").read_text())["family"]
    expected = (1e-3, 16) if family == "decoder" else (3e-3, 32)
    assert (result["options"]["lr"], result["options"]["batch_size"]) == expected


def test_artifacts_record_no_machine_paths(tmp_path, capsys, tiny_bert_dir, monkeypatch):
    """A model or store built from an alias names the alias, never the directory it points to on
    this machine (transformers configs carry it as `_name_or_path`)."""
    monkeypatch.setenv("LADDER_BACKBONES", f"tiny={tiny_bert_dir}")
    data = write_csv(tmp_path / "data.csv", n=40)
    code, _, err = run(
        capsys,
        *finetune_argv("tiny", data, tmp_path / "s", tmp_path / "m"),
    )
    assert code == 0, err
    side_config = (tmp_path / "m" / "side_config.json").read_text()
    assert json.loads(side_config)["backbone"] == "tiny"
    for text in (side_config, (tmp_path / "s" / "zarr.json").read_text()):
        assert str(tiny_bert_dir) not in text and "_name_or_path" not in text


def one_line_error(code, err, *words):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("ladder ")
    assert all(w in lines[-1] for w in words), lines[-1]


def test_missing_data_file(capsys, tmp_path, tiny_bert_dir):
    code, _, err = run(
        capsys,
        *cache_argv(tiny_bert_dir, str(tmp_path / "nope.csv")),
        "--store",
        str(tmp_path / "s"),
    )
    one_line_error(code, err, "not found")
    assert not (tmp_path / "s").exists()


def test_missing_column(capsys, tmp_path, tiny_bert_dir):
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(
        capsys,
        *cache_argv(tiny_bert_dir, data),
        "--label-column",
        "sentiment",
        "--store",
        str(tmp_path / "s"),
    )
    one_line_error(code, err, "sentiment", "--label-column")


def test_a_file_without_a_text_column_names_the_flag(capsys, tmp_path, tiny_bert_dir):
    """The command line keeps its words for what the service words as a column to rename."""
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\n" + "".join(f"t{k},{k % 2}\n" for k in range(20)))
    code, _, err = run(
        capsys, *cache_argv(tiny_bert_dir, str(path)), "--store", str(tmp_path / "s")
    )
    one_line_error(code, err, "no column 'text'", "pass --text-column with one of those")


def test_single_class_label_column(capsys, tmp_path, tiny_bert_dir):
    path = tmp_path / "one.csv"
    path.write_text("text,label\nhello,a\nworld,a\n")
    code, _, err = run(
        capsys,
        *cache_argv(tiny_bert_dir, str(path)),
        "--store",
        str(tmp_path / "s"),
    )
    one_line_error(code, err, "two classes", "--label-column")


def test_empty_text(capsys, tmp_path, tiny_bert_dir):
    path = tmp_path / "empty.csv"
    path.write_text("text,label\nhello,a\n  ,b\n")
    code, _, err = run(
        capsys,
        *cache_argv(tiny_bert_dir, str(path)),
        "--store",
        str(tmp_path / "s"),
    )
    one_line_error(code, err, "empty")


def test_backbone_path_that_is_not_a_model(capsys, tmp_path):
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(capsys, *cache_argv(str(tmp_path), data), "--store", str(tmp_path / "s"))
    one_line_error(code, err, "config.json")


def test_out_of_range_layer(capsys, tmp_path, tiny_bert_dir):
    data = write_csv(tmp_path / "d.csv")
    code, _, err = run(
        capsys,
        *cache_argv(tiny_bert_dir, data),
        "--layers",
        "0,9",
        "--store",
        str(tmp_path / "s"),
    )
    one_line_error(code, err, "out of range", "--layers")


def test_store_built_with_other_settings_names_the_field(cached, capsys):
    before = sorted(p.name for p in (cached["root"] / "store").rglob("*"))
    code, _, err = run(
        capsys,
        *cache_argv(cached["backbone"], cached["data"]),
        "--layers",
        "0,2",
        "--max-length",
        "64",
        "--store",
        cached["store"],
    )
    one_line_error(code, err, "max_length")
    assert sorted(p.name for p in (cached["root"] / "store").rglob("*")) == before
    code, out, _ = run(capsys, "cache-info", "--store", cached["store"], "--json")
    assert last_json(out)["n_examples"] == 120


def test_store_with_uncommitted_parts_only(capsys, tmp_path, tiny_bert_dir):
    from backbone_worker.backbone import load_backbone
    from backbone_worker.cache import CacheOptions, make_plan, store_settings
    from backbone_worker.data import load_dataset
    from cache_store import ActivationStore

    dataset = load_dataset(write_csv(tmp_path / "d.csv"))
    backbone = load_backbone(tiny_bert_dir)
    ActivationStore.create_or_open(
        str(tmp_path / "s"),
        store_settings(backbone, dataset, [0], CacheOptions()),
        make_plan(dataset, 512),
    )
    code, _, err = run(
        capsys, "train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "m")
    )
    one_line_error(code, err, "committed", "ladder cache")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reduction", "5"], "reduction factor 5"),
        (["--reduction", "4", "--side-heads", "3"], "multiple of the 3 attention heads"),
    ],
)
def test_side_shapes_that_do_not_fit_the_backbone(cached, capsys, tmp_path, flags, message):
    out = tmp_path / "m"
    code, _, err = run(capsys, "train", "--store", cached["store"], "--out", str(out), *flags)
    one_line_error(code, err, message)
    assert not out.exists()


def test_model_dir_that_is_not_a_side_model(capsys, tmp_path):
    code, _, err = run(capsys, "predict", "--model", str(tmp_path), "hello")
    one_line_error(code, err, "side_config.json")


def _ladder(*argv, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    """The real `ladder` command line in its own process (where the allocator is chosen)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV)}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *argv],
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(
    allocator.jemalloc_library() is None,
    reason="libjemalloc is not installed (make install installs it where apt-get can)",
)
def test_the_command_line_trains_on_jemalloc_unless_told_not_to(cached, tmp_path):
    for choice, expected in (("auto", "jemalloc"), ("system", "system")):
        done = _ladder(
            "train",
            "--store",
            cached["store"],
            "--out",
            str(tmp_path / choice),
            "--epochs",
            "1",
            "--json",
            env_extra={allocator.ENV: choice},
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert last_json(done.stdout)["allocator"] == expected


def test_a_bad_allocator_choice_is_one_line_and_exit_2(tmp_path):
    done = _ladder("cache-info", "--store", str(tmp_path / "s"), env_extra={allocator.ENV: "tc"})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "LADDER_ALLOCATOR" in done.stderr


def test_the_allocator_switch_is_decided_from_the_environment(monkeypatch):
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: "/lib/libjemalloc.so.2")
    env = allocator.preload_env({"LD_PRELOAD": "/lib/other.so"})
    assert env["LD_PRELOAD"] == "/lib/libjemalloc.so.2 /lib/other.so"
    assert "MALLOC_CONF" not in env  # serving and caching keep jemalloc's own settings
    # training: one arena, and a MALLOC_CONF of the user's after it (so it wins)
    env = allocator.preload_env({}, command="train")
    assert env["MALLOC_CONF"] == allocator.TRAINING_CONF
    env = allocator.preload_env({"MALLOC_CONF": "narenas:4"}, command="finetune")
    assert env["MALLOC_CONF"] == f"{allocator.TRAINING_CONF},narenas:4"
    assert allocator.preload_env({"LD_PRELOAD": "/lib/libjemalloc.so.2"}) is None  # done once
    assert allocator.preload_env({allocator.ENV: "system"}) is None
    monkeypatch.setattr(allocator, "jemalloc_library", lambda: None)
    assert allocator.preload_env({}) is None  # auto without jemalloc: the system's
    with pytest.raises(allocator.AllocatorError, match="apt-get install libjemalloc2"):
        allocator.preload_env({allocator.ENV: "jemalloc"})


def test_train_sweeps_lists_of_settings(cached, capsys, tmp_path):
    code, out, _ = run(
        capsys,
        "train",
        "--store",
        cached["store"],
        "--out",
        str(tmp_path / "m"),
        "--epochs",
        "1",
        "--lr",
        "1e-3,1e-2",
        "--n-seeds",
        "2",
        "--json",
    )
    assert code == 0
    result = last_json(out)
    assert result["sweep"] == {"lr": [1e-3, 1e-2], "seed": [0, 1]}
    assert [(c["lr"], c["seed"]) for c in result["candidates"]] == [
        (1e-3, 0),
        (1e-3, 1),
        (1e-2, 0),
        (1e-2, 1),
    ]
    code, _, err = run(capsys, "train", "--store", cached["store"], "--out", "x", "--lr", "1e-3,2")
    assert code == 2 and "--lr 2.0 is out of range" in err and err.strip().count("\n") == 0
    # With successive halving, the lines say which configurations were halved out, and when.
    code, out, _ = run(
        capsys,
        "train",
        "--store",
        cached["store"],
        "--out",
        str(tmp_path / "h"),
        "--epochs",
        "2",
        "--lr",
        "1e-3,1e-2",
        "--n-seeds",
        "2",
        "--sweep-schedule",
        "halving",
    )
    lines = json.loads(out[out.index("{") :])["candidates"]
    assert code == 0 and sum("halved out after step" in line for line in lines) == 3
    with pytest.raises(SystemExit) as exit_:
        run(capsys, "train", "--store", cached["store"], "--out", "x", "--sweep-schedule", "half")
    assert exit_.value.code == 2 and "invalid choice: 'half'" in capsys.readouterr().err
