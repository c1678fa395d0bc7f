"""The README is the front door: its quick starts run as written (each is read out of README.md
by its marker, so the test and the text cannot drift apart), it stays short, and every relative
link in it and in docs/ leads to a file (and heading) that exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_service_process import free_port, start_server

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def quickstart(marker: str) -> str:
    """The ```bash block that follows `<!-- quickstart: MARKER -->` in the README."""
    text = README.read_text()
    assert f"<!-- quickstart: {marker} -->" in text, marker
    after = text.split(f"<!-- quickstart: {marker} -->", 1)[1]
    block = re.match(r"\s*```bash\n(.*?)```", after, re.S)
    assert block, f"no ```bash block right after the {marker} marker"
    return block.group(1)


def run_bash(script: str, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`script` as a file of commands, stopping at the first that fails (-e, -o pipefail)."""
    path = Path(sys.executable).parent  # `ladder`, `python3` of this environment first
    return subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", script],
        cwd=cwd,
        env={**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_the_curl_quick_start_runs_as_written_against_a_real_server(tmp_path, tiny_bert_dir):
    """Upload, job, its event stream and a prediction, with a key as docker compose sets one;
    only the backbone differs (MODEL: a tiny random BERT instead of MiniLM)."""
    key = "quick-start-key"
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    server = start_server(
        home,
        port,
        {
            "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
            "LADDER_PRELOAD": "tiny",
            "LADDER_EXECUTOR": "thread",
            "LADDER_API_KEY": key,
        },
    )
    try:
        env = {"LADDER": f"http://127.0.0.1:{port}", "MODEL": "tiny", "LADDER_API_KEY": key}
        done = run_bash(quickstart("curl"), tmp_path, env, timeout=240)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    log = (home / f"server-{port}.log").read_text()[-3000:]
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n--- server log:\n{log}"
    lines = [line for line in done.stdout.splitlines() if line]  # SSE: a blank line each
    events = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: {")]
    assert events[-1]["data"]["status"] == "succeeded", events[-1]
    assert lines[-2] == "data: [DONE]"  # the stream ended with the job; the prediction follows
    answer = json.loads(lines[-1])
    assert answer["model"].startswith("ft:tiny:")
    assert len(answer["predictions"]) == 2
    for prediction in answer["predictions"]:
        assert prediction["label"] in ("positive", "negative")
        assert sum(prediction["scores"].values()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_the_csv_quick_start_runs_as_written_on_minilm(tmp_path):
    """The CLI quick start, word for word: the environment's activate script, then finetune,
    predict and evaluate on the CSV the block writes."""
    activate = Path(sys.prefix) / "bin" / "activate"
    if not activate.exists():
        pytest.skip("not run from a virtual environment: the quick start sources .venv")
    (tmp_path / ".venv").symlink_to(sys.prefix)
    done = run_bash(quickstart("cli"), tmp_path, {"LADDER_HOME": str(tmp_path)}, timeout=360)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "my.csv").read_text().splitlines()
    assert rows[0] == "text,label" and len(rows) == 41
    out = done.stdout.strip().splitlines()
    evaluation = json.loads(out[-1])
    assert evaluation["split"] == "test" and evaluation["n"] >= 1
    assert 0.0 <= evaluation["accuracy"] <= 1.0
    # Beside accuracy, what a one-class model could not hide.
    assert 0.0 <= evaluation["macro_f1"] <= 1.0 and 0.5 <= evaluation["majority_rate"] <= 1.0
    assert set(evaluation["per_class"]) == {"positive", "negative"}
    assert sum(map(sum, evaluation["confusion_matrix"])) == evaluation["n"]
    predicted = [line.split("\t") for line in out[:-1] if line.count("\t") == 2]
    assert [text for *_, text in predicted] == [
        "a friendly driver and a clean car",
        "late and rude",
    ]


def test_the_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not this repository's
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{page.name}: {target}"


def test_the_options_table_gives_each_family_default_to_its_own_setting():
    """The batch row names the batches and the learning-rate row the rates, per family (a shared
    phrase once put both in both rows)."""
    from side_trainer.options import FAMILY_DEFAULTS

    table = (ROOT / "docs" / "cli.md").read_text()
    for flag, key in (("--batch-size", "batch_size"), ("--lr", "lr")):
        row = next(line for line in table.splitlines() if f"| `{flag}` |" in line)
        default = row.split("|")[4]
        numbers = {float(n) for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-\d+)?", default)}
        assert numbers == {d[key] for d in FAMILY_DEFAULTS.values()}, (flag, default)


def test_the_compose_quick_start_is_what_make_compose_check_runs():
    """`make compose-check` (bench/compose_check.py) runs the README's compose commands, in the
    README's order; the block itself needs a Docker engine, which the suite does not."""
    from bench.compose_check import QUICK_START

    lines = [line.split("#")[0].strip() for line in quickstart("compose").splitlines()]
    positions = [lines.index(command) for command in QUICK_START.values()]
    assert positions == sorted(positions), positions
