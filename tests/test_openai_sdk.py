"""The official OpenAI Python SDK, unchanged, against a real `ladder serve` process: chat and
completions, whole and streamed, and an unknown model's error class."""

from __future__ import annotations

import pytest
from test_generation import make_net
from test_service_faults import KEY, Server, env_for

from api.db import open_database
from backbone_worker.backbone import load_backbone
from side_trainer.artifacts import save_side_model

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_llama_dir):
    home = tmp_path_factory.mktemp("sdk-home")
    save_side_model(make_net(load_backbone(tiny_llama_dir), seed=6), home / "writer")
    db, _ = open_database(home)
    db.add_model("ft:tiny:writer", "tiny", str(home / "writer"), "job-sdk")
    server = Server(home, env_for(tiny_llama_dir))  # ready when it returns
    try:
        yield openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)
    finally:
        server.stop()


MESSAGES = [{"role": "user", "content": "swap red cat"}]


def test_chat_completions_whole_and_streamed(client):
    whole = client.chat.completions.create(
        model="ft:tiny:writer", messages=MESSAGES, max_tokens=6, temperature=0
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 6 and whole.usage.prompt_tokens > 0
    stream = client.chat.completions.create(
        model="ft:tiny:writer", messages=MESSAGES, max_tokens=6, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text


def test_completions_whole_and_streamed_on_the_bare_backbone(client):
    whole = client.completions.create(
        model="tiny", prompt="swap dog sun", max_tokens=5, temperature=0
    )
    streamed = client.completions.create(
        model="tiny", prompt="swap dog sun", max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text


def test_a_client_that_leaves_a_stream_frees_its_row(client):
    """A streamed request of 4,000 tokens, its connection closed after its first chunks: the
    server stops decoding it at once (the in-flight gauge falls back to 0 long before 4,000
    tokens could have been written), and serves the next request."""
    import time

    import httpx

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "ft:tiny:writer", "messages": MESSAGES, "max_tokens": 4000,
            "ignore_eos": True, "stream": True}  # fmt: skip

    def in_flight() -> float:
        text = httpx.get(f"{base}/metrics", headers=headers, timeout=30).text
        line = next(x for x in text.splitlines() if x.startswith("ladder_generations_in_flight"))
        return float(line.split()[-1])

    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        chunks = r.iter_lines()
        for _ in range(4):
            next(chunks)
        assert in_flight() == 1
    deadline = time.time() + 10
    while in_flight() != 0:
        assert time.time() < deadline, "the abandoned request still decodes"
        time.sleep(0.1)
    again = client.chat.completions.create(model="ft:tiny:writer", messages=MESSAGES, max_tokens=3)
    assert again.usage.completion_tokens <= 3


def test_an_unknown_model_is_the_sdks_not_found_error(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="ft:nobody", messages=MESSAGES)
    assert "ft:nobody" in str(caught.value)


def test_the_generation_serving_benchmark_runs_end_to_end(tmp_path, tiny_llama_dir, monkeypatch):
    """bench/gen_serve.py on a tiny random Llama: every figure measured, every request of the
    64 answered at full length (the figures themselves are the benchmark's, on SmolLM2)."""
    from bench import gen_serve

    save_side_model(make_net(load_backbone(tiny_llama_dir), seed=7), tmp_path / "writer")
    monkeypatch.setenv("LADDER_BACKBONES", f"tinyllama={tiny_llama_dir}")
    monkeypatch.delenv("LADDER_API_KEY", raising=False)
    report = gen_serve.run(str(tmp_path / "writer"), "tinyllama", new_tokens=4, repeats=1)
    many = report["sixty_four_concurrent"]
    assert many["answered"] == 64 and many["all_full_length"]
    assert set(report["ratios"]) == set(report["targets"])
    assert all(v > 0 for v in report["ratios"].values())
    assert report["backbone_eight_concurrent_vs_sequential"] > 0
