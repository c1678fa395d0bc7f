"""Generation data: chat and prompt/completion JSONL files, and their token ids with the mask of
the tokens a model learns.

A line is a chat in OpenAI's fine-tuning format, `{"messages": [{"role": "system" | "user" |
"assistant", "content": "...", "weight": 0 | 1}, ...]}` (`weight` on assistant messages only,
default 1), or a pair, `{"prompt": "...", "completion": "..."}`, kept as a user message and an
assistant reply of weight 1. A model learns the replies of weight 1, each with the token that
ends its turn, so that it learns to stop.

How a row becomes text:
- With the backbone tokenizer's chat template (SmolLM2-Instruct has one), every row, pairs
  included, is what `apply_chat_template` renders; SmolLM2's adds its default system prompt to a
  conversation without one, the model's own convention, kept. A reply's end of turn is the
  template's text after the reply up to its first special token (SmolLM2: `<|im_end|>`).
- Without a chat template, a chat is rendered with this fixed template, the same at training
  and at generation; END is the tokenizer's eos token, or its sep token where it has none (a BERT
  WordPiece tokenizer such as MiniLM's: `[SEP]`). Each message is a block,

      <|system|>\\n{content}\\n
      <|user|>\\n{content}\\n
      <|assistant|>\\n{content}END\\n

  and generation starts after `<|assistant|>\\n`. A pair is plain text, `{prompt}{completion}END`:
  a base model continues its prompt.
The text after the last reply's end of turn (the template's newline) is left out: nothing learns
from it.

How text becomes token ids (`render`, `prompt_ids`): the text is tokenized once, its special tokens
read from the text (`add_special_tokens=False`: the template and END already hold them), and a
token is learned when it starts in a reply of weight 1 or its end of turn (character offsets: a
fast tokenizer). Where one token would span a reply's start (byte-level BPE merges a prompt's
trailing space with a completion's first word), the text either side is tokenized apart, as
generation sees it: the ids before a reply are `prompt_ids` of the conversation up to it, and the
learned ids after them are what a model must generate, end of turn included.
"""

from __future__ import annotations

import json
import logging
import random
import reprlib
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from jinja2 import TemplateError as JinjaTemplateError

from backbone_worker.data import (
    BUILTINS,
    JSONL_SUFFIXES,
    DataError,
    FileSummary,
    _check_file,
    _Rows,
    cached_split,
    data_fingerprint,
)
from cache_store.errors import FixableError

log = logging.getLogger(__name__)

CLASSIFICATION, GENERATION = "classification", "generation"
CHAT, COMPLETION, MIXED = "chat", "completion", "mixed"
SYSTEM, USER, ASSISTANT = "system", "user", "assistant"
ROLES = (SYSTEM, USER, ASSISTANT)
OPENER = "<|assistant|>\n"  # the fixed template's start of a reply: where generation begins
# An assistant reply's content when the end of turn is read off a chat template.
PROBE = "Ladder0probe0reply"


class TemplateError(FixableError, ValueError):
    """A tokenizer this module cannot render with: a slow one (no character offsets), one without
    an end token, or a chat template whose replies end in no special token."""


@dataclass(frozen=True)
class GenExample:
    id: int  # 0-based data-row index in the source file (blank lines out), as data.Example's
    messages: tuple[
        dict, ...
    ]  # {"role", "content", "weight"}: weight 1 on replies to learn, else 0
    kind: str = CHAT  # CHAT, or COMPLETION (a prompt/completion line)

    @property
    def prompt(self) -> str | list[dict]:
        """What generation starts from (`prompt_ids`' argument): a pair's prompt, or the
        conversation before its last reply."""
        return self.messages[0]["content"] if self.kind == COMPLETION else list(self.messages[:-1])

    @property
    def reference(self) -> str:
        """The last reply: what a generation from `prompt` is compared with."""
        return self.messages[-1]["content"]


