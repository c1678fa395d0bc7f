"""Generative side networks and the decoding loop with two KV caches, on tiny random Llamas."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TOKENIZER_FILES
from transformers import LlamaConfig, LlamaForCausalLM

from backbone_worker.backbone import fingerprint_dir, load_backbone, resolve
from side_trainer.artifacts import load_side_model, save_side_model
from side_trainer.decoding import Decoder, Sampling, full_logits
from side_trainer.generative import FrozenLMHead, final_norm_spec
from side_trainer.model import SideConfig, side_network

PROMPTS = [[101, 2023, 2003, 1037, 3231], [101, 7592], [101, 2054, 2003]]


@pytest.fixture(scope="module")
def backbone(tiny_llama_dir):
    return load_backbone(tiny_llama_dir)


def make_net(backbone, seed: int = 0, trained: bool = True, layers=(0, 2), join="post_norm"):
    cfg = SideConfig(
        family="decoder",
        backbone=str(backbone.path),
        backbone_fingerprint=fingerprint_dir(backbone.path),
        backbone_config=backbone.config.to_dict(),
        layers=list(layers),
        labels=[],
        reduction=2,
        init="random",
        task="generate",
        final_norm=final_norm_spec(backbone.config),
        join=join,
    )
    torch.manual_seed(seed)
    net = side_network(cfg)
    net.load_frozen(backbone.path)
    if trained:  # an upsample away from its zero start, so the side stream shows in the logits
        torch.nn.init.normal_(net.upsample.weight, std=0.5)
    return net.eval()


def head_of(backbone) -> FrozenLMHead:
    head = FrozenLMHead(
        backbone.config.hidden_size,
        backbone.config.vocab_size,
        final_norm_spec(backbone.config),
    )
    head.load(backbone.path, backbone.config)
    return head


@pytest.mark.parametrize("join", ["post_norm", "pre_norm"])
@pytest.mark.parametrize("row_nets", [[0, 0, 0], [0, 1, 2]], ids=["one-network", "mixed"])
def test_the_cached_loop_gives_a_full_recomputations_logits_at_every_step(backbone, row_nets, join):
    """Three prompts of different lengths in one batch (left-padded), each row with a side
    network or none: every step's logits equal those of the whole sequence run from scratch,
    whichever side of the final norm the side stream joins."""
    nets = [make_net(backbone, 0, join=join), make_net(backbone, 1, layers=(1,), join=join), None]
    decoder = Decoder(backbone, head_of(backbone), nets, end_ids=[])
    generations = decoder.generate(
        PROMPTS, Sampling(max_tokens=8), row_nets=row_nets, keep_logits=True
    )
    for b, g in enumerate(generations):
        assert len(g.token_ids) == 8 and g.finish_reason == "length"
        full = full_logits(backbone, nets[row_nets[b]], decoder.head, PROMPTS[b] + g.token_ids)
        for t, logits in enumerate(g.logits):
            reference = full[len(PROMPTS[b]) - 1 + t]
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
            assert int(logits.argmax()) == g.token_ids[t]


@pytest.mark.parametrize("join", ["post_norm", "pre_norm"])
def test_an_untrained_side_network_writes_exactly_what_the_backbone_writes(backbone, join):
    net = make_net(backbone, trained=False, join=join)
    decoder = Decoder(backbone, head_of(backbone), [net, None], [])
    side, bare = (
        decoder.generate(PROMPTS, Sampling(max_tokens=6), row_nets=[k] * 3, keep_logits=True)
        for k in (0, 1)
    )
    for s, b in zip(side, bare):
        assert s.token_ids == b.token_ids
        for x, y in zip(s.logits, b.logits):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_the_frozen_head_is_the_backbones_own(tmp_path):
    """FrozenLMHead reads the final norm and the (tied) LM head from a causal LM checkpoint:
    its logits on the last block's output are the model's own."""
    config = LlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)  # not all ones, so the norm is really read
    model.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve("minilm") / name, tmp_path / name)
    backbone = load_backbone(str(tmp_path))
    ids = torch.tensor([[101, 2023, 2003, 1037]])
    expected = model(ids).logits[0]
    got = full_logits(backbone, None, head_of(backbone), ids[0].tolist())
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_sampling_follows_its_seed_and_top_p(backbone):
    decoder = Decoder(backbone, head_of(backbone), [make_net(backbone)], [])
    hot = Sampling(max_tokens=8, temperature=1.5, seed=7)
    first, again = (decoder.generate(PROMPTS, hot) for _ in range(2))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    other = decoder.generate(PROMPTS, Sampling(max_tokens=8, temperature=1.5, seed=8))
    assert [g.token_ids for g in other] != [g.token_ids for g in first]
    # A nucleus this small holds only the most likely token: sampling is then greedy.
    narrow = decoder.generate(PROMPTS, Sampling(max_tokens=8, temperature=1.5, top_p=1e-6, seed=3))
    greedy = decoder.generate(PROMPTS, Sampling(max_tokens=8))
    assert [g.token_ids for g in narrow] == [g.token_ids for g in greedy]


def test_a_row_stops_at_an_end_token_or_a_stop_string(backbone):
    net = make_net(backbone)
    free = Decoder(backbone, head_of(backbone), [net], []).generate(PROMPTS, Sampling(max_tokens=8))
    ends = Decoder(backbone, head_of(backbone), [net], end_ids=[free[0].token_ids[3]])
    stopped = ends.generate(PROMPTS, Sampling(max_tokens=8))
    assert stopped[0].token_ids == free[0].token_ids[:3] and stopped[0].finish_reason == "stop"
    text = backbone.tokenizer.decode(free[1].token_ids[2:4], skip_special_tokens=True).strip()
    cut = Decoder(backbone, head_of(backbone), [net], []).generate(
        PROMPTS, Sampling(max_tokens=8, stop=(text,))
    )
    assert cut[1].finish_reason == "stop" and text not in cut[1].text
    assert free[1].text.startswith(cut[1].text)


def test_a_saved_generative_model_loads_and_writes_the_same(backbone, tmp_path):
    net = make_net(backbone, seed=4)
    save_side_model(net, tmp_path / "model")
    loaded = load_side_model(tmp_path / "model", Path(backbone.path))
    assert (loaded.cfg.task, loaded.cfg.layers, loaded.cfg.final_norm) == (
        "generate",
        [0, 2],
        net.cfg.final_norm,
    )
    state = loaded.state_dict()
    assert not any(k.startswith("lm.") for k in state)  # the frozen head is the backbone's
    sampling = Sampling(max_tokens=8)
    head = head_of(backbone)
    before = Decoder(backbone, head, [net], []).generate(PROMPTS, sampling)
    after = Decoder(backbone, head, [loaded], []).generate(PROMPTS, sampling)
    assert [g.token_ids for g in before] == [g.token_ids for g in after]
    assert loaded.cfg.join == "post_norm"


def test_a_model_saved_before_the_join_setting_loads_as_pre_norm(backbone, tmp_path):
    """Side configs written before `join` existed have no such key: those networks were trained
    joining before the final norm, and load so, writing what they wrote."""
    import json

    net = make_net(backbone, seed=4, join="pre_norm")
    save_side_model(net, tmp_path / "model")
    config = tmp_path / "model" / "side_config.json"
    saved = json.loads(config.read_text())
    del saved["join"]
    config.write_text(json.dumps(saved))
    loaded = load_side_model(tmp_path / "model", Path(backbone.path))
    assert loaded.cfg.join == "pre_norm"
    sampling = Sampling(max_tokens=8)
    head = head_of(backbone)
    before = Decoder(backbone, head, [net], []).generate(PROMPTS, sampling)
    after = Decoder(backbone, head, [loaded], []).generate(PROMPTS, sampling)
    assert [g.token_ids for g in before] == [g.token_ids for g in after]


WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree"]


def write_pairs(path: Path, n: int = 160, chat: bool = False) -> str:
    import json
    import random

    rng = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(n):
            a, b = rng.choice(WORDS), rng.choice(WORDS)
            row = (
                {
                    "messages": [
                        {"role": "user", "content": f"swap {a} {b}"},
                        {"role": "assistant", "content": f"{b} {a}"},
                    ]
                }
                if chat
                else {"prompt": f"swap {a} {b}:", "completion": f" {b} {a}"}
            )
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize("chat", [False, True], ids=["prompt-completion", "chat"])
def test_finetune_evaluate_and_generate_on_a_generation_file(
    tmp_path, tiny_llama_dir, capsys, chat
):
    """The three commands on a tiny random Llama: finetune caches a generative store and trains
    with OpenAI's metric names and sample generations, chosen by validation loss; evaluate scores
    the model and the bare backbone (zero-shot) by exact match and loss; generate writes."""
    from test_cli import last_json, run

    data = write_pairs(tmp_path / "pairs.jsonl", n=80, chat=chat)
    out = tmp_path / "model"
    code, stdout, err = run(
        capsys,
        "finetune",
        "--backbone", tiny_llama_dir,
        "--data", data,
        "--store", str(tmp_path / "store"),
        "--out", str(out),
        "--layers", "0,2",
        "--init", "random",
        "--reduction", "2",
        "--epochs", "2",
        "--json",
    )  # fmt: skip
    assert code == 0, err
    result = last_json(stdout)
    assert result["task"] == "generate" and result["n_test"] > 0
    assert result["selection"].endswith("the lowest validation loss")
    for record in result["history"]:
        assert {"train_loss", "valid_loss", "valid_mean_token_accuracy", "full_valid_loss"} <= set(
            record
        )
    assert len(result["samples"]) == 3 and all("completion" in s for s in result["samples"])
    assert 0 <= result["test_exact_match"] <= 1 and result["test_loss"] > 0
    trained = last_json(run(capsys, "evaluate", "--model", str(out), "--data", data, "--json")[1])
    zero_shot = last_json(
        run(capsys, "evaluate", "--model", tiny_llama_dir, "--data", data, "--json")[1]
    )
    assert trained["n"] == zero_shot["n"] == result["n_test"]
    assert trained["loss"] == pytest.approx(result["test_loss"], rel=1e-4)
    assert trained["loss"] < zero_shot["loss"]  # it learned something, even on a random backbone
    code, stdout, err = run(
        capsys, "generate", "--model", str(out), "--max-tokens", "4", "swap red cat", "--json"
    )
    assert code == 0, err
    generations = last_json(stdout)["generations"]
    assert len(generations) == 1 and generations[0]["completion_tokens"] <= 4


def test_a_classifier_given_to_generate_is_a_one_line_error(tmp_path, tiny_bert_dir, capsys):
    from test_cli import run, write_csv

    out = tmp_path / "clf"
    code, _, err = run(
        capsys,
        "finetune",
        "--backbone", tiny_bert_dir,
        "--data", write_csv(tmp_path / "d.csv", n=30),
        "--store", str(tmp_path / "store"),
        "--out", str(out),
        "--layers", "0,2",
        "--init", "random",
        "--epochs", "1",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "generate", "--model", str(out), "hello")
    assert code == 2 and "is a classifier" in err and len(err.strip().splitlines()) == 1


def test_a_job_on_a_chat_file_succeeds_through_the_http_api(
    tmp_path, tiny_llama_dir, tiny_bert_dir
):
    """Upload a chat file (validated and recorded as a generation file), fine-tune a tiny Llama
    on it over HTTP: the events carry OpenAI's metric names and sample generations, the result
    exact match and loss on the test split; /v1/predict refuses the model with a 400, and an
    encoder backbone is refused for a generation file."""
    import time

    from fastapi.testclient import TestClient

    from api.app import create_app

    mp = pytest.MonkeyPatch()
    mp.setenv("LADDER_BACKBONES", f"tinyllama={tiny_llama_dir},tiny={tiny_bert_dir}")
    mp.delenv("LADDER_API_KEY", raising=False)
    app = create_app(home=tmp_path / "home", executor="thread", preload=["tinyllama"])
    try:
        with TestClient(app) as client:
            data = Path(write_pairs(tmp_path / "chats.jsonl", n=80, chat=True))
            with open(data, "rb") as handle:
                uploaded = client.post(
                    "/v1/files",
                    data={"purpose": "fine-tune"},
                    files={"file": (data.name, handle, "application/jsonl")},
                )
            assert uploaded.status_code == 200, uploaded.text
            upload = uploaded.json()
            assert (upload["task"], upload["kind"], upload["rows"]) == ("generation", "chat", 80)
            assert upload["labels"] == [] and upload["n_labels"] == 0
            refused = client.post(
                "/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": upload["id"]}
            )
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"
            assert "decoder-only" in refused.json()["error"]["message"]
            created = client.post(
                "/v1/fine_tuning/jobs",
                json={
                    "model": "tinyllama",
                    "training_file": upload["id"],
                    "hyperparameters": {
                        "n_epochs": 2,
                        "kept_layers": [0, 2],
                        "reduction_factor": 2,
                        "init": "random",
                    },
                },
            )
            assert created.status_code == 200, created.text
            job_id = created.json()["id"]
            deadline = time.time() + 240
            while (job := client.get(f"/v1/fine_tuning/jobs/{job_id}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                assert time.time() < deadline, job
                time.sleep(0.2)
            assert job["status"] == "succeeded", job
            result = job["result"]
            assert result["task"] == "generate" and result["test"]["n"] > 0
            assert 0 <= result["test_exact_match"] <= 1 and result["test_loss"] > 0
            assert result["valid_loss"] == result["full_valid_loss"]
            events = client.get(
                f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}
            ).json()["data"]
            epochs = [e for e in events if "epoch" in e["data"] and "valid_loss" in e["data"]]
            assert [e["data"]["epoch"] for e in epochs] == [1, 2]
            assert all(len(e["data"]["samples"]) == 3 for e in epochs)
            assert "validation loss" in epochs[0]["message"]
            models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            model = models[job["fine_tuned_model"]]
            assert model["task"] == "generate" and model["test_exact_match"] is not None
            predicted = client.post(
                "/v1/predict", json={"model": job["fine_tuned_model"], "inputs": ["hi"]}
            )
            assert predicted.status_code == 400, predicted.text
            assert "generative model" in predicted.json()["error"]["message"]
    finally:
        mp.undo()


def test_a_sweep_of_generative_networks_keeps_the_lowest_validation_loss(tmp_path, tiny_llama_dir):
    from backbone_worker.cache import build_cache
    from backbone_worker.options import CacheOptions
    from side_trainer.options import TrainOptions
    from side_trainer.train import train

    data = write_pairs(tmp_path / "pairs.jsonl", n=80)
    store = str(tmp_path / "store")
    build_cache(tiny_llama_dir, data, store, CacheOptions(layers=[0, 2], dtype="fp16"))
    result = train(
        store,
        tmp_path / "out",
        TrainOptions(epochs=1, init="random", reduction=2, lr=[1e-4, 3e-3], batch_size=16),
    )
    losses = [c["best_valid_loss"] for c in result["candidates"]]
    assert result["chosen"] == losses.index(min(losses))
    assert result["valid_loss"] == min(losses)


def test_a_stores_validation_loss_is_the_live_teacher_forced_loss(tmp_path, tiny_llama_dir):
    """The same network scores the same rows alike from the store (fp16, full width: padded,
    length-sorted batches) and from the live backbone: padding is never a target."""
    from backbone_worker.cache import build_cache
    from backbone_worker.chat import load_gen_dataset
    from backbone_worker.options import CacheOptions
    from cache_store import ActivationStore
    from side_trainer.gen_eval import generation_report
    from side_trainer.group import groups_of
    from side_trainer.options import TrainOptions
    from side_trainer.train import build_side_network, evaluate_groups

    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"prompt": " ".join(WORDS[: 1 + k % 7]), "completion": f" {WORDS[k % 8]}"})
            + "\n"
            for k in range(120)
        )
    )
    store_dir = str(tmp_path / "store")
    build_cache(
        tiny_llama_dir,
        str(rows),
        store_dir,
        CacheOptions(layers=[0, 2], dtype="fp16", width="full"),
    )
    store = ActivationStore.open(store_dir)
    opts = TrainOptions(init="random", reduction=2, batch_size=8, device="cpu")
    net = build_side_network(store, opts).eval()
    torch.nn.init.normal_(net.upsample.weight, std=0.5)
    _, (stored,), _ = evaluate_groups(groups_of([net]), 1, store, "validation", opts)
    examples = load_gen_dataset(str(rows)).split("validation")
    live = generation_report(load_backbone(tiny_llama_dir), net, examples, 128, max_tokens=1)
    assert stored == pytest.approx(live["loss"], rel=1e-3)
