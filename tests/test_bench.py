"""`ladder bench` on a tiny random backbone: every step runs in its own process, every method gets
its learning-rate grid and a validation choice, the test split is the whole data's, and the report
has the documented shape, with every figure a finite number or a null with a reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_cli import write_csv

from api.cli import main
from backbone_worker.data import split_of
from bench import METHODS
from bench.compare import mcnemar_p, paired


def test_bench_report_schema(tmp_path, tiny_bert_dir, capsys):
    data = write_csv(tmp_path / "d.csv", n=200)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--quick",
            "--backbone",
            tiny_bert_dir,
            "--data",
            data,
            "--limit",
            "80",
            "--epochs",
            "2",
            "--seeds",
            "2",
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    test_ids = [k for k in range(200) if split_of(k, 0) == "test"]
    n_test = len(test_ids)
    for method in METHODS:
        figures = report["methods"][method]
        for key in (
            "trainable_params",
            "trainable_pct",
            "peak_mem_mb",
            "peak_total_mb",
            "examples_per_s",
            "test_accuracy",
            "test_accuracy_sd",
            "test_macro_f1",
            "test_majority_rate",
            "lr",
            "time_to_model_s",
            "val_accuracy",
        ):
            assert isinstance(figures[key], (int, float)) and math.isfinite(figures[key]), (
                method,
                key,
            )
        # Each method's own grid, the rate chosen by validation accuracy, two seeds at that rate.
        assert len(figures["lr_grid"]) >= 2 and figures["lr"] in figures["lr_grid"]
        best = max(figures["grid"], key=lambda g: g["val_accuracy"])
        assert figures["lr"] == best["lr"] and figures["seeds"] == [0, 1]
        assert len(figures["test_accuracy_per_seed"]) == len(figures["test_macro_f1_per_seed"]) == 2
        assert figures["test_majority_rate"] == pytest.approx(
            report["baselines"]["majority"]["test_accuracy"]
        )
        # The whole data's test split, not the --limit sample's.
        assert figures["n_test"] == n_test and n_test > 80 * 0.1 * 2
        if method != "full":
            assert set(figures["vs_full"]) == {"accuracy_diff", "ci95", "p_bootstrap", "p_mcnemar"}
    assert report["methods"]["full"]["trainable_pct"] > 99
    assert report["methods"]["bitfit"]["trainable_pct"] < report["methods"]["full"]["trainable_pct"]
    # Cached LST's time to a model includes caching.
    cached = report["methods"]["lst_cached"]
    assert cached["time_to_model_s"] > report["cache"]["caching_seconds"]
    majority = report["baselines"]["majority"]
    assert majority["test_accuracy"] == pytest.approx(  # write_csv: odd rows "pos", even "neg"
        sum((k % 2 == 1) == (majority["label"] == "pos") for k in test_ids) / n_test
    )
    assert 0 <= report["baselines"]["probe"]["test_accuracy"] <= 1
    for key in ("bytes_per_element", "compression_ratio", "read_vs_memory", "bytes_per_example"):
        assert math.isfinite(report["cache"][key])
    # The read path is timed on the allocator `ladder train` runs on, and on the system's.
    from api.allocator import jemalloc_library

    if jemalloc_library() is None:
        assert report["cache"]["read_allocator"] == "system"
    else:
        assert report["cache"]["read_allocator"] == "jemalloc"
        assert math.isfinite(report["cache"]["read_vs_memory_system_malloc"])
    for key in ("joint_vs_backbone", "multitask8_vs_single", "multitask64_vs_single"):
        assert math.isfinite(report["inference"][key])
    sweep = report["sweep"]
    assert sweep["k8_s"] > 0 and sweep["k8_vs_single"] == round(
        sweep["k8_s"] / sweep["single_s"], 3
    )
    # Successive halving trains fewer steps in all: 8 x 1/8 + 4 x 1/8 + 2 x 1/4 + 1 x 1/2 runs.
    assert sweep["k8_halving_steps"] < sweep["k8_steps"] / 2
    assert report["machine"]["torch"] and report["machine"]["cores"] >= 1
    from bench.compare import finite_or_explained

    assert finite_or_explained(report) == []
    assert out.with_suffix(".md").read_text().startswith("| method |")
    assert (tmp_path / "bench_memory_accuracy.png").stat().st_size > 1000
    assert (tmp_path / "bench_speed.png").stat().st_size > 1000


def test_bench_reports_bitfit_absent_on_a_bias_free_backbone(tmp_path, capsys):
    """Llama-family backbones have no biases: BitFit is reported as null with the reason, and the
    decoder runs its LoRA on q_proj/v_proj and pools the last real token."""
    import shutil

    from conftest import TOKENIZER_FILES, VOCAB
    from transformers import AutoModel, LlamaConfig

    from backbone_worker.backbone import resolve
    from bench.compare import finite_or_explained

    # Head dim 16, so the bench's default r = 8 leaves an even side head dim for rotary embeddings.
    tiny_llama_dir = tmp_path / "llama"
    AutoModel.from_config(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            pad_token_id=0,
        )
    ).save_pretrained(tiny_llama_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(resolve("minilm") / name, tiny_llama_dir / name)
    data = write_csv(tmp_path / "d.csv", n=60)
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--quick",
            "--backbone",
            str(tiny_llama_dir),
            "--data",
            data,
            "--limit",
            "60",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--max-length",
            "16",
            "--methods",
            "lora,bitfit,lst_cached",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert list(report["methods"]) == ["lora", "bitfit", "lst_cached"]
    assert report["methods"]["bitfit"] is None and "no bias" in report["nulls"]["bitfit"]
    assert 0 < report["methods"]["lora"]["trainable_pct"] < 100
    assert finite_or_explained(report) == []
    assert "| bitfit | not run: " in out.with_suffix(".md").read_text()


def test_bench_rejects_unknown_methods(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--methods", "full,qlora"])
    assert info.value.code == 2
    assert "qlora" in capsys.readouterr().err


@pytest.mark.parametrize("grid", ["qlora=1e-3", "lora=", "lora=fast", "full=-1e-4"])
def test_bench_rejects_a_bad_grid(capsys, grid):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--grid", grid])
    assert info.value.code == 2
    assert "METHOD=RATE,RATE" in capsys.readouterr().err


def test_mcnemar_exact_p_values():
    """Against values computed by hand: 10 discordant pairs split 9:1 give
    p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024; a 5:5 split gives 1."""
    a = np.array([True] * 9 + [False] + [True] * 20)
    b = np.array([False] * 9 + [True] + [True] * 20)
    assert mcnemar_p(a, b) == pytest.approx(22 / 1024)
    assert mcnemar_p(np.array([True] * 5 + [False] * 5), np.array([False] * 5 + [True] * 5)) == 1.0
    assert mcnemar_p(a, a) == 1.0


def test_paired_bootstrap_sees_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    b = rng.random((3, 2000)) < 0.80
    better = b | (rng.random((3, 2000)) < 0.5)  # about 90% correct, on the same rows
    result = paired(better, b)
    assert result["accuracy_diff"] > 0.05 and result["ci95"][0] > 0 and result["p_bootstrap"] < 0.01
    same = paired(rng.random((3, 2000)) < 0.80, b)  # as good, independently
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["p_bootstrap"] > 0.05


def test_the_readmes_measured_figures_are_those_of_the_result_files():
    """Every generated README block is what `python -m bench.readme` writes from bench/results/:
    a result file changed without rerendering, or a figure edited by hand, fails here."""
    from bench import readme

    assert readme.main(["--check"]) == 0


def test_a_stopped_benchmark_resumes_from_its_workdir(tmp_path, monkeypatch):
    """With --workdir, a finished step is recorded and not run again with the same settings; a
    step with other settings runs."""
    from bench import compare

    calls = []

    def fake(args, timeout):
        calls.append(json.loads(args[-1]))
        return {"n": len(calls)}

    monkeypatch.setattr(compare, "_python", fake)
    cfg = {"method": "full", "lr": 1e-4, "seed": 0}
    first = compare.step("train", cfg, 60, tmp_path)
    assert compare.step("train", cfg, 60, tmp_path) == first == {"n": 1}
    assert compare.step("train", {**cfg, "lr": 3e-4}, 60, tmp_path) == {"n": 2}
    assert compare.step("train", cfg, 60) == {"n": 3}  # no workdir: always run
    assert len(calls) == 3
