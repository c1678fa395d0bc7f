"""`ladder bench` on a tiny random backbone: every method runs in its own process and the report
has the documented shape, with every figure a finite number or a null with a reason."""
from __future__ import annotations

import json
import math

from api.cli import main
from test_cli import write_csv

from bench import METHODS


def test_bench_report_schema(tmp_path, tiny_bert_dir, capsys):
    data = write_csv(tmp_path / "d.csv", n=80)
    out = tmp_path / "bench.json"
    code = main(["bench", "--backbone", tiny_bert_dir, "--data", data, "--limit", "80",
                 "--epochs", "1", "--batch-size", "8", "--max-length", "16", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    for method in METHODS:
        figures = report["methods"][method]
        for key in ("trainable_params", "trainable_pct", "peak_mem_mb", "examples_per_s",
                    "test_accuracy"):
            assert isinstance(figures[key], (int, float)) and math.isfinite(figures[key]), (method, key)
    # LoRA and BitFit train a small share; full fine-tuning trains everything.
    assert report["methods"]["full"]["trainable_pct"] > 99
    assert report["methods"]["bitfit"]["trainable_pct"] < report["methods"]["full"]["trainable_pct"]
    for key in ("bytes_per_element", "compression_ratio", "read_vs_memory"):
        assert math.isfinite(report["cache"][key])
    for key in ("joint_vs_backbone", "multitask8_vs_single"):
        assert math.isfinite(report["inference"][key])
    assert report["machine"]["torch"] and report["machine"]["cores"] >= 1
    if report["gpu_peak_mem_mb"] is None:
        assert report["nulls"]["gpu_peak_mem_mb"]
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert (tmp_path / "bench_memory_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "bench_speed.png").stat().st_size > 1000


def test_bench_reports_bitfit_absent_on_a_bias_free_backbone(tmp_path, capsys):
    """Llama-family backbones have no biases: BitFit is reported as null with the reason, and the
    decoder runs its LoRA on q_proj/v_proj and pools the last real token."""
    import shutil

    from transformers import AutoModel, LlamaConfig

    from backbone_worker.backbone import resolve
    from bench.compare import finite_or_explained
    from conftest import TOKENIZER_FILES, VOCAB
    # Head dim 16, so the bench's default r = 8 leaves an even side head dim for rotary embeddings.
    tiny_llama_dir = tmp_path / "llama"
    AutoModel.from_config(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        pad_token_id=0)).save_pretrained(tiny_llama_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve("minilm") / name, tiny_llama_dir / name)
    data = write_csv(tmp_path / "d.csv", n=60)
    out = tmp_path / "bench.json"
    code = main(["bench", "--backbone", str(tiny_llama_dir), "--data", data, "--limit", "60",
                 "--epochs", "1", "--batch-size", "8", "--max-length", "16",
                 "--methods", "lora,bitfit,lst_cached", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["lora", "bitfit", "lst_cached"]
    assert report["methods"]["bitfit"] is None and "no bias" in report["nulls"]["bitfit"]
    assert 0 < report["methods"]["lora"]["trainable_pct"] < 100
    assert finite_or_explained(report) == []
    assert "| bitfit | not run: " in out.with_suffix(".md").read_text()


def test_bench_rejects_unknown_methods(capsys):
    import pytest
    with pytest.raises(SystemExit) as info:
        main(["bench", "--methods", "full,qlora"])
    assert info.value.code == 2
    assert "qlora" in capsys.readouterr().err