@dataclass
class GenDataset:
    spec: str  # the path the user passed
    examples: list[GenExample]  # after the optional --limit sample, ordered by id
    fingerprint: str  # sha256 of the source bytes and every setting that selects rows
    seed: int = 0
    _split_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def kind(self) -> str:
        """CHAT, COMPLETION, or MIXED (a file with lines of both)."""
        return _kind({e.kind for e in self.examples})

    def split(self, name: str) -> list[GenExample]:
        """The seeded 80/10/10 split by row id, in the order `data.Dataset.split` gives."""
        return cached_split(self.examples, self.seed, name, self._split_cache)


@dataclass(frozen=True)
class Rendered:
    id: int  # the example's data-row index
    input_ids: list[int]
    loss_mask: list[int]  # 1 on the tokens to learn


def _kind(kinds: set[str]) -> str:
    return MIXED if len(kinds) > 1 else next(iter(kinds))


# --- Reading and checking files -------------------------------------------------------------


def task_of_file(spec: str | Path, label_column: str = "label") -> str:
    """CLASSIFICATION or GENERATION, from a file's first row (a built-in spec is classification
    data): a JSONL object with `messages`, `prompt` or `completion` is generation data (its
    loader then names what a line lacks), a `label_column` classification data."""
    if str(spec) in BUILTINS:
        return CLASSIFICATION
    path = Path(spec).expanduser()
    _check_file(path)
    rows = _Rows(path)
    reader = iter(rows)
    try:
        first = next(reader, None)
    finally:
        reader.close()
    if path.suffix.lower() in JSONL_SUFFIXES and first is not None:
        if {"messages", "prompt", "completion"} & first.keys():
            return GENERATION
    if label_column in rows.columns:
        return CLASSIFICATION
    if not rows.columns:
        raise DataError(f"data file {path} has no data rows; add rows")
    keys = ", ".join(repr(c) for c in list(rows.columns)[:10])
    raise DataError(
        f"data file {path} is neither classification data (a {label_column!r} column) nor "
        f"generation data (JSONL objects with 'messages', or 'prompt' and 'completion'); its "
        f"first row has {keys}: write one of those formats"
    )


def _a(value) -> str:
    """A JSON value's type with its article, as an error names it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    kinds = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _shown(value) -> str:
    """A JSON value as an error shows it: short, and true, false and null in JSON's words."""
    return json.dumps(value) if value is None or isinstance(value, bool) else reprlib.repr(value)


