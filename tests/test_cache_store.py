"""cache_store: codecs against independent computations, part commit protocol, batches."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
import weakref

import numpy as np
import pytest
import torch
import zarr

from cache_store import (
    ActivationStore,
    StateRangeError,
    StoreError,
    StoreMismatchError,
    bytes_per_element,
    decode,
    encode,
)
from cache_store.codecs import Encoded, bf16_bits
from cache_store.layout import CHUNK_BYTES, chunk_rows, part_path

D = 8
STATES = ("emb", "layer_0", "layer_3")


def settings(**overrides) -> dict:
    base = {
        "backbone": "tiny-bert",
        "data_fingerprint": "abc",
        "max_length": 128,
        "layers": [0, 3],
        "dtype": "fp16",
    }
    return {**base, **overrides}


def codec(dtype: str) -> tuple[str, int]:
    """A test's dtype: "fp16", "bf16", "int8" (a store written before outliers were kept apart)
    or "int8/K" (each token's K largest channels kept apart): (stored dtype, outliers)."""
    name, _, k = dtype.partition("/")
    return name, int(k or 0)


def dtype_settings(dtype: str) -> dict:
    name, k = codec(dtype)
    return settings(dtype=name, **({"int8_outliers": k} if k else {}))


def round_trip(x: np.ndarray, dtype: str) -> np.ndarray:
    name, k = codec(dtype)
    return decode(encode(x, name, k), name)


def make_plan(*sizes_and_splits: tuple[int, str]) -> list[dict]:
    return [{"index": i, "split": split, "n": n} for i, (n, split) in enumerate(sizes_and_splits)]


def make_part(index: int, n: int, streams=("enc",), seed: int = 0, max_len: int = 7) -> dict:
    """Random ragged part: example ids index*1000 + j, lengths in [0, max_len)."""
    rng = np.random.default_rng(1000 * index + seed)
    out = {
        "example_ids": index * 1000 + np.arange(n),
        "labels": rng.integers(0, 3, n),
        "streams": {},
    }
    for s in streams:
        lengths = rng.integers(0, max_len, n)
        lengths[0] = max_len  # at least one full row, so padding shows up in batches
        out["streams"][s] = {
            "input_ids": [rng.integers(1, 30000, length) for length in lengths],
            "states": {
                k: [rng.normal(0, 3, (length, D)).astype(np.float32) for length in lengths]
                for k in STATES
            },
        }
    return out


def write(store: ActivationStore, index: int, part: dict) -> bool:
    return store.write_part(index, part["example_ids"], part["labels"], part["streams"])


def build(tmp_path, plan, dtype="fp16", streams=("enc",)):
    store = ActivationStore.create_or_open(str(tmp_path / "store"), dtype_settings(dtype), plan)
    parts = {p["index"]: make_part(p["index"], p["n"], streams) for p in plan}
    for index, part in parts.items():
        assert write(store, index, part)
    return store, parts


def reference(parts: dict, dtype: str) -> dict:
    """example id -> (label, {stream: (input_ids, {state: expected decoded (t, d)})})."""
    out = {}
    for part in parts.values():
        for j, example_id in enumerate(part["example_ids"].tolist()):
            out[example_id] = (
                int(part["labels"][j]),
                {
                    s: (
                        np.asarray(stream["input_ids"][j]),
                        {k: round_trip(rows[j], dtype) for k, rows in stream["states"].items()},
                    )
                    for s, stream in part["streams"].items()
                },
            )
    return out


# ---- codecs --------------------------------------------------------------------------------


def test_fp16_round_trip_is_exact_cast():
    x = np.random.default_rng(0).normal(0, 10, (50, D)).astype(np.float32)
    np.testing.assert_array_equal(
        decode(encode(x, "fp16"), "fp16"), x.astype(np.float16).astype(np.float32)
    )


def test_bf16_matches_torch_bit_for_bit():
    rng = np.random.default_rng(1)
    x = (
        np.concatenate(
            [
                rng.normal(0, 1, 4000),
                rng.normal(0, 1e30, 100),
                rng.normal(0, 1e-40, 100),  # subnormals
                # exact ties between two bf16 values (low 16 bits 0x8000) with even and odd kept bit
                np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000], dtype=np.uint32).view(
                    np.float32
                ),
                [0.0, -0.0, np.inf, -np.inf, np.nan, np.finfo(np.float32).max],
            ]
        )
        .astype(np.float32)
        .reshape(-1, 2)
    )
    ours = decode(Encoded(bf16_bits(x)), "bf16")  # encode refuses non-finite states
    theirs = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    nan = np.isnan(x)
    np.testing.assert_array_equal(np.isnan(ours), nan)  # NaN bit patterns vary by backend
    np.testing.assert_array_equal(ours[~nan].view(np.uint32), theirs[~nan].view(np.uint32))


