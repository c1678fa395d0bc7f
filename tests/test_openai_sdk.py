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
