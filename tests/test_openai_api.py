"""OpenAI-compatible generation endpoints (`/v1/chat/completions`, `/v1/completions`) through
FastAPI's test client, on a tiny random Llama backbone and a generative side model on it."""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from test_generation import head_of, make_net

from api.app import create_app
from backbone_worker.backbone import load_backbone
from backbone_worker.chat import end_tokens, prompt_ids
from side_trainer.artifacts import save_side_model
from side_trainer.decoding import Decoder, Sampling

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    home = tmp_path_factory.mktemp("home")
    backbone = load_backbone(tiny_llama_dir)
    net = make_net(backbone, seed=5)
    save_side_model(net, home / "writer")
    mp = pytest.MonkeyPatch()
    mp.setenv("LADDER_BACKBONES", f"tiny={tiny_llama_dir},bert={tiny_bert_dir}")
    mp.delenv("LADDER_API_KEY", raising=False)
    app = create_app(home=home, executor="thread", preload=["tiny"])
    with TestClient(app) as client:
        deadline = time.time() + 30
        while client.get("/ready").status_code != 200 and time.time() < deadline:
            time.sleep(0.1)
        app.state.ladder.db.add_model("ft:writer", "tiny", str(home / "writer"), "job-x")
        yield {"client": client, "backbone": backbone, "net": net}
    mp.undo()


MESSAGES = [{"role": "user", "content": "swap red cat"}]


def alone(service, net, max_tokens: int):
    backbone = service["backbone"]
    decoder = Decoder(backbone, head_of(backbone), [net], end_tokens(backbone.tokenizer))
    return decoder.generate(
        [prompt_ids(backbone.tokenizer, MESSAGES)], Sampling(max_tokens=max_tokens)
    )[0]


@pytest.mark.parametrize("model", ["ft:writer", "tiny"])
def test_a_chat_completion_is_what_the_model_writes_greedily(service, model):
    answer = service["client"].post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = alone(service, service["net"] if model != "tiny" else None, 6)
    assert body["object"] == "chat.completion" and body["model"] == model
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == expected.finish_reason
    assert body["usage"]["completion_tokens"] == len(expected.token_ids)
    assert body["usage"]["prompt_tokens"] == expected.prompt_tokens


def events(response) -> list:
    lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_a_streamed_chat_completion_sends_the_same_text_in_openai_chunks(service):
    client = service["client"]
    request = {"model": "ft:writer", "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    whole = client.post("/v1/chat/completions", json=request).json()
    streamed = client.post(
        "/v1/chat/completions",
        json={**request, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    chunks = events(streamed)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == [
        whole["choices"][0]["finish_reason"]
    ]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_completions_and_concurrent_requests(service):
    import concurrent.futures

    client = service["client"]

    def ask(k):
        return client.post(
            "/v1/completions",
            json={"model": "ft:writer", "prompt": f"swap dog {k}", "max_tokens": 5,
                  "temperature": 0},
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(6)))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    again = ask(3).json()["choices"][0]["text"]
    assert answers[3].json()["choices"][0]["text"] == again  # alone or among others, the same
    assert answers[0].json()["object"] == "text_completion"


@pytest.mark.parametrize(
    "request_, status, param",
    [
        ({"model": "ft:nobody", "messages": MESSAGES}, 404, "model"),
        ({"model": "tiny", "messages": MESSAGES, "n": 2}, 400, "n"),
        ({"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
        ({"model": "tiny", "messages": MESSAGES, "stop": [""]}, 400, "stop"),
        ({"model": "bert", "messages": MESSAGES}, 400, "model"),
    ],
)
def test_bad_generation_requests_get_an_error_naming_the_field(service, request_, status, param):
    answer = service["client"].post("/v1/chat/completions", json=request_)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["message"]


def test_generative_models_share_the_backbones_head_and_leave_the_decoder_when_done(
    service, tmp_path
):
    """Every generative side model of a backbone writes through the backbone's one frozen head,
    which the registry does not count in each model's bytes (SmolLM2's is 113 MB: a budget
    that counted it would hold a handful of models), and a model leaves the decoder when its
    last request ends, so the registry's budget is what holds models in memory."""
    from side_trainer.memory import module_bytes

    state = service["client"].app.state.ladder
    save_side_model(make_net(service["backbone"], seed=6), tmp_path / "writer2")
    state.db.add_model("ft:writer2", "tiny", str(tmp_path / "writer2"), "job-y")
    for model in ("ft:writer", "ft:writer2"):
        r = service["client"].post(
            "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 3}
        )
        assert r.status_code == 200, r.text
    registry, head = state.registry, state.registry.heads["tiny"]
    for model in ("ft:writer", "ft:writer2"):
        side = registry.sides[model]
        assert side.lm is head
        assert registry._bytes[model] + head.weight.nbytes <= module_bytes(side)
    deadline = time.time() + 10
    while state.generator.decoders["tiny"].by_key and time.time() < deadline:
        time.sleep(0.05)
    assert state.generator.decoders["tiny"].by_key == {}