def test_int8_error_within_half_scale_and_zero_rows():
    x = np.random.default_rng(2).normal(0, 5, (200, D)).astype(np.float32)
    x[3] = 0.0
    enc = encode(x, "int8")
    assert enc.values.dtype == np.int8 and enc.scales.shape == (200,)
    scale = np.abs(x).max(axis=1) / 127.0  # independent
    err = np.abs(x - decode(enc, "int8"))
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30)
    np.testing.assert_array_equal(decode(enc, "int8")[3], 0.0)


def test_int8_keeps_an_outlier_channel_apart_and_the_rest_at_their_own_scale():
    """An attention-sink token: one channel at 8,240, the rest near 6. One scale for the row
    rounds every other channel to 0 or 1 step (~65 apart); with the largest channels kept apart
    the rest are scaled by their own maximum and the outlier is bf16-exact."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 6, (4, 576)).astype(np.float32)
    x[0, 17] = 8240.0
    rest = np.ones(576, bool)
    rest[17] = False
    flat = decode(encode(x, "int8"), "int8")
    assert np.linalg.norm(flat[0, rest] - x[0, rest]) / np.linalg.norm(x[0, rest]) > 0.3
    enc = encode(x, "int8", outliers=2)
    assert enc.outlier_index.shape == (4, 2) and enc.outlier_index.dtype == np.int16
    assert 17 in enc.outlier_index[0]
    got = decode(enc, "int8")
    assert got[0, 17] == torch.tensor(8240.0).bfloat16().item()
    for row in range(4):
        apart = np.zeros(576, bool)
        apart[enc.outlier_index[row]] = True
        scale = np.abs(x[row, ~apart]).max() / 127  # the rest's own scale
        assert np.abs(got[row, ~apart] - x[row, ~apart]).max() <= scale / 2 * (1 + 1e-5)
        np.testing.assert_array_equal(
            got[row, apart], torch.from_numpy(x[row, apart]).bfloat16().float().numpy()
        )
    assert np.linalg.norm(got[0, rest] - x[0, rest]) / np.linalg.norm(x[0, rest]) < 0.02


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_states_are_refused_by_every_dtype(dtype, bad):
    """Before: fp16 skipped its range check when a value was already inf or NaN, bf16 stored
    them, and an int8 row with an inf decoded as all NaN."""
    x = np.ones((5, D), np.float32)
    x[3, 2] = bad
    with pytest.raises(StateRangeError, match="token 3 holds (NaN|an infinity)"):
        encode(x, dtype)


def test_a_non_finite_state_names_its_layer_and_example_and_writes_nothing(tmp_path):
    store = ActivationStore.create_or_open(
        str(tmp_path / "s"), dtype_settings("int8/2"), make_plan((3, "train"))
    )
    part = make_part(0, 3)
    rows = part["streams"]["enc"]["states"]["layer_3"]
    rows[1][min(2, len(rows[1]) - 1), 5] = np.nan
    with pytest.raises(StateRangeError) as caught:
        write(store, 0, part)
    message = str(caught.value)
    assert "enc state layer_3 of example 1 of this part (data row 1) holds NaN" in message
    assert "non-finite" in message and "float32" in message  # the problem and the fix
    assert not store.is_committed(0)
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["parts"].get("part-00000") is None


def test_an_int8_store_written_before_outliers_were_kept_apart_still_reads(tmp_path):
    """Stores record int8_outliers; one without it has no outlier arrays and reads as before."""
    old, parts = build(tmp_path, make_plan((4, "train")), dtype="int8")
    assert old.int8_outliers == 0
    group = zarr.open_group(str(tmp_path / "store"), mode="r")[part_path(0)]
    assert group["enc"].get("outlier_index") is None
    assert old.info()["bytes_per_element"] == pytest.approx(1 + 4 / D)
    full = np.concatenate(parts[0]["streams"]["enc"]["states"]["emb"])
    np.testing.assert_array_equal(
        old.read_part(0)["streams"]["enc"]["states"]["emb"], round_trip(full, "int8")
    )


def test_bytes_per_element():
    assert bytes_per_element("fp16", 768) == 2 and bytes_per_element("bf16", 768) == 2
    assert bytes_per_element("int8", 768) == pytest.approx(1 + 4 / 768)
    assert bytes_per_element("int8", 768, 2) == pytest.approx(1 + 12 / 768)
    with pytest.raises(ValueError):
        bytes_per_element("fp8", 768)


def test_chunks_hold_at_least_one_mib():
    assert chunk_rows(10, 16) == 10  # small: one chunk
    rows = chunk_rows(10**7, 768 * 2)
    assert rows * 768 * 2 >= CHUNK_BYTES and (rows - 1) * 768 * 2 < CHUNK_BYTES


# ---- writing and reading parts --------------------------------------------------------------


def test_padding_never_stored(tmp_path):
    store, parts = build(tmp_path, make_plan((6, "train")), streams=("enc", "dec"))
    group = zarr.open_group(str(tmp_path / "store"), mode="r")[part_path(0)]
    for s, stream in parts[0]["streams"].items():
        total = sum(len(ids) for ids in stream["input_ids"])
        assert group[f"{s}/offsets"][-1] == total
        assert group[f"{s}/input_ids"].shape == (total,)
        for k in STATES:
            assert group[f"{s}/states/{k}"].shape == (total, D)
            assert group[f"{s}/states/{k}"].dtype == np.float16


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "int8", "int8/2"])
def test_write_then_read_part(tmp_path, dtype):
    store, parts = build(
        tmp_path, make_plan((5, "train"), (4, "test")), dtype=dtype, streams=("enc", "dec")
    )
    for index, part in parts.items():
        got = store.read_part(index)
        np.testing.assert_array_equal(got["example_ids"], part["example_ids"])
        np.testing.assert_array_equal(got["labels"], part["labels"])
        for s, stream in part["streams"].items():
            g = got["streams"][s]
            lengths = [len(ids) for ids in stream["input_ids"]]
            np.testing.assert_array_equal(g["offsets"], np.concatenate([[0], np.cumsum(lengths)]))
            np.testing.assert_array_equal(g["input_ids"], np.concatenate(stream["input_ids"]))
            for k, rows in stream["states"].items():
                full = np.concatenate(rows)
                assert g["states"][k].dtype == np.float32
                np.testing.assert_array_equal(g["states"][k], round_trip(full, dtype))
    assert list(store.read_part(0, state_names=["emb"])["streams"]["enc"]["states"]) == ["emb"]


def test_fp16_overflow_is_refused_and_nothing_is_written(tmp_path):
    """A state beyond fp16's range (65,504) would be stored as inf: the part fails before anything
    of it is written, naming the state and the fix; bf16 stores the same part."""
    assert encode(np.full((1, D), 65504.0, np.float32), "fp16").values.max() == 65504
    with pytest.raises(StateRangeError, match="--dtype bf16"):
        encode(np.full((1, D), 7e4, np.float32), "fp16")
    store = ActivationStore.create_or_open(str(tmp_path / "s"), settings(), make_plan((3, "train")))
    part = make_part(0, 3)
    part["streams"]["enc"]["states"]["layer_3"][0][0, 0] = -1e5
    with pytest.raises(StateRangeError, match="enc state layer_3: a value of 1e\\+05"):
        write(store, 0, part)
    assert not store.is_committed(0)
    assert zarr.open_group(str(tmp_path / "s"), mode="r")["parts"].get("part-00000") is None
    wide = ActivationStore.create_or_open(
        str(tmp_path / "b"), settings(dtype="bf16"), make_plan((3, "train"))
    )
    assert write(wide, 0, part)
    stored = wide.read_part(0)["streams"]["enc"]["states"]["layer_3"].min()
    assert stored == torch.tensor(-1e5).bfloat16().item()  # -99,840: bf16's rounding


def test_write_part_checks_lengths(tmp_path):
    store = ActivationStore.create_or_open(str(tmp_path / "s"), settings(), make_plan((3, "train")))
    part = make_part(0, 3)
    part["streams"]["enc"]["states"]["emb"][1] = np.zeros((99, D), np.float32)
    with pytest.raises(ValueError, match="example 1"):
        write(store, 0, part)
    with pytest.raises(ValueError, match="plan needs"):
        store.write_part(0, np.arange(2), np.zeros(2), make_part(0, 3)["streams"])


def test_committed_part_write_is_noop(tmp_path):
    store, parts = build(tmp_path, make_plan((4, "train")))
    assert write(store, 0, make_part(0, 4, seed=99)) is False
    np.testing.assert_array_equal(store.read_part(0)["labels"], parts[0]["labels"])


def test_uncommitted_part_is_invisible_and_rewritten(tmp_path):
    store, parts = build(tmp_path, make_plan((4, "train"), (3, "train")))
    # Simulate a writer that died after its arrays but before its commit.
    root = zarr.open_group(str(tmp_path / "store"), mode="a")
    del root[part_path(1)].attrs["committed"]
    assert store.committed_parts() == [0] and not store.is_committed(1)
    assert store.n_examples("train") == 4
    with pytest.raises(StoreError, match="not committed"):
        store.read_part(1)
    seen = [i for b in store.iter_batches("train", 2) for i in b["example_ids"].tolist()]
    assert sorted(seen) == parts[0]["example_ids"].tolist()

    retry = make_part(1, 3, seed=7)
    assert write(store, 1, retry) is True
    assert store.committed_parts() == [0, 1]
    np.testing.assert_array_equal(store.read_part(1)["labels"], retry["labels"])


# ---- opening --------------------------------------------------------------------------------


def test_resume_and_fingerprint(tmp_path):
    plan = make_plan((4, "train"), (3, "validation"))
    store, _ = build(tmp_path, plan)
    again = ActivationStore.create_or_open(str(tmp_path / "store"), settings(), plan)
    assert again.committed_parts() == [0, 1]
    expected = hashlib.sha256(json.dumps(settings(), sort_keys=True).encode()).hexdigest()
    assert again.fingerprint == store.fingerprint == expected
    opened = ActivationStore.open(str(tmp_path / "store"))
    assert opened.settings == settings() and opened.plan == plan
    with pytest.raises(StoreError, match="read-only"):
        write(opened, 0, make_part(0, 4))


def test_settings_mismatch_names_each_field(tmp_path):
    plan = make_plan((4, "train"))
    build(tmp_path, plan)
    with pytest.raises(StoreMismatchError) as err:
        ActivationStore.create_or_open(
            str(tmp_path / "store"), settings(max_length=256, dtype="int8"), plan
        )
    message = str(err.value)
    assert "max_length: stored 128, requested 256" in message
    assert 'dtype: stored "fp16", requested "int8"' in message
    assert "backbone" not in message.replace("--store", "")
    assert "another --store path" in message and "\n" not in message
    with pytest.raises(StoreMismatchError, match="plan"):
        ActivationStore.create_or_open(str(tmp_path / "store"), settings(), make_plan((5, "train")))


def test_non_store_directory_is_refused_and_kept(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("precious")
    with pytest.raises(StoreError, match="not a Ladder activation store"):
        ActivationStore.create_or_open(str(target), settings(), make_plan((1, "train")))
    with pytest.raises(StoreError, match="not a Ladder activation store"):
        ActivationStore.open(str(target))
    assert (target / "notes.txt").read_text("utf-8") == "precious"
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w", attributes={"other": 1})
    with pytest.raises(StoreError, match="not a Ladder activation store"):
        ActivationStore.open(str(plain))


def test_open_missing_store(tmp_path):
    with pytest.raises(StoreError, match="no activation store at .*ladder cache"):
        ActivationStore.open(str(tmp_path / "nothing"))


def test_unknown_format_version(tmp_path):
    build(tmp_path, make_plan((2, "train")))
    zarr.open_group(str(tmp_path / "store"), mode="a").attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format_version 99"):
        ActivationStore.open(str(tmp_path / "store"))


def test_fsspec_memory_url_round_trip():
    url = f"memory://ladder-test-{uuid.uuid4().hex}"
    plan = make_plan((3, "train"))
    store = ActivationStore.create_or_open(url, settings(), plan)
    part = make_part(0, 3)
    assert write(store, 0, part)
    got = ActivationStore.open(url).read_part(0)
    np.testing.assert_array_equal(
        got["streams"]["enc"]["input_ids"], np.concatenate(part["streams"]["enc"]["input_ids"])
    )
    assert ActivationStore.open(url).info()["stored_bytes"] > 0


# ---- info -----------------------------------------------------------------------------------


def test_info(tmp_path):
    plan = make_plan((5, "train"), (4, "train"), (3, "validation"), (2, "test"))
    store = ActivationStore.create_or_open(str(tmp_path / "store"), settings(dtype="int8"), plan)
    parts = {i: make_part(i, plan[i]["n"]) for i in (0, 1, 2)}  # part 3 never written
    for i, part in parts.items():
        write(store, i, part)
    info = store.info()
    n_tokens = sum(len(ids) for p in parts.values() for ids in p["streams"]["enc"]["input_ids"])
    assert info["n_examples"] == 12 and info["unique_example_ids"] == 12
    assert info["committed_parts"] == 3 and info["total_parts"] == 4
    assert info["layers"] == [0, 3] and info["dtype"] == "int8"
    assert info["bytes_per_element"] == pytest.approx(1 + 4 / D)
    assert info["state_names"] == list(STATES)
    assert info["n_tokens"] == n_tokens
    assert info["raw_fp32_bytes"] == n_tokens * D * len(STATES) * 4
    assert info["stored_bytes"] > 0
    assert info["compression_ratio"] == pytest.approx(info["raw_fp32_bytes"] / info["stored_bytes"])
    assert info["splits"] == {"train": 9, "validation": 3}
    assert store.n_examples("train") == 9 and store.n_examples("test") == 0


# ---- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,prefetch", [("fp16", 0), ("int8", 0), ("int8/2", 0), ("int8/2", 2)])
def test_iter_batches_covers_each_example_once_with_its_states(tmp_path, dtype, prefetch):
    """Inline and through the prefetch thread (what training on a GPU uses)."""
    plan = make_plan((7, "train"), (5, "validation"), (6, "train"), (4, "train"))
    store, parts = build(tmp_path, plan, dtype=dtype, streams=("enc", "dec"))
    expected = reference({i: p for i, p in parts.items() if plan[i]["split"] == "train"}, dtype)
    seen = []
    shuffle_bytes = 5 * 7 * D * 2
    for batch in store.iter_batches(
        "train", 4, seed=3, shuffle_bytes=shuffle_bytes, prefetch=prefetch
    ):
        b = len(batch["example_ids"])
        assert batch["labels"].dtype == torch.int64 and batch["example_ids"].dtype == torch.int64
        for s in ("enc", "dec"):
            ids, mask = batch[s]["input_ids"], batch[s]["attention_mask"]
            assert ids.dtype == mask.dtype == torch.int64
            lengths = [len(expected[e][1][s][0]) for e in batch["example_ids"].tolist()]
            assert ids.shape == (b, max(lengths))  # T = longest row
            for k in STATES:
                assert batch[s]["states"][k].dtype == torch.float32
                assert batch[s]["states"][k].shape == (b, max(lengths), D)
        for row, example_id in enumerate(batch["example_ids"].tolist()):
            label, streams = expected[example_id]
            assert batch["labels"][row].item() == label
            for s, (input_ids, states) in streams.items():
                n = len(input_ids)
                np.testing.assert_array_equal(batch[s]["input_ids"][row, :n].numpy(), input_ids)
                assert batch[s]["attention_mask"][row, :n].eq(1).all()
                assert batch[s]["attention_mask"][row, n:].eq(0).all()
                assert batch[s]["input_ids"][row, n:].eq(0).all()
                for k, x in states.items():
                    np.testing.assert_array_equal(batch[s]["states"][k][row, :n].numpy(), x)
                    assert batch[s]["states"][k][row, n:].eq(0).all()
        seen += batch["example_ids"].tolist()
    assert sorted(seen) == sorted(expected) and len(seen) == 17


def test_batch_sizes_and_drop_last(tmp_path):
    store, _ = build(tmp_path, make_plan((7, "train"), (6, "train")))
    assert [len(b["labels"]) for b in store.iter_batches("train", 5)] == [5, 5, 3]
    assert [len(b["labels"]) for b in store.iter_batches("train", 5, drop_last=True)] == [5, 5]
    batch = next(iter(store.iter_batches("train", 2, state_names=["layer_3"])))
    assert list(batch["enc"]["states"]) == ["layer_3"]


def test_shuffle_depends_on_seed_and_keeps_every_example(tmp_path):
    store, parts = build(tmp_path, make_plan(*[(10, "train")] * 4))

    def order(**kw):
        return [i for b in store.iter_batches("train", 8, **kw) for i in b["example_ids"].tolist()]

    in_plan_order = [i for p in parts.values() for i in p["example_ids"].tolist()]
    assert order(shuffle=False) == in_plan_order
    a, b = order(seed=0, shuffle_bytes=2000), order(seed=1, shuffle_bytes=2000)
    assert a != b and a != in_plan_order
    assert sorted(a) == sorted(b) == sorted(in_plan_order)
    assert order(seed=0, shuffle_bytes=2000) == a  # reproducible


def test_shuffled_windows_leave_one_short_batch(tmp_path):
    """A window's examples that do not fill a batch go on to the next window: however many
    windows an epoch has, only its last batch is short."""
    store, parts = build(tmp_path, make_plan(*[(10, "train")] * 12))
    example_bytes = 7 * len(STATES) * D * 2
    for budget in (15 * example_bytes, 35 * example_bytes):  # windows of 1-2 and 3-4 parts
        sizes, seen = [], []
        for batch in store.iter_batches("train", 8, seed=3, prefetch=0, shuffle_bytes=budget):
            sizes.append(len(batch["labels"]))
            seen += batch["example_ids"].tolist()
        assert sizes[:-1] == [8] * (len(sizes) - 1) and sizes[-1] == 120 - 8 * (len(sizes) - 1)
        assert sorted(seen) == sorted(i for p in parts.values() for i in p["example_ids"].tolist())


def _reader_memory(tmp_path, monkeypatch, n_parts: int, budget: int) -> tuple[int, int, int]:
    """One epoch over `n_parts` parts of 10 examples: the most parts alive at once (some array
    of theirs still referenced anywhere) as each is read, the largest window buffer's bytes of
    states, and the largest part's."""
    from cache_store import reader

    store, parts = build(tmp_path / str(n_parts), make_plan(*[(10, "train")] * n_parts))
    size = {  # fp16 states
        p: sum(x.size * 2 for rows in part["streams"]["enc"]["states"].values() for x in rows)
        for p, part in parts.items()
    }
    alive: dict[int, list] = {}
    most = buffer = 0
    real_read, real_rows = store.read_part, reader._Rows.__init__

    def read_part(i, **kw):
        nonlocal most
        part = real_read(i, **kw)
        alive[i] = [weakref.ref(e.values) for e in part["streams"]["enc"]["states"].values()]
        most = max(most, sum(any(r() is not None for r in refs) for refs in alive.values()))
        return part

    def rows(self, stream, capacity):
        nonlocal buffer
        real_rows(self, stream, capacity)
        buffer = max(buffer, sum(e.values.nbytes for e in self.states.values()))

    monkeypatch.setattr(store, "read_part", read_part)
    monkeypatch.setattr(reader._Rows, "__init__", rows)
    seen = [
        i
        for b in store.iter_batches("train", 4, seed=0, shuffle_bytes=budget)
        for i in b["example_ids"].tolist()
    ]
    assert sorted(alive) == list(range(n_parts)) and sorted(seen) == sorted(
        i for part in parts.values() for i in part["example_ids"].tolist()
    )
    return most, buffer, max(size.values())


