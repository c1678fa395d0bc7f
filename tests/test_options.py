"""Every setting is declared once (backbone_worker/options.py, side_trainer/options.py) and every
layer that exposes settings - the local CLI, the HTTP job hyperparameters, the remote CLI, the
job runner's mapping - is built from the declarations: these tests fail if a layer is left
behind or disagrees."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from api import hyperparameters
from api.cli import build_parser
from backbone_worker.options import CacheOptions, OptionError, auto_width, settings, stored_width
from side_trainer.options import INITS, POOLINGS, TrainOptions


def _flags(parser: argparse.ArgumentParser, *path: str) -> dict[str, argparse.Action]:
    for name in path:
        parser = next(
            a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
        ).choices[name]
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_every_declared_setting_has_its_flag_on_the_local_cli():
    parser = build_parser()
    for command, classes in (
        ("cache", [CacheOptions]),
        ("train", [TrainOptions]),
        ("finetune", [CacheOptions, TrainOptions]),
    ):
        flags = _flags(parser, command)
        for cls in classes:
            for name, default, s in settings(cls):
                flag = s.flag_for(name)
                if flag is None:
                    continue
                assert flag in flags, (command, flag)
                action = flags[flag]
                assert action.default == default or (name == "device" and cls is TrainOptions)
                if s.choices is not None:
                    assert set(action.choices) == {c for c in s.choices if c is not None}


def test_every_hyperparameter_is_in_the_http_model_and_the_remote_cli():
    fields = hyperparameters.Hyperparameters.model_fields
    remote = _flags(build_parser(), "jobs", "create")
    declared = hyperparameters.declared()
    assert {s.http for *_, s in declared} == set(fields)
    for *_, s in declared:
        assert fields[s.http].default == "auto"
        flag = "--" + s.http.replace("_", "-")
        assert flag in remote, flag
        if s.choices is not None:
            assert set(remote[flag].choices) == {"auto", *(c for c in s.choices if c is not None)}
            schema = json.dumps(
                hyperparameters.Hyperparameters.model_json_schema()["properties"][s.http]
            )
            assert all(str(c) in schema for c in s.choices if c is not None), (s.http, schema)


def test_http_hyperparameters_map_to_the_options_and_back():
    given = {
        "n_epochs": 4,
        "learning_rate": 2e-3,
        "reduction_factor": 4,
        "kept_layers": [0, 2],
        "init": "magnitude",
        "pooling": "first",
        "cache_dtype": "int8",
        "cache_width": "d/4",
        "cache_projection": "pool",
    }
    resolved = hyperparameters.resolve(given, 5000, "encoder", [0, 1, 2], 384, {4: 6}.get)
    assert resolved["batch_size"] == 32  # "auto": the family's default
    cache, train = hyperparameters.options(resolved, device="cpu", seed=7)
    assert (train.epochs, train.lr, train.reduction, train.init, train.pooling, train.seed) == (
        4,
        2e-3,
        4,
        "magnitude",
        "first",
        7,
    )
    assert (cache.layers, cache.dtype, cache.width, cache.projection) == (
        [0, 2],
        "int8",
        "d/4",
        "pool",
    )
    again = {
        s.http: getattr(cache if cls is CacheOptions else train, name)
        for cls, name, _, s in hyperparameters.declared()
    }
    assert again == {**resolved, "cache_width": "d/4"}
    # "auto": the default tier, d/4 where that leaves 64 numbers per state, else full width.
    wide, narrow = (
        hyperparameters.resolve({}, 100, "decoder", [2], d, lambda r: 9) for d in (576, 128)
    )
    assert (wide["cache_width"], narrow["cache_width"]) == ("d/4", "full")
    assert wide["cache_dtype"] == "int8" and wide["learning_rate"] == 1e-3
    assert hyperparameters.options(narrow)[0].width == "full"


def test_auto_side_heads_are_the_familys_count_at_the_jobs_reduction_factor():
    """What the trainer takes for unset heads, resolved before the job runs; a sweep over
    reduction factors leaves each configuration its own count."""
    counts = {4: 6, 8: 3}  # MiniLM's: heads 16 wide at r 4 and r 8

    def resolve(hp: dict) -> dict:
        return hyperparameters.resolve(hp, 100, "encoder", [3, 4, 5], 384, counts.__getitem__)

    assert resolve({})["side_heads"] == 3  # r 8, the default
    assert resolve({"reduction_factor": 4})["side_heads"] == 6
    assert resolve({"reduction_factor": 4, "side_heads": 2})["side_heads"] == 2
    assert resolve({"reduction_factor": [4, 8]})["side_heads"] is None
    _, train = hyperparameters.options(resolve({"reduction_factor": 4}))
    assert train.side_heads == 6


def test_settings_out_of_range_are_refused_where_they_are_made(capsys):
    with pytest.raises(OptionError, match="--pooling 'max-ish' is not one of"):
        TrainOptions(pooling="max-ish")
    with pytest.raises(OptionError, match="--lr 0 is out of range; it must be above 0"):
        TrainOptions(lr=0)
    with pytest.raises(OptionError, match="--workers 0 is out of range"):
        CacheOptions(workers=0)
    with pytest.raises(OptionError, match="--micro-batch-tokens -5 is out of range"):
        TrainOptions(micro_batch_tokens=-5)
    from api.cli import main

    code = main(["train", "--store", "s", "--out", "m", "--warmup", "2"])
    assert code == 2 and "--warmup 2.0 is out of range" in capsys.readouterr().err


def test_an_option_error_names_the_flag_and_over_http_the_hyperparameter():
    """One declaration names a setting both ways: its flag on the command line, its field among
    a job's hyperparameters over HTTP (a setting with no such field has no HTTP name)."""
    from api.errors import http_field, http_message

    with pytest.raises(OptionError) as info:
        TrainOptions(lr=2.0)
    assert str(info.value) == "--lr 2.0 is out of range; it must be above 0 and at most 1"
    assert http_field(info.value) == "hyperparameters.learning_rate"
    assert http_message(info.value) == (
        "hyperparameters.learning_rate 2.0 is out of range; it must be above 0 and at most 1"
    )
    # batch_size is a hyperparameter of the trainer; the backbone's forward batch is none.
    with pytest.raises(OptionError) as info:
        CacheOptions(batch_size=0)
    assert str(info.value).startswith("--cache-batch-size 0 is out of range")
    assert http_field(info.value) is None


