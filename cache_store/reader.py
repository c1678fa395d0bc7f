"""Padded training batches from the committed parts of one split.

Pipeline (on a GPU in a background thread, prefetch.py, so reading and decoding overlap training):
parts (order shuffled with the seed) -> whole part read once, still encoded, its token rows copied
into a window's buffers (reused from window to window) -> a window of whole parts up to the
shuffle budget, shuffled -> length-sorted batches of B examples -> padded in the stored dtype by
one gather per array -> float32 torch tensors, decoded a batch at a time (or, for training, a
micro-batch at a time: PaddedBatch.pieces).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cache_store.codecs import Encoded, decode_tensor
from cache_store.prefetch import prefetched

BUCKET_BATCHES = 16  # batches per length-sorting window


class PartSource(Protocol):
    dtype: str

    def read_part(
        self, index: int, *, state_names: list[str] | None = None, decode: bool = True
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BatchPlan:
    parts: list[int]  # committed part indices of the split, in plan order
    batch_size: int
    shuffle: bool
    seed: int  # pass e.g. base_seed + epoch for a new order every epoch
    shuffle_bytes: int  # bytes of stored states held to shuffle across parts (a window of parts)
    prefetch: int  # batches prepared ahead by a thread; 0: read inline
    drop_last: bool
    state_names: list[str] | None  # None: every stored state
    decode: bool = True  # False: yield PaddedBatch (padded, still encoded) instead of tensors


def iter_batches(source: PartSource, plan: BatchPlan) -> Iterator[dict] | Iterator[PaddedBatch]:
    if plan.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {plan.batch_size}")
    if plan.prefetch <= 0:
        return _batches(source, plan)
    return prefetched(lambda: _batches(source, plan), plan.prefetch, name="ladder-prefetch")


def _batches(source: PartSource, plan: BatchPlan) -> Iterator[dict] | Iterator[PaddedBatch]:
    rng = random.Random(plan.seed)
    parts = list(plan.parts)
    if plan.shuffle:
        rng.shuffle(parts)
    # Unshuffled (evaluation), a window is one part: batches come out in plan order.
    budget = plan.shuffle_bytes if plan.shuffle else 0
    reads = (source.read_part(i, state_names=plan.state_names, decode=False) for i in parts)
    window = _Window(budget, source.dtype)
    for batch in _windows(reads, window, plan.batch_size, rng if plan.shuffle else None):
        if batch.rows == plan.batch_size or not plan.drop_last:
            yield batch.decode() if plan.decode else batch


def _windows(
    parts: Iterator[dict], window: _Window, batch_size: int, rng: random.Random | None
) -> Iterator[PaddedBatch]:
    """Batches from windows of whole parts holding up to `window.budget` bytes of states (at
    least one part). Each part's token rows are copied into the window's buffers as it is read,
    and the part is let go: the reader holds the window, the part being read and the batch
    being made, whatever the store's size, and its buffers are allocated once an epoch (a
    window's memory is reused by the next, so the allocator is not handed a part's worth of
    arrays to place every few batches). With `rng`, a window's examples are shuffled together,
    cut into runs of BUCKET_BATCHES * B, each run sorted by length before it is cut into
    batches (so a batch holds examples of similar length and little compute goes to padding),
    and the window's batches come out in random order; without it, in order. The examples that
    do not fill a last batch of B go on to the next window, so an epoch has one short batch
    (its last)."""
    for part in itertools.chain(parts, [None]):
        size = 0 if part is None else _states_bytes(part)
        if len(window) and (part is None or window.nbytes + size > window.budget):
            carry = 0 if part is None else len(window) % batch_size
            batches, kept = _window_batches(window, batch_size, carry, rng)
            for rows in batches:
                yield window.batch(rows)
            window.keep(kept)
        if part is not None:
            window.add(part)
            del part  # the window holds copies of its rows


def _window_batches(
    window: _Window, batch_size: int, carry: int, rng: random.Random | None
) -> tuple[list[np.ndarray], np.ndarray]:
    """The window's batches (its example indices), in random order with `rng`, and `carry` of
    its examples (drawn at random with `rng`, the last ones without) kept for the next window."""
    order = list(range(len(window)))
    if rng is not None:
        rng.shuffle(order)
    kept, order = order[len(order) - carry :], order[: len(order) - carry]
    if rng is None:
        runs = [order]
    else:
        length = window.lengths()
        run = batch_size * BUCKET_BATCHES
        runs = [
            sorted(order[k : k + run], key=length.__getitem__) for k in range(0, len(order), run)
        ]
    batches = [
        np.array(r[j : j + batch_size], dtype=np.int64)
        for r in runs
        for j in range(0, len(r), batch_size)
    ]
    if rng is not None:
        rng.shuffle(batches)
    return batches, np.array(kept, dtype=np.int64)


def _states_bytes(part: dict) -> int:
    """Bytes of a part's stored states (what the shuffle budget counts)."""
    return sum(_nbytes(stream["states"]) for stream in part["streams"].values())