def _messages(value, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        what = "an empty list" if value == [] else _a(value)
        raise DataError(
            f"{where}: 'messages' is {what}; write a list of "
            f'{{"role": ..., "content": ...}} objects'
        )
    messages = []
    for i, message in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{at} is {_a(message)}; write an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            what = f"role {_shown(role)}" if "role" in message else "no role"
            raise DataError(f"{at} has {what}; use system, user or assistant")
        content = message.get("content")
        if not isinstance(content, str):
            what = f"content {_a(content)}" if "content" in message else "no content"
            raise DataError(f"{at} has {what}; write the message's text as a string")
        weight = 1 if role == ASSISTANT else 0
        if "weight" in message:
            if role != ASSISTANT:
                raise DataError(
                    f"{at} is a {role} message with a weight; only assistant messages have "
                    f"one: remove it"
                )
            weight = message["weight"]
            if type(weight) is not int or weight not in (0, 1):
                raise DataError(
                    f"{at} has weight {_shown(weight)}; use 0 (not learned) or 1 (learned)"
                )
        messages.append({"role": role, "content": content, "weight": weight})
    if messages[0]["role"] == ASSISTANT:
        raise DataError(
            f"{where}: messages[0] is from the assistant; start with a system or user message, "
            f"what the reply answers"
        )
    if messages[-1]["role"] != ASSISTANT:
        raise DataError(
            f"{where}: the last message (messages[{len(messages) - 1}]) is from the "
            f"{messages[-1]['role']}; end with the assistant's reply"
        )
    if not any(m["weight"] for m in messages):
        raise DataError(
            f"{where}: no assistant message has weight 1, so nothing would be learned; give a "
            f"reply weight 1"
        )
    return tuple(messages)


def _example(row: dict, row_id: int, where: str) -> GenExample:
    """A checked line; `where` ("FILE line N") starts its errors."""
    pair = {"prompt", "completion"} & row.keys()
    if "messages" in row:
        if pair:
            raise DataError(
                f"{where} has both 'messages' and {' and '.join(map(repr, sorted(pair)))}; "
                f"write one format per line"
            )
        return GenExample(row_id, _messages(row["messages"], where), CHAT)
    if not pair:
        keys = ", ".join(repr(k) for k in list(row)[:10]) or "none"
        raise DataError(
            f"{where} has neither 'messages' nor 'prompt' and 'completion' (keys: {keys}); "
            f'write {{"messages": [...]}} or {{"prompt": ..., "completion": ...}}'
        )
    texts = {}
    for key, what in (
        ("prompt", "the text the completion follows"),
        ("completion", "the text to learn"),
    ):
        value = row.get(key)
        if not isinstance(value, str):
            problem = f"a {key!r} that is {_a(value)}" if key in row else f"no {key!r}"
            raise DataError(f"{where} has {problem}; write {what} as a string")
        if not value.strip():
            raise DataError(f"{where} has an empty {key!r}; write {what}")
        texts[key] = value
    messages = (
        {"role": USER, "content": texts["prompt"], "weight": 0},
        {"role": ASSISTANT, "content": texts["completion"], "weight": 1},
    )
    return GenExample(row_id, messages, COMPLETION)


def _read(path: Path, encoding: str | None = None) -> Iterator[GenExample]:
    """A JSONL file's examples, checked and read one line at a time."""
    _check_file(path)
    if path.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(
            f"data file {path} is not JSONL; write chat and prompt/completion data as .jsonl, "
            f"one JSON object per line"
        )
    rows = _Rows(path, encoding)
    for row_id, row in enumerate(rows):
        yield _example(row, row_id, f"{path} line {rows.line}")


def scan_gen_file(path: str | Path) -> FileSummary:
    """Check a chat or prompt/completion file as `load_gen_dataset` would, one line at a time:
    memory stays flat whatever the file's size. The summary has no labels."""
    path = Path(path)
    rows, kinds = 0, set()
    for example in _read(path):
        rows += 1
        kinds.add(example.kind)
    if not rows:
        raise DataError(f"data file {path} has no data rows; write one JSON object per line")
    return FileSummary(rows=rows, labels=[], has_pair=False, task=GENERATION, kind=_kind(kinds))


def load_gen_dataset(
    spec: str, *, limit: int | None = None, seed: int = 0, encoding: str | None = None
) -> GenDataset:
    """A chat or prompt/completion JSONL file's examples, every line checked (an error names the
    line, the problem and the fix). `limit` keeps a seeded sample of that many rows; the
    split of a row does not depend on it (`GenDataset.split`)."""
    if limit is not None and limit < 2:
        raise DataError(
            f"{{setting}} {limit} is too small",
            "pass at least 2 (or no {setting})",
            setting="load_dataset.limit",
        )
    if spec in BUILTINS:
        raise DataError(
            f"built-in data set {spec} is classification data; pass a chat or prompt/completion "
            f"JSONL file"
        )
    path = Path(spec).expanduser()
    examples = list(_read(path, encoding))
    n_rows = len(examples)
    if n_rows < 2:
        raise DataError(
            f"data file {path} has {n_rows} data row(s); fine-tuning needs at least 2: add rows"
        )
    if limit is not None and limit < n_rows:
        examples = sorted(random.Random(seed).sample(examples, limit), key=lambda e: e.id)
    # One file is either classification or generation data, so the classification settings
    # data_fingerprint also hashes (at their defaults here) never tell two data sets apart.
    fingerprint = data_fingerprint(spec, limit=limit, seed=seed, encoding=encoding)
    dataset = GenDataset(spec=spec, examples=examples, fingerprint=fingerprint, seed=seed)
    log.info("loaded %s: %d of %d rows (%s)", spec, len(examples), n_rows, dataset.kind)
    return dataset


# --- Text and token ids ----------------------------------------------------------------------


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(tokenizer, messages: Sequence[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    except JinjaTemplateError as exc:  # a template's raise_exception(...)
        raise DataError(
            f"{where}: the backbone's chat template refuses the conversation ({exc}); change "
            f"it as the template asks"
        ) from None


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """`text`'s token ids and character spans, special tokens read from the text."""
    if not tokenizer.is_fast:
        raise TemplateError(
            f"{type(tokenizer).__name__} is a slow tokenizer, without character offsets; load "
            f"a fast one (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


def _eos(tokenizer) -> str | None:
    """END: the eos token, or the sep token where there is none (BERT WordPiece)."""
    return tokenizer.eos_token or tokenizer.sep_token


def _turn_end(tokenizer) -> tuple[str, int]:
    """The text that ends a reply's turn and the id of its end token. Without a chat template:
    END. With one: the template's text after a reply up to and including its first special
    token (SmolLM2: "<|im_end|>")."""
    if not _has_template(tokenizer):
        end = _eos(tokenizer)
        if end is None:
            raise TemplateError(
                "the tokenizer has neither an eos nor a sep token, so a generation could not "
                "end; use a tokenizer with an eos token"
            )
        return end, tokenizer.convert_tokens_to_ids(end)
    conversation = [{"role": USER, "content": "?"}, {"role": ASSISTANT, "content": PROBE}]
    text = _apply(tokenizer, conversation, False, "a probe conversation")
    after = text[text.find(PROBE) + len(PROBE) :] if PROBE in text else ""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    for token, (_, end) in zip(*_encode(tokenizer, after)):
        if token in special:
            return after[:end], token
    raise TemplateError(
        f"the backbone's chat template ends an assistant reply with {after!r}, no special "
        f"token, so a model could not learn to stop; use a backbone whose template ends a turn "
        f"with one, or clear its chat template (the fixed template)"
    )


def end_tokens(tokenizer) -> list[int]:
    """The ids that end a generation: the eos token (the sep token where there is none) and a
    chat template's end of turn."""
    eos = _eos(tokenizer)
    ends = [tokenizer.convert_tokens_to_ids(eos)] if eos is not None else []
    turn_end = _turn_end(tokenizer)[1]
    return ends + [turn_end] * (turn_end not in ends)


def _pieces(tokenizer, messages: Sequence[dict], kind: str, prompt: bool, where: str):
    """The conversation's text as (text, weight) pieces: the text between replies (weight 0)
    and each reply with its end of turn (its weight). `prompt`: the text ends with the opener
    of the next reply; else with the last reply's end of turn."""
    end = _turn_end(tokenizer)[0]
    if _has_template(tokenizer):
        full = _apply(tokenizer, messages, prompt, where)
        pieces, position = [], 0
        for k, message in enumerate(messages):
            if message["role"] != ASSISTANT:
                continue
            opener = _apply(tokenizer, messages[:k], True, where)
            reply = message["content"] + end
            # A template that rendered a prefix of a conversation otherwise than its start
            # would train on a text that generation never shows.
            fits = position <= len(opener) and full.startswith(opener)
            if not (fits and full.startswith(reply, len(opener))):
                raise DataError(
                    f"{where}: the backbone's chat template does not render messages[{k}] "
                    f"verbatim after the messages before it (it may trim or rewrite it); "
                    f"remove leading and trailing spaces from that message"
                )
            pieces += [(full[position : len(opener)], 0), (reply, message["weight"])]
            position = len(opener) + len(reply)
        return pieces + [(full[position:], 0)] * prompt
    plain = kind == COMPLETION
    opener, after = ("", "") if plain else (OPENER, "\n")
    pieces, between = [], ""
    for message in messages:
        if message["role"] == ASSISTANT:
            pieces += [(between + opener, 0), (message["content"] + end, message["weight"])]
            between = after
        else:
            content = message["content"]
            between += content if plain else f"<|{message['role']}|>\n{content}\n"
    return pieces + [(between + opener, 0)] * prompt


def _tokens(tokenizer, text: str, bounds: list[int]) -> tuple[list[int], list[int]]:
    """`text`'s token ids and start offsets, tokenized apart at any of `bounds` (offsets where
    one piece ends and the next starts) that a token would otherwise span."""
    ids, spans = _encode(tokenizer, text)
    cut = next((b for s, e in spans for b in bounds if s < b < e), None)
    if cut is None:
        return ids, [s for s, _ in spans]
    left = _tokens(tokenizer, text[:cut], [b for b in bounds if b < cut])
    right = _tokens(tokenizer, text[cut:], [b - cut for b in bounds if b > cut])
    return left[0] + right[0], left[1] + [s + cut for s in right[1]]


def _ids_and_weights(tokenizer, pieces) -> tuple[list[int], list[int]]:
    """The pieces' token ids, each token weighted as the piece it starts in."""
    text, offsets = "", []
    for piece, _ in pieces:
        offsets.append(len(text))
        text += piece
    ids, starts = _tokens(tokenizer, text, offsets[1:])
    weights = [pieces[bisect_right(offsets, s) - 1][1] for s in starts]
    return ids, weights


def render(tokenizer, example: GenExample, max_length: int) -> tuple[list[int], list[int]]:
    """A row's token ids (whole conversation, special tokens as its template or END puts them)
    and its loss mask: 1 on the tokens of the replies of weight 1 and on each one's end-of-turn
    token. Longer than `max_length`, the end is cut: the mask may then hold no 1
    (`render_all` skips such rows)."""
    pieces = _pieces(tokenizer, example.messages, example.kind, False, f"data row {example.id}")
    ids, mask = _ids_and_weights(tokenizer, pieces)
    return ids[:max_length], mask[:max_length]


def render_all(tokenizer, examples: Sequence[GenExample], max_length: int) -> list[Rendered]:
    """Every example rendered, but those left with no token to learn in `max_length` tokens:
    they are skipped, counted in one warning; all of them skipped is an error."""
    rendered, skipped = [], []
    for example in examples:
        ids, mask = render(tokenizer, example, max_length)
        if any(mask):
            rendered.append(Rendered(id=example.id, input_ids=ids, loss_mask=mask))
        else:
            skipped.append(example.id)
    if skipped and not rendered:
        raise DataError(
            f"no row has a token to learn within {{setting}} {max_length}: every prompt fills it",
            "raise {setting} or shorten the prompts",
            setting="CacheOptions.max_length",
        )
    if skipped:
        log.warning(
            "%d of %d rows skipped: their prompts fill max_length %d, leaving no token to learn "
            "(first: data row %d); raise max_length or shorten them",
            len(skipped),
            len(examples),
            max_length,
            skipped[0],
        )
    return rendered


def seq2seq_source(prompt: str | Sequence[dict]) -> str:
    """What an encoder-decoder (T5) reads for a prompt: a pair's prompt as it is, or the
    conversation so far in the fixed template's text, ending with the reply's opener. T5 has no
    chat template, and its decoder writes the reply alone (its last reply: earlier ones are
    context, whatever their weight)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in prompt) + OPENER


def prompt_ids(tokenizer, prompt: str | Sequence[dict]) -> list[int]:
    """The ids a generation starts from: a prompt string (a pair's prompt; a user message where
    the tokenizer has a chat template) or a conversation so far (messages as `GenExample` holds
    them; a weight may be left out), ending with the opener of the assistant's reply. What a
    model generates after them, up to its end of turn, is what `render` learns."""
    if isinstance(prompt, str):
        messages, kind = [{"role": USER, "content": prompt}], COMPLETION
    else:
        messages, kind = [{"weight": 0, **m} for m in prompt], CHAT
    return _ids_and_weights(tokenizer, _pieces(tokenizer, messages, kind, True, "the prompt"))[0]
