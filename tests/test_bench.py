"""`ladder bench` on a tiny random backbone: every method runs in its own process and the report
has the documented shape, with every figure a finite number or a null with a reason."""
from __future__ import annotations

import json
import math

from api.cli import main
from test_cli import write_csv

METHODS = ("full", "lora", "bitfit", "lst_online", "lst_cached")


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