def test_the_reader_holds_its_budget_and_one_part(tmp_path, monkeypatch):
    """A part is let go once its rows are copied into the window (only the part being read is
    alive), and the window's buffers hold the budget and about one part, however many parts
    the epoch has: the reader's memory does not grow with the store."""
    example_bytes = 7 * len(STATES) * D * 2  # fp16 states of a full-length example
    budget = 25 * example_bytes  # 2-4 parts of 10 ragged examples
    for n_parts in (20, 80):
        most, buffer, part = _reader_memory(tmp_path, monkeypatch, n_parts, budget)
        assert most == 1, (n_parts, most)
        # sized on the first part (budget + that part), grown by a quarter if a larger one comes
        assert 0 < buffer <= 1.25 * (budget + part) + len(STATES) * D * 2, (n_parts, buffer)


def test_split_without_committed_parts(tmp_path):
    store, _ = build(tmp_path, make_plan((3, "train")))
    with pytest.raises(StoreError, match="no committed parts for split 'validation'"):
        store.iter_batches("validation", 2)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("ladder-prefetch")]


def test_early_break_leaves_no_thread(tmp_path):
    store, _ = build(tmp_path, make_plan(*[(20, "train")] * 5))
    # Warm up zarr's own I/O threads (a persistent event loop and executor) before the baseline.
    for _ in store.iter_batches("train", 4):
        pass
    baseline = threading.active_count()
    for _ in range(3):
        for i, _batch in enumerate(store.iter_batches("train", 2, prefetch=1)):
            if i == 1:
                break
    assert _prefetch_threads() == []
    assert threading.active_count() <= baseline

    batches = store.iter_batches("train", 2, prefetch=2)
    next(batches)
    assert len(_prefetch_threads()) == 1
    batches.close()
    assert _prefetch_threads() == []


