"""Padded training batches from the committed parts of one split.

Pipeline (on a GPU in a background thread, prefetch.py, so reading and decoding overlap training):
parts (order shuffled with the seed) -> whole part read once, kept encoded -> per-example views ->
a window of whole parts up to the shuffle budget, shuffled -> length-sorted batches of B examples
-> padded in the stored dtype -> float32 torch tensors, decoded a batch at a time (or, for
training, a micro-batch at a time: PaddedBatch.pieces).
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


@dataclass(frozen=True)
class Example:
    example_id: int
    label: int
    # stream -> (input_ids int32 (t,), {state name: Encoded (t, d)}): views into the stored part
    streams: dict[str, tuple[np.ndarray, dict[str, Encoded]]]
    nbytes: int = 0  # bytes of its stored states (what holding it costs)


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
        batches = _shuffled(_parts(source, parts, plan.state_names), plan, rng)
    else:
        batches = _in_order(_parts(source, parts, plan.state_names), plan.batch_size)
    for batch in batches:
        if len(batch) == plan.batch_size or not plan.drop_last:
            out = padded = pad(batch, source.dtype)
            if plan.decode:
                out = padded.decode()
            # Its examples are views that keep their parts alive: let go of them (and of the
            # padded copy once decoded) before asking for the next batch, which may read the
            # next window's parts.
            del batch, padded
            yield out


def _in_order(parts: Iterator[list[Example]], batch_size: int) -> Iterator[list[Example]]:
    pending: list[Example] = []
    for examples in parts:
        for example in examples:
            pending.append(example)
            if len(pending) == batch_size:
                yield pending
                pending = []
    if pending:
        yield pending


def _shuffled(
    parts: Iterator[list[Example]], plan: BatchPlan, rng: random.Random
) -> Iterator[list[Example]]:
    """Batches from windows of whole parts holding up to `shuffle_bytes` of states (at least one
    part). A window's examples are shuffled together, cut into runs of BUCKET_BATCHES * B, each
    run sorted by length before it is cut into batches (so a batch holds examples of similar
    length and little compute goes to padding), and the window's batches come out in random
    order. Every batch of a window is out before the next window's parts are read, so the reader
    holds one window and one part, whatever the store's size (examples are views into their
    part: a window that mixed in stragglers of earlier parts would keep those parts alive).
    The examples that do not fill a last batch of B are copied out of their parts and go on to
    the next window, so an epoch has one short batch (its last), not one per window."""
    window: list[Example] = []
    held = 0
    for examples in itertools.chain(parts, [None]):
        size = 0 if examples is None else sum(e.nbytes for e in examples)
        if window and (examples is None or held + size > plan.shuffle_bytes):
            carry = 0 if examples is None else len(window) % plan.batch_size
            batches, window = _window_batches(window, plan.batch_size, carry, rng)
            yield from batches
            del batches  # views into the window's parts: let the parts go before reading on
            window = [_detached(e) for e in window]
            held = sum(e.nbytes for e in window)
        if examples is not None:
            window += examples
            held += size


def _window_batches(
    window: list[Example], batch_size: int, carry: int, rng: random.Random
) -> tuple[list[list[Example]], list[Example]]:
    """The window's batches in random order, and `carry` of its examples (drawn at random) kept
    back for the next window."""
    rng.shuffle(window)
    kept, window = window[len(window) - carry :], window[: len(window) - carry]
    run = batch_size * BUCKET_BATCHES
    batches = []
    for k in range(0, len(window), run):
        bucket = sorted(window[k : k + run], key=_length)
        batches += [bucket[j : j + batch_size] for j in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches, kept


def _detached(example: Example) -> Example:
    """The example with its own copies of its arrays, so it keeps no part alive."""
    streams = {
        s: (
            ids.copy(),
            {
                k: Encoded(v.values.copy(), None if v.scales is None else v.scales.copy())
                for k, v in states.items()
            },
        )
        for s, (ids, states) in example.streams.items()
    }
    return Example(example.example_id, example.label, streams, example.nbytes)


def _length(example: Example) -> int:
    return len(next(iter(example.streams.values()))[0])


def _parts(
    source: PartSource, parts: list[int], state_names: list[str] | None
) -> Iterator[list[Example]]:
    """Each part's examples, as views into the part as read (not decoded)."""
    for index in parts:
        part = source.read_part(index, state_names=state_names, decode=False)
        streams = part["streams"]
        examples = []
        for j, (example_id, label) in enumerate(
            zip(part["example_ids"].tolist(), part["labels"].tolist())
        ):
            views, nbytes = {}, 0
            for s, stream in streams.items():
                start, end = int(stream["offsets"][j]), int(stream["offsets"][j + 1])
                states = {
                    k: Encoded(
                        v.values[start:end], None if v.scales is None else v.scales[start:end]
                    )
                    for k, v in stream["states"].items()
                }
                views[s] = (stream["input_ids"][start:end], states)
                nbytes += sum(e.values.nbytes for e in states.values())
            examples.append(Example(example_id, label, views, nbytes))
        yield examples


@dataclass(frozen=True)
class PaddedStream:
    input_ids: np.ndarray  # int64 (B, T)
    mask: np.ndarray  # bool (B, T)
    states: dict[str, Encoded]  # values (B, T, d) in the stored dtype, int8 scales (B, T)


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
        length-sorted (see _shuffled), so the ranges, each trimmed to its longest row, pad little."""
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
                values = enc.values[rows, :t]
                b, _, d = values.shape
                scales = None if enc.scales is None else enc.scales[rows, :t].reshape(-1)
                flat = Encoded(values.reshape(b * t, d), scales)  # a copy only for a piece
                states[k] = decode_tensor(flat, self.dtype, device).view(b, t, d)
            out[s]["states"] = states
        return out


def pad(batch: list[Example], dtype: str) -> PaddedBatch:
    """The batch's rows zero-padded on the right to each stream's longest row, in the stored
    dtype (cheap copies of 1-2 byte values); padding decodes to zeros (scale 0 for int8)."""
    streams = {}
    for s, (_, first_states) in batch[0].streams.items():
        rows = [e.streams[s] for e in batch]
        lengths = np.array([len(ids) for ids, _ in rows])
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]  # (B, T) bool
        ids = np.zeros(mask.shape, dtype=np.int64)
        ids[mask] = np.concatenate([row_ids for row_ids, _ in rows])
        states = {}
        for k, first in first_states.items():
            values = np.zeros((*mask.shape, first.values.shape[1]), dtype=first.values.dtype)
            scales = None if first.scales is None else np.zeros(mask.shape, dtype=np.float32)
            for i, (_, row_states) in enumerate(rows):
                row = row_states[k]
                values[i, : lengths[i]] = row.values
                if scales is not None:
                    scales[i, : lengths[i]] = row.scales
            states[k] = Encoded(values, scales)
        streams[s] = PaddedStream(ids, mask, states)
    return PaddedBatch(
        labels=np.array([e.label for e in batch], dtype=np.int64),
        example_ids=np.array([e.example_id for e in batch], dtype=np.int64),
        streams=streams,
        dtype=dtype,
    )