def test_a_saved_config_with_an_unknown_pooling_is_refused(tmp_path, tiny_bert_dir):
    from backbone_worker.backbone import load_backbone
    from side_trainer.artifacts import ArtifactError, load_side_model, save_side_model
    from side_trainer.model import SideConfig, SideNetwork

    backbone = load_backbone(tiny_bert_dir)
    cfg = SideConfig(
        family="encoder",
        backbone=tiny_bert_dir,
        backbone_fingerprint=backbone.fingerprint,
        backbone_config=backbone.config.to_dict(),
        layers=[0],
        labels=["a", "b"],
        reduction=4,
    )
    save_side_model(SideNetwork(cfg), tmp_path)
    config = json.loads((tmp_path / "side_config.json").read_text())
    config["pooling"] = "maen"
    (tmp_path / "side_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="pooling 'maen' is not one of"):
        load_side_model(tmp_path)


def test_pooling_on_a_decoder_only_backbone_is_said_once(tmp_path, tiny_llama_dir, caplog):
    from test_cli import write_csv

    from backbone_worker.cache import build_cache
    from side_trainer.train import train

    store = str(tmp_path / "store")
    build_cache(
        tiny_llama_dir,
        write_csv(tmp_path / "d.csv", n=40),
        store,
        CacheOptions(layers=[0, 2], fisher_examples=4),
    )
    with caplog.at_level(logging.WARNING):
        for k in range(2):
            train(store, tmp_path / f"m{k}", TrainOptions(epochs=1, reduction=4, pooling="first"))
    assert caplog.text.count("has no effect on a decoder-only backbone") == 1


def test_option_lists_are_the_declared_ones():
    assert POOLINGS == next(s.choices for n, _, s in settings(TrainOptions) if n == "pooling")
    assert INITS == next(s.choices for n, _, s in settings(TrainOptions) if n == "init")


def test_an_unset_width_is_d_over_4_where_that_leaves_64_numbers():
    assert (auto_width(384), auto_width(576), auto_width(255)) == ("d/4", "d/4", "full")
    assert stored_width(None, 384) == 96 and stored_width(None, 32) is None
    assert stored_width("full", 384) is None and stored_width(40, 384) == 40
    with pytest.raises(OptionError, match="^5 does not divide the backbone's width 384"):
        stored_width("d/5", 384)
