"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright; `make
install` installs both): with an API key set, a bad upload's error is shown, a file dropped on the
page becomes a job, the job shows its progress and succeeds with its curve drawn and its figures
against the majority class, its model predicts in the playground, a model that learnt nothing
says so on its job and in the models list, a failed job shows its error, and the model is deleted
from the models page; a generative job (a chat file on a tiny Llama) shows its loss curves, sample
generations and exact match.

`LADDER_CONSOLE_SCREENSHOTS=DIR` saves a screenshot of each page there, and
`LADDER_CONSOLE_BACKBONE=minilm` runs it on MiniLM instead of a tiny random BERT (the README's
screenshots: predictions that mean something)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from test_cli import write_csv
from test_service_process import free_port, start_server

playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright")

KEY = "console-test-key"
BACKBONE = os.environ.get("LADDER_CONSOLE_BACKBONE", "tiny")
LOSS_RGB = (217, 72, 15)  # console.js COLORS.loss


def chromium() -> str:
    for name in (os.environ.get("LADDER_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (found := shutil.which(name)):
            return found
    if os.environ.get("LADDER_SKIP_BROWSER") == "1":
        pytest.skip("LADDER_SKIP_BROWSER=1 and no Chromium found")
    pytest.fail(
        "no Chromium found: `make install` installs Debian's chromium (as root), or set "
        "LADDER_CHROMIUM to a Chromium binary (LADDER_SKIP_BROWSER=1 skips this test)"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("console")
    port = free_port()
    env = {
        "LADDER_BACKBONES": f"tiny={tiny_bert_dir}",
        "LADDER_PRELOAD": BACKBONE,
        "LADDER_EXECUTOR": "thread",
        "LADDER_API_KEY": KEY,
    }
    proc = start_server(home, port, env)
    yield f"http://127.0.0.1:{port}", home
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield instance
        instance.close()


def shot(page, name: str) -> None:
    where = os.environ.get("LADDER_CONSOLE_SCREENSHOTS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(where) / f"{name}.png"), full_page=True)


def drop_file(page, selector: str, name: str, content: str) -> None:
    """Drag and drop a file onto an element, as a user's drop does (a DataTransfer with it)."""
    transfer = page.evaluate_handle(
        """([name, content]) => {
            const t = new DataTransfer();
            t.items.add(new File([content], name, { type: "text/csv" }));
            return t;
        }""",
        [name, content],
    )
    page.dispatch_event(selector, "drop", {"dataTransfer": transfer})


def loss_pixels(page) -> int:
    """Pixels of the chart's canvas in the train-loss colour: the curve was really drawn."""
    return page.evaluate(
        """([r, g, b]) => {
            const canvas = document.querySelector("#chart canvas");
            if (!canvas) return 0;
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < data.length; i += 4) {
                if (Math.abs(data[i] - r) < 12 && Math.abs(data[i + 1] - g) < 12
                    && Math.abs(data[i + 2] - b) < 12 && data[i + 3] > 200) n++;
            }
            return n;
        }""",
        list(LOSS_RGB),
    )


def upload(base: str, headers: dict, path: Path) -> str:
    with open(path, "rb") as handle:
        files = {"file": (path.name, handle, "text/csv")}
        answer = httpx.post(
            f"{base}/v1/files", headers=headers, data={"purpose": "fine-tune"}, files=files
        )
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def create_job(base: str, headers: dict, file_id: str, suffix: str, **hyperparameters) -> dict:
    body = {"model": BACKBONE, "training_file": file_id, "suffix": suffix}
    answer = httpx.post(
        f"{base}/v1/fine_tuning/jobs",
        headers=headers,
        json={**body, "hyperparameters": {"kept_layers": [0, 2], **hyperparameters}},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_console_upload_job_chart_predict_delete(server, browser, tmp_path):
    base, _ = server
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)

    # Without the key, the API's 401 message is shown and the key is asked for.
    page.goto(f"{base}/")
    page.wait_for_selector("#key-panel:not([hidden])")
    assert "API key" in page.inner_text("#key-error")
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.wait_for_selector("#jobs-empty:not([hidden])")

    # A bad upload: the server's validation message, inline.
    page.click("nav >> text=Fine-tune")
    bad = tmp_path / "bad.csv"
    bad.write_text("text,sentiment\nfine,pos\n")
    page.set_input_files("#file-input", str(bad))
    page.wait_for_selector("#upload-error:not(:empty)")
    assert "label" in page.inner_text("#upload-error")
    shot(page, "upload-error")

    # A good file, dropped: its rows and labels, and the hyperparameters resolved for it.
    drop_file(page, "#drop", "rides.csv", Path(write_csv(tmp_path / "d.csv", n=200)).read_text())
    page.wait_for_selector("#file-card:not([hidden])")
    assert "200 rows" in page.inner_text("#file-card")
    page.select_option("#backbone", BACKBONE)
    page.wait_for_selector(f"#hp-table[data-model='{BACKBONE}'] #hp-n_epochs")
    assert page.get_attribute("#hp-n_epochs", "placeholder") == "10"  # under 1,000 rows
    # The side heads the server resolves for this backbone: a count, not null.
    headers = {"Authorization": f"Bearer {KEY}"}
    file_id = httpx.get(f"{base}/v1/files", headers=headers).json()["data"][0]["id"]
    resolved = httpx.get(
        f"{base}/v1/fine_tuning/hyperparameters",
        headers=headers,
        params={"model": BACKBONE, "training_file": file_id},
    ).json()["data"]
    heads = next(hp["value"] for hp in resolved if hp["name"] == "side_heads")
    assert page.get_attribute("#hp-side_heads", "placeholder") == str(heads)
    assert isinstance(heads, int) and heads >= 1

    # A bad setting: the API's message, the field marked; then a good one starts the job.
    page.fill("#hp-n_epochs", "0")
    page.click("#create-job")
    page.wait_for_selector("#job-error:not(:empty)")
    assert "n_epochs" in page.inner_text("#job-error")
    assert "invalid" in page.get_attribute("#hp-n_epochs", "class")
    page.fill("#hp-n_epochs", "3")
    page.fill("#hp-reduction_factor", "4")
    page.fill("#hp-kept_layers", "0, 2")
    page.fill("#suffix", "rides")
    shot(page, "new-job")
    page.click("#create-job")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    # While it runs: a bar with the phase and the counts of the latest progress event.
    page.wait_for_selector("#progress:not([hidden])[data-step]", timeout=180_000)
    phases = ("importance", "width map", "caching", "training", "evaluating")
    assert page.get_attribute("#progress", "data-step") in phases
    assert re.search(r"\d+/\d+", page.inner_text("#progress-stage"))
    assert "auto" not in page.inner_text("#job-details .hp-list")  # resolved from the start
    page.wait_for_selector("#job-status [data-status=succeeded]", timeout=180_000)
    job = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()

    # The last phase, done; the curve (three epochs of the kept attempt, the loss line on the
    # canvas); the events log.
    page.wait_for_selector("#progress[data-ended=succeeded]")
    assert page.get_attribute("#progress", "data-step") == "evaluating"
    bar = page.locator("#progress-bar")
    assert bar.evaluate("b => b.value") == bar.evaluate("b => b.max") > 0
    page.wait_for_selector("#chart[data-epochs='3'] canvas")
    assert loss_pixels(page) > 50
    assert "epoch 3" in page.inner_text("#events")
    # The test split's figures beside the majority class's, as the job's result has them.
    test = job["result"]["test"]
    row = page.locator("#splits tr[data-split=test]")
    assert row.locator(".macro-f1").inner_text() == f"{test['macro_f1']:.3f}"
    assert row.locator(".majority-rate").inner_text() == f"{100 * test['majority_rate']:.1f}%"
    assert str(test["n"]) in row.inner_text()
    cells = page.locator("#confusion tbody tr").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(c => Number(c.textContent)))"
    )
    assert cells == test["confusion_matrix"]
    assert page.locator("#per-class tbody tr").count() == len(test["labels"])
    # The file by its name; the settings as the job resolved them (side heads: a count).
    details = page.inner_text("#job-details")
    assert "Test macro-F1" in details and "rides.csv" in details and "Duration" in details
    used = job["hyperparameters"]["side_heads"]
    assert isinstance(used, int)
    setting = page.inner_text("#job-details [data-setting=side_heads]")
    assert setting.split() == ["side_heads", str(used)]
    shot(page, "job")

    first_model = page.inner_text("#job-details a[href^='#/playground']")

    # A sweep created through the API while the jobs list is open: its status changes there
    # live (the events stream), and its page lists both candidates and the one kept.
    page.click("nav >> text=Jobs")
    page.wait_for_selector("#jobs-table [data-status=succeeded]")
    sweep = create_job(base, headers, file_id, "sweep", learning_rate=[1e-3, 3e-3], n_epochs=6)
    # Every row the same text: the model cannot beat the majority class, whatever it tries.
    same = tmp_path / "same.csv"
    same.write_text(
        "text,label\n" + "".join(f"the ride,{'pos' if k % 4 else 'neg'}\n" for k in range(120))
    )
    collapsed = create_job(
        base, headers, upload(base, headers, same), "same", n_epochs=1, init="random"
    )
    # An upload damaged on the server after it was checked: the job fails validating it.
    broken_id = upload(base, headers, Path(write_csv(tmp_path / "broken.csv", n=120)))
    (server[1] / "files" / f"{broken_id}.csv").write_text("text,sentiment\nfine,pos\n")
    broken = create_job(base, headers, broken_id, "broken")
    page.reload()
    listed = page.locator(f"#jobs-table tr[data-job='{sweep['id']}'] .status")
    assert listed.get_attribute("data-status") not in ("succeeded", "failed", "cancelled")
    page.wait_for_selector(
        f"#jobs-table tr[data-job='{sweep['id']}'] [data-status=succeeded]", timeout=180_000
    )
    shot(page, "jobs")
    page.click(f"a[href='#/jobs/{sweep['id']}']")
    page.wait_for_selector("#candidates-card:not([hidden])")
    assert page.locator("#candidates tbody tr").count() == 2
    assert page.locator("#candidates tr.chosen").count() == 1
    table = page.inner_text("#candidates")
    assert "learning_rate" in table and "0.001" in table and "0.003" in table

    # Both models side by side in the playground: a label and one bar per label for each.
    sweep_model = page.inner_text("#job-details a[href^='#/playground']")
    page.click("#job-details a[href^='#/playground']")
    page.wait_for_selector("#pick-models input:checked")
    page.check(f"#pick-models input[value='{first_model}']")
    texts = ["the ride was lovely", "the ride was awful", "the ride was fine I guess"]
    page.fill("#texts", "\n".join(texts))
    page.click("#predict")
    page.wait_for_selector(".scores")
    assert page.locator(".prediction").count() == 3
    assert page.locator(".prediction").first.locator(".scores").count() == 2
    assert page.locator(".prediction").first.locator(".bar-row").count() == 4  # 2 labels x 2
    # What each card shows is what the API answers for that model and that text.
    for model in (first_model, sweep_model):
        direct = httpx.post(
            f"{base}/v1/predict", headers=headers, json={"model": model, "inputs": texts}
        ).json()["predictions"]
        for k, expected in enumerate(direct):
            card = page.locator(".prediction").nth(k).locator(f".scores[data-model='{model}']")
            assert card.locator(".label").inner_text() == expected["label"]
            top = f"{100 * expected['scores'][expected['label']]:.1f}%"
            assert top in card.inner_text()
    shot(page, "playground")
    # An input over the API's 10,000 characters: its 400 message is shown.
    page.fill("#texts", "x" * 10_001)
    page.click("#predict")
    page.wait_for_selector("#predict-error:not(:empty)")
    assert "10000 characters" in page.inner_text("#predict-error")

    # The failed job: its error, code and message, where the curve would be.
    page.goto(f"{base}/#/jobs/{broken['id']}")
    page.wait_for_selector("#job-status [data-status=failed]", timeout=180_000)
    page.wait_for_selector("#chart-card", state="hidden")
    failure = page.inner_text("#job-failure")
    assert "invalid_training_data" in failure and "label" in failure
    shot(page, "failed-job")

    # The model that learnt nothing: the warning and every attempt on its job's page.
    page.goto(f"{base}/#/jobs/{collapsed['id']}")
    page.wait_for_selector("#job-status [data-status=succeeded]", timeout=180_000)
    page.wait_for_selector("#job-warning:not([hidden])")
    assert "majority class" in page.inner_text("#job-warning")
    assert page.locator("#attempts tbody tr").count() == 3
    shot(page, "warned-job")
    collapsed_model = page.inner_text("#job-details a[href^='#/playground']")

    # The models page: each model's file, job and test figures; the warning; deleting a model.
    page.click("nav >> text=Models")
    row = page.locator(f"#side-models tbody tr[data-model='{first_model}']")
    row.wait_for()
    assert row.locator(".macro-f1").inner_text() == f"{test['macro_f1']:.3f}"
    assert "rides.csv" in row.inner_text() and job_id in row.inner_text()
    assert row.locator(".warning-note").count() == 0
    warned = page.locator(f"#side-models tbody tr[data-model='{collapsed_model}']")
    assert "majority class" in warned.locator(".warning-note").inner_text()
    assert "same.csv" in warned.inner_text()
    shot(page, "models")
    page.once("dialog", lambda dialog: dialog.accept())
    row.locator("button.danger").click()
    row.wait_for(state="detached")
    listed = httpx.get(f"{base}/v1/models", headers=headers).json()["data"]
    assert first_model not in [m["id"] for m in listed]
    assert errors == [], errors


def test_console_is_served_without_a_key_and_the_api_is_not(server):
    base, _ = server
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "Ladder console" in page.text
    assert httpx.get(f"{base}/console/console.js").status_code == 200
    assert httpx.get(f"{base}/console/vendor/uPlot.iife.min.js").status_code == 200
    assert httpx.get(f"{base}/v1/models").status_code == 401


@pytest.fixture
def writer_server(tmp_path, tiny_llama_dir, tiny_bert_dir):
    """A server with a tiny random Llama (a backbone that writes) beside a tiny BERT."""
    home = tmp_path / "home"
    home.mkdir()
    port = free_port()
    env = {
        "LADDER_BACKBONES": f"tinyllama={tiny_llama_dir},tiny={tiny_bert_dir}",
        "LADDER_PRELOAD": "tinyllama",
        "LADDER_EXECUTOR": "thread",
        "LADDER_API_KEY": KEY,
    }
    proc = start_server(home, port, env)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def test_console_generative_job(writer_server, browser, tmp_path):
    """A chat file uploaded through the page is shown as a generation file; an encoder backbone's
    400 is shown; the job's page plots train and validation loss, shows each epoch's sample
    generations as they arrive and, once it succeeds, exact match and loss on the test split
    with its examples; the models page marks the model generative, and the playground leaves it
    out."""
    from test_generation import write_pairs

    base = writer_server
    headers = {"Authorization": f"Bearer {KEY}"}
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(20_000)
    page.add_init_script(f"sessionStorage.setItem('ladder-api-key', '{KEY}')")

    page.goto(f"{base}/#/new")
    chats = Path(write_pairs(tmp_path / "chats.jsonl", n=80, chat=True))
    page.set_input_files("#file-input", str(chats))
    page.wait_for_selector("#file-card[data-task=generation]")
    card = page.inner_text("#file-card")
    assert "80 rows" in card and "chats" in card and "labels" not in card

    # An encoder backbone: the server's 400 on the page, the backbone marked.
    page.select_option("#backbone", "tiny")
    page.wait_for_selector("#hp-table[data-model='tiny'] #hp-n_epochs")
    page.click("#create-job")
    page.wait_for_selector("#job-error:not(:empty)")
    assert "decoder-only" in page.inner_text("#job-error")
    assert "invalid" in page.get_attribute("#backbone", "class")

    page.select_option("#backbone", "tinyllama")
    page.wait_for_selector("#hp-table[data-model='tinyllama'] #hp-n_epochs")
    page.fill("#hp-n_epochs", "2")
    page.fill("#hp-kept_layers", "0, 2")
    page.fill("#hp-reduction_factor", "2")
    page.select_option("#hp-init", "random")
    page.fill("#suffix", "swap")
    page.click("#create-job")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]

    # Each epoch: the loss curves, and that epoch's three sample generations.
    page.wait_for_selector("#samples-card:not([hidden])", timeout=120_000)
    assert page.locator("#samples tbody tr").count() == 3
    page.wait_for_selector("#job-status [data-status=succeeded]", timeout=120_000)
    page.wait_for_selector("#chart[data-epochs='2'] canvas")
    assert loss_pixels(page) > 50
    legend = page.inner_text("#chart")
    assert "validation loss" in legend and "macro-F1" not in legend
    assert page.get_attribute("#samples-card", "data-epoch") == "2"
    job = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", headers=headers).json()
    events = httpx.get(
        f"{base}/v1/fine_tuning/jobs/{job_id}/events", headers=headers, params={"limit": 100}
    ).json()["data"]
    last = next(e["data"] for e in events if e["data"].get("epoch") == 2 and "samples" in e["data"])
    shown = page.locator("#samples tbody td.completion").all_inner_texts()
    assert [s.strip() for s in shown] == [s["completion"].strip() for s in last["samples"]]

    # Succeeded: the test split's exact match and loss as the result has them, its examples,
    # and none of a classifier's sections.
    test = job["result"]["test"]
    page.wait_for_selector("#generation-card:not([hidden])")
    assert page.inner_text("#generation-test .exact-match") == f"{100 * test['exact_match']:.1f}%"
    assert page.inner_text("#generation-test .loss") == f"{test['loss']:.3f}"
    assert page.locator("#test-examples tbody tr").count() == len(test["examples"]) > 0
    assert "Test exact match" in page.inner_text("#job-details")
    assert page.is_hidden("#evaluation-card") and page.is_hidden("#attempts-card")
    assert page.locator("#job-details a[href^='#/playground']").count() == 0
    shot(page, "generative-job")

    # The jobs list and the models page: exact match where a classifier has its accuracy; the
    # model marked generative, and not offered to try.
    exact = f"{100 * test['exact_match']:.1f}% exact match"
    page.click("nav >> text=Jobs")
    assert exact in page.locator(f"#jobs-table tr[data-job='{job_id}']").inner_text()
    page.click("nav >> text=Models")
    row = page.locator(f"#side-models tbody tr[data-model='{job['fine_tuned_model']}']")
    row.wait_for()
    assert row.get_attribute("data-task") == "generate"
    assert row.locator(".exact-match").inner_text() == exact
    assert row.locator("a[href^='#/playground']").count() == 0
    page.click("nav >> text=Playground")
    page.wait_for_selector("#generative-note:not([hidden])")
    assert page.locator("#pick-models input").count() == 0

    # Chat: the model beside the bare backbone on the same message, both replies streamed in
    # (the backbone's, from a random Llama that never ends early, piece by piece) and each the
    # text /v1/chat/completions gives for the same request.
    model = job["fine_tuned_model"]
    page.click("nav >> text=Models")
    page.locator(f"#side-models tbody tr[data-model='{model}'] a[href^='#/chat']").click()
    page.wait_for_selector(
        "#chat-panes select[data-pane='1'] option[value='tinyllama']", state="attached"
    )
    assert page.input_value("#chat-panes select[data-pane='0']") == model
    page.select_option("#chat-panes select[data-pane='1']", "tinyllama")
    page.fill("#chat-max-tokens", "8")
    page.fill("#chat-input", "swap red cat")
    page.evaluate(
        """() => {
        window.__updates = 0;
        new MutationObserver(() => { window.__updates += 1; }).observe(
          document.querySelector("#chat-panes"), {subtree: true, characterData: true, childList: true});
      }"""
    )
    page.click("#chat-send")
    page.wait_for_function("() => !document.querySelector('#chat-send').disabled")
    assert page.inner_text("#chat-error") == ""
    replies = [
        page.locator(f".chat-log[data-pane='{k}'] .chat-assistant").inner_text() for k in (0, 1)
    ]
    for name, reply in zip((model, "tinyllama"), replies):
        expected = httpx.post(
            f"{base}/v1/chat/completions",
            headers=headers,
            json={"model": name, "messages": [{"role": "user", "content": "swap red cat"}],
                  "max_tokens": 8, "temperature": 0},
        ).json()["choices"][0]["message"]["content"]  # fmt: skip
        assert reply == expected.strip() or reply == expected
    assert page.evaluate("window.__updates") > 2  # pieces, not one whole reply per pane
    shot(page, "chat")
    assert errors == [], errors