def test_reader_errors_reach_the_consumer(tmp_path, monkeypatch):
    store, _ = build(tmp_path, make_plan((4, "train"), (4, "train")))

    def broken(index, *, state_names=None, decode=True):
        raise OSError(f"disk gone reading part {index}")

    monkeypatch.setattr(store, "read_part", broken)
    for prefetch in (0, 2):
        with pytest.raises(OSError, match="disk gone"):
            list(store.iter_batches("train", 2, prefetch=prefetch))
    assert _prefetch_threads() == []


def test_a_read_only_store_opens_a_parts_arrays_once(tmp_path, monkeypatch):
    """Committed parts never change, so a read-only store keeps zarr's handles on the arrays of
    the parts it read last (at most OPEN_PARTS of them) and reads only their chunks again; a
    writable store, whose parts a repair may change, keeps none."""
    import cache_store.store as store_module
    from cache_store import layout

    _, parts = build(tmp_path, make_plan((4, "train"), (4, "train"), (4, "train")))
    monkeypatch.setattr(store_module, "OPEN_PARTS", 2)
    store = ActivationStore.open(str(tmp_path / "store"))
    opened = []
    real = layout.read_arrays

    def counting(group, names, held=None):
        opened.append(sum(name not in (held or {}) for name in names))
        return real(group, names, held)

    monkeypatch.setattr(layout, "read_arrays", counting)
    first = store.read_part(0, decode=False)
    again = store.read_part(0, decode=False)
    assert opened[0] > 0 and opened[1] == 0
    assert np.array_equal(first["labels"], again["labels"])
    for index in (1, 2, 0):  # part 0 was dropped for part 2: at most two are kept
        store.read_part(index)
    assert opened[2:] == [opened[0]] * 3 and list(store._opened) == [2, 0]
    writable = ActivationStore.open(str(tmp_path / "store"), writable=True)
    writable.read_part(0)
    writable.read_part(0)
    assert opened[-2:] == [opened[0]] * 2 and not writable._opened


