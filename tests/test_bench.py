"""`ladder bench` on a tiny random backbone: every step runs in its own process, every method gets
its learning-rate grid and a validation choice, the test split is the whole data's, and the report
has the documented shape, with every figure a finite number or a null with a reason."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from test_cli import write_csv

from api.cli import main
from backbone_worker.data import split_of
from bench import METHODS
from bench.compare import (
    BOOTSTRAP,
    MODES,
    QUICK_GRIDS,
    VAL_ROWS,
    choose_rate,
    correct_per_seed,
    implausible,
    markdown,
    mcnemar_p,
    mode_label,
    paired,
)


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
            "--budget",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    # The budget mode: cached LST given full fine-tuning's time to model, per seed.
    budget = report["budget"]
    full = report["methods"]["full"]
    assert budget["budget_s"] == full["time_to_model_s"] and budget["seeds"] == [0, 1]
    assert all(n >= 1 for n in budget["networks"]) and budget["epochs"] == 4
    assert len(budget["test_accuracy_per_seed"]) == 2 and 0 <= budget["test_accuracy"] <= 1
    assert budget["time_to_model_s"] > report["cache"]["caching_seconds"]
    assert budget["vs_full"]["seeds"] == [2, 2]
    assert "At full fine-tuning's time to model" in out.with_suffix(".md").read_text()
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
        # Each method's own grid, every rate with both seeds, the rate chosen by the validation
        # accuracy averaged over the seeds.
        assert len(figures["lr_grid"]) >= 2 and figures["lr"] in figures["lr_grid"]
        assert len(figures["grid"]) == 2 * len(figures["lr_grid"])
        mean = {
            lr: np.mean([g["val_accuracy"] for g in figures["grid"] if g["lr"] == lr])
            for lr in figures["lr_grid"]
        }
        assert figures["lr"] == max(figures["lr_grid"], key=mean.get)
        assert figures["val_accuracy"] == pytest.approx(mean[figures["lr"]])
        assert figures["seeds"] == [0, 1]
        assert len(figures["test_accuracy_per_seed"]) == len(figures["test_macro_f1_per_seed"]) == 2
        assert figures["test_majority_rate"] == pytest.approx(
            report["baselines"]["majority"]["test_accuracy"]
        )
        # The whole data's test split, not the --limit sample's.
        assert figures["n_test"] == n_test and n_test > 80 * 0.1 * 2
        if method != "full":
            vs = figures["vs_full"]
            assert vs["seeds"] == [2, 2] and len(vs["p_mcnemar_per_seed"]) == 2
            assert 1 / vs["bootstrap"] <= vs["p_bootstrap"] <= 1
        # Each seed's test correctness is in the report, so its statistics can be recomputed.
        assert [sum(bits) / n_test for bits in correct_per_seed(figures)] == pytest.approx(
            figures["test_accuracy_per_seed"]
        )
    assert report["methods"]["full"]["trainable_pct"] > 99
    assert report["methods"]["bitfit"]["trainable_pct"] < report["methods"]["full"]["trainable_pct"]
    # Validation: the whole data's validation split (up to VAL_ROWS), not the sample's tenth.
    assert report["config"]["val_rows"] == VAL_ROWS
    assert report["n_validation"] == min(
        VAL_ROWS, sum(split_of(k, 0) == "validation" for k in range(200))
    )
    assert report["n_validation"] > 80 // 10  # the sample's own: about a tenth of it
    # Settings of no mode (--limit, --epochs and --seeds given) are not labelled quick.
    assert report["config"]["mode"] == "custom"
    # Online LST's time to a model includes its own Fisher pass.
    online = report["methods"]["lst_online"]
    assert 0 < online["importance_s"] < online["time_to_model_s"]
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
    # Each sweep kind ran in a process of its own: a peak memory of its own work.
    assert len({sweep["single_pid"], sweep["k8_pid"], sweep["k8_halving_pid"]}) == 3
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


@pytest.mark.parametrize(
    "args, named",
    [
        (["--budget", "--methods", "lora,lst_cached"], "keep full and lst_cached"),
        (["--budget", "--task", "generate"], "--budget is for the classification bench"),
    ],
)
def test_bench_refuses_a_budget_it_cannot_run_before_running_anything(capsys, args, named):
    assert main(["bench", *args]) == 2
    assert named in capsys.readouterr().err


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


def test_the_interval_carries_the_spread_between_seeds():
    """SmolLM2's cached LST had seeds at 0.823, 0.701, 0.701 against a steady full fine-tuning;
    resampling rows alone gave a 2.4-point interval over a 7-point seed spread."""
    rng = np.random.default_rng(1)
    n = 2334
    full = np.array([rng.random(n) < p for p in (0.817, 0.832, 0.811)])
    shaky = np.array([rng.random(n) < p for p in (0.823, 0.701, 0.701)])
    result = paired(shaky, full)
    low, high = result["ci95"]
    rows_low, rows_high = result["ci95_rows"]
    assert high - low > 3 * (rows_high - rows_low)
    assert low < -0.09 and high > -0.04  # reaches toward both seed outcomes
    assert result["p_bootstrap"] > 1 / BOOTSTRAP and not result["p_bootstrap_bound"]
    # McNemar on every seed pair: the first agrees with full fine-tuning, the others do not.
    assert len(result["p_mcnemar_per_seed"]) == 3
    assert result["p_mcnemar_per_seed"][0] > 0.05 > max(result["p_mcnemar_per_seed"][1:])


def test_a_p_value_below_the_resampling_s_resolution_is_a_bound_never_zero():
    rng = np.random.default_rng(2)
    weak = rng.random((3, 2000)) < 0.60
    strong = weak | (rng.random((3, 2000)) < 0.6)  # ~84%, on the same rows
    result = paired(weak, strong)
    assert result["p_bootstrap"] == 1 / BOOTSTRAP and result["p_bootstrap_bound"]
    assert result["p_mcnemar_per_seed"][0] > 0  # 3 significant digits, not 4 decimals
    report = json.loads((Path(__file__).parents[1] / "bench/results/full_smollm2.json").read_text())
    report["methods"]["lst_cached"]["vs_full"] = result
    table = markdown(report)
    assert "p < 0.0001" in table
    assert not re.search(r"p = 0(\.0*)? ", table)  # no p-value printed as zero


def test_the_rate_is_chosen_on_the_mean_over_seeds():
    """3e-3 wins seed 0 by a few rows and collapses on the other seeds: the mean chooses 1e-3."""
    runs = {
        1e-3: [{"val_accuracy": v} for v in (0.76, 0.78, 0.77)],
        3e-3: [{"val_accuracy": v} for v in (0.80, 0.70, 0.70)],
    }
    assert choose_rate(runs) == 1e-3
    tie = {1e-3: [{"val_accuracy": 0.8}], 3e-3: [{"val_accuracy": 0.8}]}
    assert choose_rate(tie) == 1e-3  # the first of the grid


def test_the_mode_label_says_what_ran():
    full = {m: MODES["full"]["grids"][m] for m in METHODS}
    cfg = {"backbone": "minilm", "limit": 6000, "epochs": 3}
    assert mode_label(cfg, full, 3) == "full"
    assert mode_label({**cfg, "limit": 800}, full, 3) == "custom"
    assert mode_label(cfg, {**full, "lora": QUICK_GRIDS["lora"]}, 3) == "custom"
    assert mode_label({"backbone": "smollm2", "limit": 800, "epochs": 2}, QUICK_GRIDS, 1) == "quick"
    assert mode_label({"backbone": "minilm", "limit": 800, "epochs": 2}, QUICK_GRIDS, 1) == "custom"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "bench/results").glob("*.json"))
)
def test_committed_bench_reports_say_what_ran_and_hold_plausible_figures(path):
    """full_smollm2.json said `full` but ran two rates per method, 2 epochs and 800 rows; the
    quick report's sweep with halving peaked at 0.5 MB, below one network alone, because the
    three sweeps shared a process."""
    report = json.loads(path.read_text())
    if not (isinstance(report, dict) and "methods" in report and "sweep" in report):
        return
    cfg = report["config"]
    grids = {m: r["lr_grid"] for m, r in report["methods"].items() if r}
    assert cfg["mode"] == mode_label(cfg, grids, cfg["seeds"])
    assert implausible(report) == []


def test_implausible_flags_a_sweep_below_one_network_and_a_peak_of_nothing():
    report = {
        "methods": {"full": {"peak_mem_mb": 0.0}, "lora": None},
        "sweep": {
            "single_peak_mem_mb": 88.3,
            "k8_peak_mem_mb": 604.3,
            "k8_halving_peak_mem_mb": 0.5,
        },
    }
    assert implausible(report) == [
        "methods.full.peak_mem_mb = 0.0",
        "sweep.k8_halving_peak_mem_mb = 0.5: 8 side networks below one alone (88.3)",
    ]


def test_step_records_resume_in_another_workdir(tmp_path, monkeypatch):
    """A record carries its test figures, so a long bench resumes from records copied to
    another workdir (another machine): where the workdir is does not count, a path's name does."""
    import shutil

    from bench.compare import step

    (tmp_path / "counting_step.py").write_text(
        "import json, pathlib, sys\n"
        "runs = pathlib.Path(sys.argv[0]).parent / 'runs.txt'\n"
        "runs.write_text(runs.read_text() + 'x' if runs.exists() else 'x')\n"
        "print(json.dumps({'step': sys.argv[1], 'lr': json.loads(sys.argv[2])['lr']}))\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))

    def cfg(workdir, name="full-0.001-0.pt"):
        return {"lr": 1e-3, "store": str(workdir / "store"), "out": str(workdir / name)}

    first, second = tmp_path / "a", tmp_path / "b"
    assert step("train", cfg(first), 60, first, module="counting_step")["lr"] == 1e-3
    shutil.copytree(first / "steps", second / "steps")
    assert step("train", cfg(second), 60, second, module="counting_step")["lr"] == 1e-3
    assert (tmp_path / "runs.txt").read_text() == "x"  # reused, not run again
    step("train", cfg(second, "full-0.003-0.pt"), 60, second, module="counting_step")
    assert (tmp_path / "runs.txt").read_text() == "xx"  # another model is another step
