"""Any Hugging Face encoder or decoder-only backbone, on tiny random configs of each
architecture saved as real model directories (with MiniLM's tokenizer): ladder states equal the
model's own hidden states, `ladder finetune` learns a keyword task end to end, joint inference
(overlapped too) gives what the training path gives, and a hub id resolves offline from a hub
cache on disk."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from conftest import TOKENIZER_FILES, VOCAB, cache_argv, finetune_argv
from transformers import AutoConfig, AutoModel

from api.cli import main
from backbone_worker.backbone import load_backbone

SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)
DECODER = dict(SMALL, num_key_value_heads=2, head_dim=8, pad_token_id=0)
ARCHITECTURES = {
    "distilbert": dict(
        vocab_size=VOCAB, dim=32, n_layers=3, n_heads=4, hidden_dim=64, max_position_embeddings=128
    ),
    "deberta-v2": dict(
        SMALL,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        position_buckets=16,
        type_vocab_size=2,
    ),
    "xlm-roberta": dict(SMALL, max_position_embeddings=160, pad_token_id=0),
    "electra": dict(SMALL, embedding_size=16),
    "modernbert": dict(
        SMALL,
        pad_token_id=0,
        cls_token_id=101,
        sep_token_id=102,
        bos_token_id=101,
        eos_token_id=102,
        global_attn_every_n_layers=2,
        local_attention=16,
    ),
    "qwen3": DECODER,
    "gemma2": dict(DECODER, sliding_window=64),
    "phi3": dict(SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=101, eos_token_id=102),
    "gpt_neox": dict(SMALL, rotary_pct=0.5),
    "mistral": DECODER,
}
WORDS = {
    "pos": ["wonderful", "splendid", "marvelous", "delightful"],
    "neg": ["horrible", "dreadful", "miserable", "terrible"],
}
FILLER = "the a ride car road trip city day train bus".split()


def save_tiny(model_type: str, path) -> str:
    from backbone_worker.backbone import resolve

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **ARCHITECTURES[model_type])
    AutoModel.from_config(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve("minilm") / name, path / name)
    return str(path)


def keyword_csv(path, n=600, seed=0) -> str:
    """Label by which kind of keyword a sentence of filler words holds."""
    import csv

    rng = random.Random(seed)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for k in range(n):
            label = "pos" if k % 2 else "neg"
            words = rng.sample(FILLER, 5)
            words.insert(rng.randrange(6), rng.choice(WORDS[label]))
            writer.writerow([" ".join(words), label])
    return str(path)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory):
    return request.param, save_tiny(request.param, tmp_path_factory.mktemp(request.param))


def test_ladder_states_are_the_models_hidden_states(arch):
    """The embeddings state is what enters the first block and layer i's state is block i's
    output, as the model's own output_hidden_states gives them (its last entry is left out:
    decoders return it after their final norm)."""
    model_type, path = arch
    backbone = load_backbone(path)
    n = backbone.num_layers()
    enc = backbone.tokenize(["a fine day on the road", "never again"], None, 32)
    states = backbone.ladder_states(list(range(n)), enc)["enc"]
    with torch.no_grad():
        kwargs = {k: enc[k] for k in ("input_ids", "attention_mask")}
        hidden = backbone.model(**kwargs, output_hidden_states=True).hidden_states
    assert len(hidden) == n + 1
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(states["emb"][mask], hidden[0][mask])
    for i in range(n - 1):
        torch.testing.assert_close(states[f"layer_{i}"][mask], hidden[i + 1][mask])


@pytest.fixture(scope="module")
def finetuned(arch, tmp_path_factory):
    model_type, path = arch
    root = tmp_path_factory.mktemp(f"{model_type}-run")
    data = keyword_csv(root / "keywords.csv")
    out = root / "model"
    code = main(finetune_argv(path, data, root / "store", out, epochs=12))
    assert code == 0
    return path, root, out


def test_finetune_learns_a_keyword_task(finetuned, capsys):
    path, root, out = finetuned
    result = json.loads((out / "training_metrics.json").read_text())
    code = main(["evaluate", "--model", str(out), "--data", str(root / "keywords.csv"), "--json"])
    assert code == 0
    accuracy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"]
    assert accuracy >= 0.8, (path, accuracy, result["history"])


def test_joint_inference_gives_what_the_training_path_gives(finetuned):
    from api.inference import JointModel
    from backbone_worker.data import load_dataset
    from cache_store import ActivationStore
    from side_trainer.artifacts import load_side_model

    path, root, out = finetuned
    net = load_side_model(out)
    # The model trained on the default int8 store; the paths are compared on an fp16 store of
    # the same data, whose states differ from the live ones by fp16 rounding only.
    store = str(root / "store-fp16")
    assert main(cache_argv(path, root / "keywords.csv", "--store", store, "--dtype", "fp16")) == 0
    batch = next(ActivationStore.open(store).iter_batches("test", 16, shuffle=False))
    with torch.no_grad():
        from_store = net(batch).softmax(-1)
    texts = {e.id: e.text for e in load_dataset(str(root / "keywords.csv")).examples}
    inputs = [texts[i] for i in batch["example_ids"].tolist()]
    backbone = load_backbone(path)
    for overlap in (False, True):
        live = JointModel(backbone, [net], overlap=overlap).probabilities(inputs)[0]
        torch.testing.assert_close(live, from_store, atol=2e-3, rtol=0)


def test_a_hub_id_resolves_offline_from_the_cache(tmp_path, monkeypatch, capsys):
    """`--backbone tiny-org/tiny-qwen3` with HF_HUB_OFFLINE=1: the snapshot in HF_HOME's hub
    cache is used, nothing is downloaded, and a missing one is a one-line error."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-qwen3"
    save_tiny("qwen3", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    data = keyword_csv(tmp_path / "k.csv", n=200)
    code = main(finetune_argv("tiny-org/tiny-qwen3", data, tmp_path / "s", tmp_path / "m"))
    assert code == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "m" / "side_config.json").read_text())
    assert config["backbone"] == "tiny-org/tiny-qwen3" and str(tmp_path) not in json.dumps(config)
    from cache_store import ActivationStore

    assert ActivationStore.open(str(tmp_path / "s")).settings["backbone_revision"] == commit
    capsys.readouterr()
    code = main(
        [
            "cache",
            "--backbone",
            "tiny-org/not-cached",
            "--data",
            data,
            "--store",
            str(tmp_path / "s2"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "not in the Hugging Face cache" in err[-1] and "HF_HUB_OFFLINE" in err[-1]


def test_an_encoder_decoder_other_than_t5_is_refused(tmp_path, capsys):
    config = AutoConfig.for_model(
        "bart",
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    AutoModel.from_config(config).save_pretrained(tmp_path / "bart")
    code = main(
        [
            "cache",
            "--backbone",
            str(tmp_path / "bart"),
            "--data",
            keyword_csv(tmp_path / "k.csv", n=40),
            "--store",
            str(tmp_path / "s"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) >= 1 and "'bart'" in err[-1] and "T5" in err[-1]


def test_a_model_without_a_block_list_is_refused():
    from backbone_worker.backbone import find_block_path
    from backbone_worker.families import FamilyError

    with pytest.raises(FamilyError, match="no list of 3 blocks"):
        find_block_path(torch.nn.Sequential(torch.nn.Linear(2, 2)), 3, "mystery")