def test_a_part_rewritten_by_a_repair_is_read_afresh(tmp_path):
    """A read-only store that kept a part's attributes and handles reads the part again, rather
    than calling it corrupt, when a repair has rewritten it since (new checksums, new chunks)."""
    from cache_store import layout

    build(tmp_path, make_plan((4, "train")))
    url = str(tmp_path / "store")
    reader = ActivationStore.open(url)
    before = reader.read_part(0, decode=False)
    writer = ActivationStore.open(url, writable=True)
    writer._root[layout.part_path(0)].update_attributes({"committed": False})
    assert write(writer, 0, make_part(0, 4, seed=1))
    after = reader.read_part(0, decode=False)
    assert not np.array_equal(after["labels"], before["labels"]) or not np.array_equal(
        after["streams"]["enc"]["offsets"], before["streams"]["enc"]["offsets"]
    )
    assert np.array_equal(after["labels"], make_part(0, 4, seed=1)["labels"])


def test_a_batch_over_the_token_limit_splits_into_trimmed_row_ranges(tmp_path):
    """A padded (still encoded) batch decodes whole as iter_batches gives it, or a micro-batch
    at a time: consecutive row ranges, each trimmed to its own longest row."""
    store, _ = build(tmp_path, make_plan((12, "train")), streams=("enc", "dec"), dtype="int8")
    batch = next(iter(store.iter_batches("train", 12, shuffle=False)))
    padded = next(iter(store.iter_batches("train", 12, shuffle=False, decode=False)))
    assert_batches_equal(padded.decode(), batch)
    tokens = sum(batch[s]["attention_mask"].shape[1] for s in ("enc", "dec"))
    for fits in (0, 12 * tokens):
        (whole,) = padded.pieces(fits)
        assert_batches_equal(whole, batch)
    assert padded.head()["labels"].tolist() == batch["labels"].tolist()
    assert "states" not in padded.head()["enc"]
    for limit in (
        3 * tokens,
        5 * tokens // 2,
    ):  # pieces hold at most the limit, as evenly as can be
        sizes = [len(p["labels"]) for p in padded.pieces(limit)]
        assert sum(sizes) == 12 and max(sizes) * tokens <= limit and max(sizes) - min(sizes) <= 1
    pieces = list(padded.pieces(3 * tokens))
    assert len(pieces) == 4
    assert torch.equal(torch.cat([p["example_ids"] for p in pieces]), batch["example_ids"])
    start = 0
    for piece in pieces:
        rows = len(piece["labels"])
        for s in ("enc", "dec"):
            mask = piece[s]["attention_mask"]
            t = int(mask.sum(1).max())
            assert mask.shape == (rows, t)  # trimmed to the piece's own longest row
            whole = batch[s]
            assert torch.equal(mask, whole["attention_mask"][start : start + rows, :t])
            assert torch.equal(piece[s]["input_ids"], whole["input_ids"][start : start + rows, :t])
            for k, v in piece[s]["states"].items():
                assert torch.equal(v, whole["states"][k][start : start + rows, :t])
        start += rows
    assert start == 12


def assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, dict):
            assert_batches_equal(value, b[key])
        else:
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64])  # one chunk an array; several
def test_direct_reads_give_what_zarr_gives(tmp_path, monkeypatch, chunk_bytes):
    """layout.DirectArray (the reader's path on a local store) against zarr's own reads, for
    every dtype the layout stores, arrays of several chunks, an array whose chunk zarr did not
    write (all fill value) and an empty one."""
    from cache_store import layout

    monkeypatch.setattr(layout, "CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    arrays = {
        "fp16": rng.standard_normal((37, 8)).astype(np.float16),
        "bf16": rng.integers(0, 2**16, (37, 8)).astype(np.uint16),
        "int8": rng.integers(-127, 128, (37, 8)).astype(np.int8),
        "scales": rng.random(37).astype(np.float32),
        "input_ids": rng.integers(0, 30_000, 37).astype(np.int32),
        "offsets": np.arange(38, dtype=np.int64),
        "labels": np.zeros(37, dtype=np.int64),  # all fill value: zarr writes no chunk
        "none": np.zeros((0, 8), dtype=np.float16),
    }
    group = zarr.open_group(str(tmp_path / "g"), mode="w")
    for name, data in arrays.items():
        layout.write_array(group, name, data)
    chunks = {n: [p for p in (tmp_path / "g" / n).rglob("*") if p.is_file()] for n in arrays}
    assert len(chunks["labels"]) == 1  # its zarr.json only
    assert (len(chunks["fp16"]) > 2) == (chunk_bytes == 64)
    read = zarr.open_group(str(tmp_path / "g"), mode="r")
    opened: dict = {}
    direct = layout.read_arrays(read, list(arrays), opened)
    through_zarr = layout.read_arrays(read, list(arrays), direct=False)
    for (name, data), a, b in zip(arrays.items(), direct, through_zarr):
        assert isinstance(opened[name], layout.DirectArray), name  # the direct path was taken
        assert a.dtype == b.dtype == data.dtype and a.shape == data.shape, name
        np.testing.assert_array_equal(a, data)
        np.testing.assert_array_equal(b, data)
