"""Generative side networks on T5 (the reference's text-to-text setting: a side encoder and a
side decoder writing through the frozen LM head), on tiny random T5 configs: no pretrained T5 is
available offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from test_generation import write_pairs

from backbone_worker.backbone import fingerprint_dir, load_backbone
from side_trainer.artifacts import load_side_model, save_side_model
from side_trainer.decoding import Sampling, Seq2SeqDecoder
from side_trainer.model import SideConfig, side_network
from side_trainer.pruning import load_lm_head

PROMPTS = [[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102], [101, 2054, 2003, 102]]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return save_tiny("encoder-decoder", tmp_path_factory.mktemp("t5"))


@pytest.fixture(scope="module")
def backbone(t5_dir):
    return load_backbone(t5_dir)


def make_net(backbone, seed: int = 0):
    cfg = SideConfig(
        family="encoder-decoder",
        backbone=str(backbone.path),
        backbone_fingerprint=fingerprint_dir(backbone.path),
        backbone_config=backbone.config.to_dict(),
        layers=[0, 2],
        labels=[],
        reduction=2,
        init="random",
        task="generate",
    )
    torch.manual_seed(seed)
    net = side_network(cfg)
    load_lm_head(net, backbone.path)
    return net.eval()


@torch.inference_mode()
def teacher_forced_argmax(backbone, net, prompt: list[int], written: list[int]) -> list[int]:
    """The network's choice at every position of `written`, from one forward over it all."""
    enc = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt))}
    targets = torch.tensor([written + [0]])
    dec = {"input_ids": targets, "attention_mask": torch.ones_like(targets)}
    if net is None:
        logits = backbone.run(enc, dec).logits
    else:
        states = backbone.ladder_states(net.cfg.layers, enc, dec)
        batch = {s: {"states": states[s], "attention_mask": x["attention_mask"]} for s, x in
                 (("enc", enc), ("dec", dec))}  # fmt: skip
        logits = net(batch, live=True)
    return logits[0].argmax(-1).tolist()[: len(written) + 1]


def test_greedy_t5_generation_is_the_teacher_forced_argmax_at_every_step(backbone):
    """Each generated token is what the network, teacher-forced on the tokens before it (as it
    trains), ranks first: the loop feeds the decoder what training feeds it, for a side model
    and the bare T5 decoding side by side in one batch."""
    net = make_net(backbone, seed=1)
    decoder = Seq2SeqDecoder(backbone, [net, None], end_ids=[])
    out = decoder.generate(PROMPTS, Sampling(max_tokens=6), row_nets=[0, 1, 0])
    for prompt, g, row_net in zip(PROMPTS, out, [net, None, net]):
        assert len(g.token_ids) == 6 and g.finish_reason == "length"
        assert teacher_forced_argmax(backbone, row_net, prompt, g.token_ids)[:6] == g.token_ids
    assert out[0].token_ids != out[1].token_ids or out[2].token_ids != out[1].token_ids


def test_t5_generation_stops_at_its_end_token_and_a_saved_model_writes_the_same(backbone, tmp_path):
    net = make_net(backbone, seed=2)
    sampling = Sampling(max_tokens=6)
    free = Seq2SeqDecoder(backbone, [net], end_ids=[]).generate(PROMPTS, sampling)
    end = free[0].token_ids[2]
    cut = Seq2SeqDecoder(backbone, [net], end_ids=[end]).generate(PROMPTS, sampling)
    assert cut[0].finish_reason == "stop"
    assert cut[0].token_ids == free[0].token_ids[: free[0].token_ids.index(end)]
    save_side_model(net, tmp_path / "model")
    loaded = load_side_model(tmp_path / "model", Path(backbone.path))
    assert loaded.cfg.task == "generate" and loaded.cfg.family == "encoder-decoder"
    again = Seq2SeqDecoder(backbone, [loaded], end_ids=[]).generate(PROMPTS, sampling)
    assert [g.token_ids for g in again] == [g.token_ids for g in free]


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-completion", "chat"])
def test_finetune_evaluate_and_generate_a_t5_side_model(tmp_path, t5_dir, capsys, chat):
    """The three commands on a tiny random T5: finetune caches the prompts' and replies' states
    and trains the side encoder-decoder, evaluate scores it and the bare T5 (zero-shot), and
    generate writes."""
    from test_cli import last_json, run

    data = write_pairs(tmp_path / "pairs.jsonl", n=80, chat=chat)
    out = tmp_path / "model"
    code, stdout, err = run(
        capsys,
        "finetune",
        "--backbone", t5_dir,
        "--data", data,
        "--store", str(tmp_path / "store"),
        "--out", str(out),
        "--layers", "0,2",
        "--reduction", "2",
        "--epochs", "3",
        "--lr", "3e-3",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = last_json(stdout)
    assert result["task"] == "generate" and result["n_test"] > 0
    assert {"train_loss", "valid_loss", "valid_mean_token_accuracy"} <= set(result["history"][0])
    assert len(result["samples"]) == 3
    trained = last_json(run(capsys, "evaluate", "--model", str(out), "--data", data, "--json")[1])
    zero_shot = last_json(run(capsys, "evaluate", "--model", t5_dir, "--data", data, "--json")[1])
    assert trained["n"] == zero_shot["n"] == result["n_test"]
    assert trained["loss"] == pytest.approx(result["test_loss"], rel=1e-4)
    assert trained["loss"] < zero_shot["loss"]
    code, stdout, err = run(
        capsys, "generate", "--model", str(out), "--max-tokens", "4", "swap red cat", "--json"
    )
    assert code == 0, err
    generations = last_json(stdout)["generations"]
    assert len(generations) == 1 and generations[0]["completion_tokens"] <= 4