def _nbytes(states: dict[str, Encoded]) -> int:
    return sum(a.nbytes for e in states.values() for a in e.arrays().values())


class _Rows:
    """One stream's token rows in a window: ids and stored states, in buffers of `capacity`
    rows and one more, kept zero, that padding positions gather."""

    def __init__(self, stream: dict, capacity: int):
        self.capacity, self.used = capacity, 0
        ids = stream["input_ids"]
        self.ids = np.zeros(capacity + 1, dtype=ids.dtype)
        self.states = {
            k: e.map(lambda a: np.zeros((capacity + 1, *a.shape[1:]), dtype=a.dtype))
            for k, e in stream["states"].items()
        }

    def grown(self, stream: dict, need: int) -> _Rows:
        """Rows of at least `need` (a quarter more than asked), holding these rows."""
        bigger = _Rows(stream, max(need, self.capacity + self.capacity // 4))
        bigger.write(self.ids[: self.used], self._encoded(slice(0, self.used)))
        return bigger

    def write(self, ids: np.ndarray, states: dict[str, Encoded]) -> int:
        """Append rows; returns the first one's position."""
        at, n = self.used, len(ids)
        self.ids[at : at + n] = ids
        for k, e in states.items():
            mine = self.states[k].arrays()
            for field, array in e.arrays().items():
                mine[field][at : at + n] = array
        self.used += n
        return at

    def _encoded(self, index) -> dict[str, Encoded]:
        return {k: e.map(lambda a: a[index]) for k, e in self.states.items()}

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, dict[str, Encoded]]:
        """Copies of the rows at `positions` (any shape; `capacity` gives a zero row)."""
        return self.ids[positions], self._encoded(positions)


class _Window:
    """The examples of a shuffle window: labels, ids and, per stream, where each example's
    token rows start in the stream's buffers and how many it has."""

    def __init__(self, budget: int, dtype: str):
        self.budget, self.dtype = budget, dtype
        self.example_ids = np.zeros(0, dtype=np.int64)
        self.labels = np.zeros(0, dtype=np.int64)
        self.rows: dict[str, _Rows] = {}
        self.start: dict[str, np.ndarray] = {}
        self.length: dict[str, np.ndarray] = {}
        self.nbytes = 0  # bytes of the stored state values held

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        """Each example's tokens in its first stream (what batches are sorted by)."""
        return next(iter(self.length.values())).tolist()

    def add(self, part: dict) -> None:
        for s, stream in part["streams"].items():
            offsets = stream["offsets"].astype(np.int64)
            tokens = int(offsets[-1])
            rows = self.rows.get(s)
            if rows is None:
                # Room for the budget's worth of rows of this stream and one part more, sized
                # on the first part: parts of one store are alike, and a larger one grows it.
                part_bytes = max(_states_bytes(part), 1)
                room = int(tokens * (1 + self.budget / part_bytes)) + 1
                rows = self.rows[s] = _Rows(stream, room)
            elif rows.used + tokens > rows.capacity:
                rows = self.rows[s] = rows.grown(stream, rows.used + tokens)
            at = rows.write(stream["input_ids"][:tokens], stream["states"])
            self.start[s] = np.concatenate([self.start.get(s, offsets[:0]), at + offsets[:-1]])
            self.length[s] = np.concatenate([self.length.get(s, offsets[:0]), np.diff(offsets)])
        self.example_ids = np.concatenate([self.example_ids, part["example_ids"]])
        self.labels = np.concatenate([self.labels, part["labels"]])
        self.nbytes += _states_bytes(part)

    def keep(self, kept: np.ndarray) -> None:
        """Only the examples `kept` stay, their rows moved to the front of the buffers."""
        nbytes = 0
        for s, rows in self.rows.items():
            start, length = self.start[s][kept], self.length[s][kept]
            positions = _spans(start, length)
            ids, states = rows.gather(positions)  # copies, so the rows can be written over
            rows.used = 0
            rows.write(ids, states)
            nbytes += _nbytes(states)
            self.start[s] = np.cumsum(length) - length
            self.length[s] = length
        self.example_ids, self.labels = self.example_ids[kept], self.labels[kept]
        self.nbytes = nbytes

    def batch(self, index: np.ndarray) -> PaddedBatch:
        """The examples at `index`, zero-padded on the right to each stream's longest row, in
        the stored dtype: one gather per array (padding positions read the zero row)."""
        streams = {}
        for s, rows in self.rows.items():
            lengths = self.length[s][index]
            steps = np.arange(int(lengths.max(initial=0)))
            mask = steps[None, :] < lengths[:, None]  # (B, T) bool
            positions = np.where(mask, self.start[s][index][:, None] + steps, rows.capacity)
            ids, states = rows.gather(positions)
            streams[s] = PaddedStream(ids.astype(np.int64), mask, states)
        return PaddedBatch(
            labels=self.labels[index],
            example_ids=self.example_ids[index],
            streams=streams,
            dtype=self.dtype,
        )


def _spans(start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """The positions start[i] .. start[i] + length[i] - 1 of every i, concatenated."""
    if not len(length):
        return np.zeros(0, dtype=np.int64)
    first = np.repeat(start - (np.cumsum(length) - length), length)
    return first + np.arange(int(length.sum()))


@dataclass(frozen=True)
class PaddedStream:
    input_ids: np.ndarray  # int64 (B, T)
    mask: np.ndarray  # bool (B, T)
    states: dict[str, Encoded]  # values (B, T, d) in the stored dtype, int8 scales (B, T) ...


@dataclass(frozen=True)
class PaddedBatch:
    """A batch zero-padded in its stored dtype (1-2 bytes per element) and not yet decoded: it
    holds copies, not views, so it keeps no part of the store alive. `decode()` gives the whole
    batch as float32 tensors; `pieces(max_tokens)` the same rows a micro-batch at a time, each
    decoded only when it is reached, so a batch's float32 states never all exist at once and
    training memory does not depend on the longest text in the data."""

    labels: np.ndarray  # int64 (B,)
    example_ids: np.ndarray  # int64 (B,)
    streams: dict[str, PaddedStream]
    dtype: str

    @property
    def rows(self) -> int:
        return len(self.labels)

    def head(self) -> dict:
        """The whole batch without its states (labels, ids, masks): what counting a loss's terms
        needs, at no decoding cost."""
        return self._tensors(slice(None), None, decode=False)

    def decode(self, rows: slice = slice(None), device: str | torch.device | None = None) -> dict:
        """Rows of the batch, trimmed to their own longest row: labels, example_ids int64 [B];
        per stream input_ids, attention_mask int64 [B, T] and states float32 [B, T, d],
        zero-padded on the right. The states are decoded on `device` (a GPU takes the 1-2 byte
        values, not float32)."""
        return self._tensors(rows, device, decode=True)

    def row_ranges(self, max_tokens: int) -> list[slice]:
        """Consecutive row ranges of at most `max_tokens` tokens each (rows x the padded lengths
        of every stream); the whole batch when it fits or `max_tokens` is 0. Batches are
        length-sorted (see _windows), so the ranges, each trimmed to its longest row, pad little."""
        length = sum(s.mask.shape[1] for s in self.streams.values())  # a row's padded tokens
        if not max_tokens or self.rows * length <= max_tokens:
            return [slice(0, self.rows)]
        most = max(1, max_tokens // length)  # rows a piece may hold (one, if a row is longer)
        pieces = -(-self.rows // most)
        size = -(-self.rows // pieces)  # as even as pieces of at most `most` rows can be
        return [slice(k, k + size) for k in range(0, self.rows, size)]

    def pieces(self, max_tokens: int, device: str | torch.device | None = None) -> Iterator[dict]:
        for rows in self.row_ranges(max_tokens):
            yield self.decode(rows, device)

    def _tensors(self, rows: slice, device, decode: bool) -> dict:
        def put(array: np.ndarray) -> torch.Tensor:
            tensor = torch.from_numpy(np.ascontiguousarray(array))
            return tensor if device is None else tensor.to(device)

        out: dict[str, Any] = {
            "labels": put(self.labels[rows]),
            "example_ids": put(self.example_ids[rows]),
        }
        for s, stream in self.streams.items():
            mask = stream.mask[rows]
            t = min(max(int(mask.sum(1).max(initial=0)), 1), mask.shape[1])  # longest row
            mask = mask[:, :t]
            out[s] = {
                "input_ids": put(stream.input_ids[rows, :t]),
                "attention_mask": put(mask.astype(np.int64)),
            }
            if not decode:
                continue
            states = {}
            for k, enc in stream.states.items():
                # views: decoding reads the rows in place
                piece = enc.map(lambda a, t=t: a[rows, :t])
                states[k] = decode_tensor(piece, self.dtype, device)
            out[s]["states"] = states
        return out
