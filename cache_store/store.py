"""ActivationStore: create/open a Ladder activation store, write and read whole parts, summarise.

One writer writes one whole part and commits it last (see layout.py); readers only ever look at
committed parts, so an interrupted or retried writer never exposes half a part.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from cache_store import codecs, layout, projection
from cache_store.errors import CorruptPartError, StateRangeError, StoreError, StoreMismatchError
from cache_store.location import Location
from cache_store.reader import BatchPlan, PaddedBatch, iter_batches
from cache_store.settings import canonical, differences, fingerprint, state_dtype, validate_plan

log = logging.getLogger(__name__)

PROJECTION = "projection"  # group of the fitted width maps: projection/<stream>/<state name>
# Parts whose array handles a read-only store keeps (see ActivationStore.__init__).
OPEN_PARTS = 64

# Stored states the reader holds to shuffle across parts: its memory is this plus one part, for
# any number of examples (cache_store/reader.py). `ladder train --shuffle-mb` defaults to it.
SHUFFLE_BYTES = 16 * 2**20


class ActivationStore:
    def __init__(self, location: Location, root: zarr.Group):
        attrs = root.attrs.asdict()
        self.location = location
        self.settings: dict = attrs["settings"]
        self.fingerprint: str = attrs["fingerprint"]
        self.plan: list[dict] = attrs["plan"]
        self.dtype: str = state_dtype(self.settings)
        # Channels per token an int8 store keeps apart (codecs.INT8_OUTLIERS); none in stores
        # written before it was recorded.
        self.int8_outliers: int = int(self.settings.get("int8_outliers", 0))
        self._fields = codecs.stored_fields(self.dtype, self.int8_outliers)
        spec = self.settings.get("projection")
        self.projection: projection.ProjectionSpec | None = (
            projection.ProjectionSpec(**spec) if spec else None
        )
        self._matrices: dict[str, np.ndarray] | None = None
        self._root = root
        # A committed part never changes (writers skip it; only a repair, through a writable
        # handle, un-commits it), so a read-only handle keeps the attributes it has read of
        # committed parts (~2 KB each), and what reading the arrays of the OPEN_PARTS parts read
        # last takes (layout.DirectArray on a local store, ~9 KB a part; zarr's handles
        # elsewhere, ~28 KB a part): later epochs then only read the arrays' chunks.
        self._committed: dict[int, dict] = {}
        self._opened: OrderedDict[int, dict] = OrderedDict()

    # ---- opening -------------------------------------------------------------------------

    @classmethod
    def create_or_open(cls, url: str, settings: dict, plan: list[dict]) -> ActivationStore:
        """A new store at url, or the existing one built with the same settings and plan (resume)."""
        settings, plan = canonical(settings), canonical(plan)
        state_dtype(settings)
        validate_plan(plan)
        location = Location.parse(url)
        if not location.exists() or location.is_empty_dir():
            try:
                return cls._create(location, settings, plan)
            except FileExistsError:
                pass  # another worker created it a moment ago: check it like any other
        store = cls._open_existing(location, mode="r+")
        problems = differences(store.settings, settings)
        if store.plan != plan:
            problems.append("plan: the stored part plan differs from the requested one")
        if problems:
            raise StoreMismatchError(
                f"store {url} was built with different settings ({'; '.join(problems)}); "
                f"use another --store path or delete {url}"
            )
        log.info(
            "resuming activation store %s (%d/%d parts committed)",
            url,
            len(store.committed_parts()),
            len(plan),
        )
        return store

    @classmethod
    def _create(cls, location: Location, settings: dict, plan: list[dict]) -> ActivationStore:
        root = zarr.open_group(
            location.zarr_url,
            mode="w-",
            zarr_format=3,
            attributes={
                "format_version": layout.FORMAT_VERSION,
                "fingerprint": fingerprint(settings),
                "settings": settings,
                "plan": plan,
            },
        )
        # Created up front so concurrent part writers never race on creating it.
        root.require_group(layout.PARTS)
        log.info("created activation store %s (%d parts planned)", location.url, len(plan))
        return cls(location, root)

    @classmethod
    def open(cls, url: str, writable: bool = False) -> ActivationStore:
        """An existing store, read-only unless `writable` (for repairs)."""
        location = Location.parse(url)
        if not location.exists() or location.is_empty_dir():
            raise StoreError(
                f"no activation store at {url}; run `ladder cache ... --store {url}` first"
            )
        return cls._open_existing(location, mode="a" if writable else "r")

    @classmethod
    def _open_existing(cls, location: Location, mode: str) -> ActivationStore:
        url = location.url
        foreign = StoreError(
            f"{url} exists but is not a Ladder activation store; pass another --store path "
            f"(nothing at {url} was changed)"
        )
        # Inspect read-only first: opening a foreign directory for writing would add a zarr.json.
        try:
            root = zarr.open_group(location.zarr_url, mode="r", zarr_format=3)
        except (FileNotFoundError, KeyError, ValueError, TypeError) as e:
            raise foreign from e
        attrs = root.attrs.asdict()
        if not {"format_version", "fingerprint", "settings", "plan"} <= attrs.keys():
            raise foreign
        if attrs["format_version"] != layout.FORMAT_VERSION:
            raise StoreError(
                f"store {url} has format_version {attrs['format_version']!r} but this Ladder reads "
                f"version {layout.FORMAT_VERSION}; rebuild it with `ladder cache` at another --store path"
            )
        if mode != "r":
            root = zarr.open_group(location.zarr_url, mode=mode, zarr_format=3)
        return cls(location, root)

    # ---- stored width ----------------------------------------------------------------------

    def projection_matrices(self) -> dict[str, np.ndarray]:
        """The fitted (d, K) maps, keyed "stream/state name"; empty until set_projection."""
        if self._matrices is None:
            group = self._root.get(PROJECTION)
            found = (
                {}
                if group is None
                else {
                    f"{s}/{name}": layout.read_array(group[s], name)
                    for s in group.group_keys()
                    for name in group[s].array_keys()
                }
            )
            if not found:
                return {}
            self._matrices = found
        return self._matrices

    def set_projection(self, matrices: dict[str, np.ndarray]) -> None:
        """Store the fitted maps (once, before any part is written; a resumed run keeps them)."""
        if self.projection_matrices():
            return
        group = self._root.require_group(PROJECTION)
        for key, matrix in matrices.items():
            stream, name = key.split("/")
            layout.write_array(
                group.require_group(stream), name, np.asarray(matrix, dtype=np.float32)
            )
        self._matrices = None

    # ---- parts -----------------------------------------------------------------------------

    def _part_attrs(self, index: int) -> dict | None:
        if index in self._committed:
            return self._committed[index]
        group = self._root.get(layout.part_path(index))
        attrs = None if group is None else group.attrs.asdict()
        if self._root.read_only and attrs is not None and attrs.get("committed") is True:
            self._committed[index] = attrs
        return attrs

    def is_committed(self, index: int) -> bool:
        attrs = self._part_attrs(index)
        return attrs is not None and attrs.get("committed") is True

    def committed_parts(self) -> list[int]:
        if len(self._committed) == len(self.plan):  # read-only, and every part seen committed
            return [p["index"] for p in self.plan]
        parts = self._root.get(layout.PARTS)
        if parts is None:
            return []
        names = {name for name, _ in parts.groups()}
        return [
            p["index"]
            for p in self.plan
            if layout.part_name(p["index"]) in names and self.is_committed(p["index"])
        ]

    def _committed_of_split(self, split: str) -> list[int]:
        return [i for i in self.committed_parts() if self.plan[i]["split"] == split]

    def n_examples(self, split: str) -> int:
        """Committed examples of a split (e.g. for steps per epoch)."""
        return sum(self.plan[i]["n"] for i in self._committed_of_split(split))

    def write_part(
        self, index: int, example_ids: np.ndarray, labels: np.ndarray, streams: dict[str, dict]
    ) -> bool:
        """Encode and write one whole part, then commit it. False if it was already committed.

        streams[s] = {"input_ids": [1-D int array per example],
                      "states": {name: [float32 (tokens_i, d) per example]}}
        """
        if self._root.read_only:
            raise StoreError(
                f"store {self.location.url} was opened read-only; "
                "use ActivationStore.create_or_open to write parts"
            )
        n = self._plan_n(index)
        example_ids = _vector(example_ids, n, "example_ids")
        labels = _vector(labels, n, "labels")
        if not streams:
            raise ValueError("write_part needs at least one stream (e.g. 'enc')")
        for name, stream in streams.items():
            _check_stream(name, stream, n)
        if self.is_committed(index):
            log.info("part %d of %s already committed; skipping", index, self.location.url)
            return False

        parts = self._root[layout.PARTS]
        name = layout.part_name(index)
        # Whatever is there is an interrupted (uncommitted) write, e.g. a retried task: start over.
        if parts.get(name) is not None:
            log.warning("overwriting uncommitted part %d of %s", index, self.location.url)
        # Encoded before anything is written: a state the dtype cannot hold fails the part here.
        matrices = self.projection_matrices() if self.projection else None
        if self.projection and not matrices:
            raise StoreError(
                f"store {self.location.url} stores width {self.projection.width} but "
                f"its projection was not fitted; run `ladder cache` to fill it"
            )
        encoded = {
            s: _encode_stream(
                s, stream, self.dtype, self.projection, matrices, example_ids, self.int8_outliers
            )
            for s, stream in streams.items()
        }
        del parts[name]
        group = parts.create_group(name)
        sums = {
            "example_ids": layout.write_array(group, "example_ids", example_ids),
            "labels": layout.write_array(group, "labels", labels),
        }
        meta = {
            s: self._write_stream(group.create_group(s), stream, s, sums)
            for s, stream in encoded.items()
        }
        group.update_attributes(
            {
                "n": n,
                "n_tokens": sum(m["n_tokens"] for m in meta.values()),
                "streams": meta,
                "checksums": sums,
                "committed": True,
            }
        )
        log.info("committed part %d of %s (%d examples)", index, self.location.url, n)
        return True

    def _plan_n(self, index: int) -> int:
        if not 0 <= index < len(self.plan):
            raise ValueError(f"part index {index} is outside the plan (0..{len(self.plan) - 1})")
        return self.plan[index]["n"]

    def _write_stream(self, group: zarr.Group, stream: dict, prefix: str, sums: dict) -> dict:
        offsets = stream["offsets"]
        sums[f"{prefix}/offsets"] = layout.write_array(group, "offsets", offsets)
        sums[f"{prefix}/input_ids"] = layout.write_array(group, "input_ids", stream["input_ids"])
        dims = {}
        for name, enc in stream["states"].items():
            for field, array in enc.arrays().items():
                path = f"{codecs.ARRAY_DIRS[field]}/{name}"
                sums[f"{prefix}/{path}"] = layout.write_array(group, path, array)
            dims[name] = int(enc.values.shape[1])
        return {"n_tokens": int(offsets[-1]), "states": dims}

    def read_part(
        self, index: int, *, state_names: list[str] | None = None, decode: bool = True
    ) -> dict[str, Any]:
        """A committed part: {"example_ids", "labels", "streams": {s: {"offsets", "input_ids",
        "states": {name: float32 (T, d)}}}}; state_names limits which states are read. With
        decode=False the states stay `codecs.Encoded` (the reader decodes batch by batch, so its
        buffers hold 1-2 bytes per element instead of 4)."""
        try:
            return self._read_part(index, state_names, decode)
        except CorruptPartError:
            if index not in self._committed:
                raise
            # What this handle kept of the part may be stale (a repair has rewritten it since):
            # read it afresh once before calling it corrupt.
            self._committed.pop(index, None)
            self._opened.pop(index, None)
            return self._read_part(index, state_names, decode)

    def _read_part(self, index: int, state_names: list[str] | None, decode: bool) -> dict:
        attrs = self._part_attrs(index)
        if attrs is None or attrs.get("committed") is not True:
            raise StoreError(
                f"part {index} of store {self.location.url} is not committed; "
                "run/finish `ladder cache` first"
            )
        sums = attrs.get("checksums", {})
        wanted: dict[str, list[str]] = {}
        for s, meta in attrs["streams"].items():
            names = list(meta["states"]) if state_names is None else state_names
            unknown = [k for k in names if k not in meta["states"]]
            if unknown:
                raise StoreError(
                    f"stream {s!r} of store {self.location.url} has no states {unknown}; "
                    f"available: {list(meta['states'])}"
                )
            wanted[s] = names
        paths = ["example_ids", "labels"]
        for s, names in wanted.items():
            paths += [f"{s}/offsets", f"{s}/input_ids"]
            paths += [f"{s}/{codecs.ARRAY_DIRS[f]}/{k}" for k in names for f in self._fields]
        opened = self._opened_arrays(index)
        held = opened is not None and all(p in opened for p in paths)
        group = None if held else self._root[layout.part_path(index)]
        data = {}
        for path, value in zip(paths, layout.read_arrays(group, paths, opened)):
            # Each array is checked against the checksum recorded at commit.
            if isinstance(value, BaseException):  # any decode failure means a damaged chunk
                raise self._corrupt(index, path, f"unreadable ({type(value).__name__})") from value
            if path in sums and layout.checksum(value) != sums[path]:
                # read directly (layout.DirectArray): once more through zarr itself before
                # calling the part corrupt
                part = self._root[layout.part_path(index)]
                (value,) = layout.read_arrays(part, [path], direct=False)
                if isinstance(value, BaseException) or layout.checksum(value) != sums[path]:
                    raise self._corrupt(index, path, "checksum mismatch")
            data[path] = value

        streams = {}
        for s, names in wanted.items():
            states = {}
            for k in names:
                encoded = codecs.Encoded(
                    **{f: data[f"{s}/{codecs.ARRAY_DIRS[f]}/{k}"] for f in self._fields}
                )
                states[k] = codecs.decode(encoded, self.dtype) if decode else encoded
            streams[s] = {
                "offsets": data[f"{s}/offsets"],
                "input_ids": data[f"{s}/input_ids"],
                "states": states,
            }
        return {"example_ids": data["example_ids"], "labels": data["labels"], "streams": streams}

    def _opened_arrays(self, index: int) -> dict | None:
        """The array handles kept for committed part `index` (filled by reading it:
        layout.read_arrays); None on a writable handle, whose parts may change."""
        if not self._root.read_only:
            return None
        opened = self._opened.pop(index, {})
        self._opened[index] = opened  # the most recently read last
        while len(self._opened) > OPEN_PARTS:
            self._opened.popitem(last=False)
        return opened

    def _corrupt(self, index: int, path: str, why: str) -> CorruptPartError:
        return CorruptPartError(
            f"part {index} of store {self.location.url} is corrupt ({path}: {why}); run "
            f"`ladder cache-info --store {self.location.url} --verify --repair`, then re-run "
            f"`ladder cache` to recompute it",
            index,
        )

    def verify(self, repair: bool = False) -> list[dict]:
        """Re-read every committed part and check its checksums; with repair, un-commit the
        corrupt ones so the next `ladder cache` run recomputes them. Returns the problems."""
        problems = []
        for index in self.committed_parts():
            try:
                self.read_part(index, decode=False)
            except StoreError as exc:
                problems.append({"part": index, "error": str(exc)})
                if repair:
                    group = self._root[layout.part_path(index)]
                    group.update_attributes({"committed": False})
        return problems

    # ---- summary and batches ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        committed = self.committed_parts()
        metas = [self._part_attrs(i) for i in committed]
        ids = [layout.read_array(self._root[layout.part_path(i)], "example_ids") for i in committed]
        state_names: list[str] = []
        dims: list[int] = []
        raw = 0
        for meta in metas:
            for stream in meta["streams"].values():
                for name, d in stream["states"].items():
                    if name not in state_names:
                        state_names.append(name)
                        dims.append(d)
                    raw += stream["n_tokens"] * d * 4
        stored = sum(self.location.chunk_bytes(layout.part_path(i)) for i in committed)
        splits: dict[str, int] = {}
        for i in committed:
            splits[self.plan[i]["split"]] = splits.get(self.plan[i]["split"], 0) + self.plan[i]["n"]
        return {
            "n_examples": sum(self.plan[i]["n"] for i in committed),
            "unique_example_ids": len(set(np.concatenate(ids).tolist())) if ids else 0,
            "committed_parts": len(committed),
            "total_parts": len(self.plan),
            "layers": self.settings.get("layers"),
            "dtype": self.dtype,
            # The dtype's nominal size of one stored number, before compression: 2 for fp16 and
            # bf16, 1 + (4 + 4 x outliers)/K for int8 (a float32 scale per token, an int16
            # channel and a bf16 value per outlier). None until a part is written.
            "bytes_per_element": (
                codecs.bytes_per_element(self.dtype, dims[0], self.int8_outliers) if dims else None
            ),
            "int8_outliers": self.int8_outliers if self.dtype == "int8" else None,
            "stored_width": dims[0] if dims else None,
            "projection": self.settings.get("projection"),
            "state_names": state_names,
            "n_tokens": sum(m["n_tokens"] for m in metas),
            "stored_bytes": stored,
            # What one example costs on disk, everything included (states, ids, compression).
            "bytes_per_example": round(stored / n)
            if (n := sum(self.plan[i]["n"] for i in committed))
            else None,
            "raw_fp32_bytes": raw,
            # float32 states of the stored width over the bytes on disk (codec and compression).
            "compression_ratio": raw / stored if stored else None,
            # float32 states of the backbone's full width over the bytes on disk (width, codec and
            # compression together): what the store saves against keeping the states as they are.
            "full_width_ratio": (
                raw * self.settings["hidden_size"] / dims[0] / stored
                if stored and dims and "hidden_size" in self.settings
                else None
            ),
            "splits": splits,
        }

    def iter_batches(
        self,
        split: str,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_bytes: int = SHUFFLE_BYTES,
        prefetch: int = 0,
        drop_last: bool = False,
        state_names: list[str] | None = None,
        decode: bool = True,
    ) -> Iterator[dict] | Iterator[PaddedBatch]:
        """Padded torch batches of the committed parts of a split; see reader.py. `prefetch`:
        batches prepared ahead in a thread, for a GPU; on a CPU the thread takes the training
        step's cores (one MiniLM epoch of the quick bench's store on 2 cores: 1.04 s with 2
        ahead, 0.65 s inline, 0.60 s from batches in memory). decode=False: `PaddedBatch`es,
        padded but still in the stored dtype, to decode whole or a micro-batch at a time."""
        parts = self._committed_of_split(split)
        if not parts:
            raise StoreError(
                f"store {self.location.url} has no committed parts for split {split!r}; "
                "run/finish `ladder cache` first"
            )
        return iter_batches(
            self,
            BatchPlan(
                parts=parts,
                batch_size=batch_size,
                shuffle=shuffle,
                seed=seed,
                shuffle_bytes=shuffle_bytes,
                prefetch=prefetch,
                drop_last=drop_last,
                state_names=state_names,
                decode=decode,
            ),
        )


def _encode_stream(
    prefix: str,
    stream: dict,
    dtype: str,
    spec: projection.ProjectionSpec | None = None,
    matrices: dict[str, np.ndarray] | None = None,
    example_ids: np.ndarray | None = None,
    outliers: int = 0,
) -> dict:
    """One stream's arrays as stored: offsets (n+1,), input_ids int32 (T,), states Encoded (T, d),
    or (T, K) through the store's projection. A state with a NaN or an infinity is a
    StateRangeError naming the stream, the state and the example (its data-row id)."""
    lengths = np.array([len(ids) for ids in stream["input_ids"]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # (n+1,)
    ids = np.concatenate([np.asarray(i, dtype=np.int64).reshape(-1) for i in stream["input_ids"]])
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError("input_ids do not fit in int32")
    states = {}
    for name, rows in stream["states"].items():
        values = np.concatenate(rows, axis=0)  # (T, d)
        if (bad := codecs.first_non_finite(values)) is not None:
            token, kind = bad
            i = int(np.searchsorted(offsets, token, side="right")) - 1
            row = f" (data row {int(example_ids[i])})" if example_ids is not None else ""
            raise StateRangeError(
                f"{prefix} state {name} of example {i} of this part{row} holds {kind} at token "
                f"{token - int(offsets[i])}: the backbone produced non-finite states",
                codecs.NON_FINITE_FIX,
            )
        # The width map covers the ladder states; a state it has no map for (a generative
        # store's h_L, which the frozen LM head reads) stays full width.
        if spec is not None and f"{prefix}/{name}" in matrices:
            values = projection.apply(spec, matrices[f"{prefix}/{name}"], values)  # (T, K)
        try:
            states[name] = codecs.encode(values, dtype, outliers)
        except StateRangeError as exc:
            raise StateRangeError(
                f"{prefix} state {name}: {exc.problem}", exc.fix, setting=exc.setting
            ) from None
    return {"offsets": offsets, "input_ids": ids.astype(np.int32), "states": states}


def _vector(values: np.ndarray, n: int, what: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.int64)
    if out.shape != (n,):
        raise ValueError(f"{what} has shape {out.shape}; this part's plan needs ({n},)")
    return out


def _check_stream(name: str, stream: dict, n: int) -> None:
    ids = stream["input_ids"]
    if len(ids) != n:
        raise ValueError(
            f"stream {name!r} has {len(ids)} input_ids rows; this part's plan needs {n}"
        )
    lengths = [len(i) for i in ids]
    for state, rows in stream["states"].items():
        if len(rows) != n:
            raise ValueError(f"stream {name!r} state {state!r} has {len(rows)} rows; expected {n}")
        widths = {np.shape(r)[1] if np.ndim(r) == 2 else None for r in rows}
        if len(widths) != 1 or None in widths:
            raise ValueError(
                f"stream {name!r} state {state!r} must be (tokens, d) arrays of one width d"
            )
        for i, (row, length) in enumerate(zip(rows, lengths)):
            if np.shape(row)[0] != length:
                raise ValueError(
                    f"stream {name!r} state {state!r} example {i} has {np.shape(row)[0]} "
                    f"tokens but input_ids has {length}"
                )
