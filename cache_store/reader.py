"""Padded training batches from the committed parts of one split.

Pipeline (on a GPU in a background thread, prefetch.py, so reading and decoding overlap training):
parts (order shuffled with the seed) -> whole part read once, kept encoded -> per-example views ->
a window of whole parts up to the shuffle budget, shuffled -> length-sorted batches of B examples
-> padded torch tensors, decoded a batch at a time.
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


@dataclass(frozen=True)
class Example:
    example_id: int
    label: int
    # stream -> (input_ids int32 (t,), {state name: Encoded (t, d)}): views into the stored part
    streams: dict[str, tuple[np.ndarray, dict[str, Encoded]]]
    nbytes: int = 0  # bytes of its stored states (what holding it costs)


def iter_batches(source: PartSource, plan: BatchPlan) -> Iterator[dict]:
    if plan.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {plan.batch_size}")
    if plan.prefetch <= 0:
        return _batches(source, plan)
    return prefetched(lambda: _batches(source, plan), plan.prefetch, name="ladder-prefetch")


def _batches(source: PartSource, plan: BatchPlan) -> Iterator[dict]:
    rng = random.Random(plan.seed)
    parts = list(plan.parts)
    if plan.shuffle:
        rng.shuffle(parts)
        batches = _shuffled(_parts(source, parts, plan.state_names), plan, rng)
    else:
        batches = _in_order(_parts(source, parts, plan.state_names), plan.batch_size)
    for batch in batches:
        if len(batch) == plan.batch_size or not plan.drop_last:
            tensors = collate(batch, source.dtype)
            # Its examples are views that keep their parts alive: let go of them before asking
            # for the next batch, which may read the next window's parts.
            del batch
            yield tensors


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
    part: a window that mixed in stragglers of earlier parts would keep those parts alive)."""
    window: list[Example] = []
    held = 0
    for examples in itertools.chain(parts, [None]):
        size = 0 if examples is None else sum(e.nbytes for e in examples)
        if window and (examples is None or held + size > plan.shuffle_bytes):
            yield from _window_batches(window, plan.batch_size, rng)
            window, held = [], 0
        if examples is not None:
            window += examples
            held += size


def _window_batches(
    window: list[Example], batch_size: int, rng: random.Random
) -> list[list[Example]]:
    rng.shuffle(window)
    run = batch_size * BUCKET_BATCHES
    batches = []
    for k in range(0, len(window), run):
        bucket = sorted(window[k : k + run], key=_length)
        batches += [bucket[j : j + batch_size] for j in range(0, len(bucket), batch_size)]
    rng.shuffle(batches)
    return batches


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


def collate(batch: list[Example], dtype: str) -> dict:
    """labels, example_ids int64 [B]; per stream: input_ids, attention_mask int64 [B, T] and
    states float32 [B, T, d], zero-padded on the right to T = the stream's longest row."""
    out: dict[str, Any] = {
        "labels": torch.tensor([e.label for e in batch], dtype=torch.int64),
        "example_ids": torch.tensor([e.example_id for e in batch], dtype=torch.int64),
    }
    for s, (_, first_states) in batch[0].streams.items():
        rows = [e.streams[s] for e in batch]
        lengths = np.array([len(ids) for ids, _ in rows])
        mask = np.arange(lengths.max())[None, :] < lengths[:, None]  # (B, T) bool
        ids = np.zeros(mask.shape, dtype=np.int64)
        ids[mask] = np.concatenate([row_ids for row_ids, _ in rows])
        states = {}
        for k, first in first_states.items():
            # Pad in the stored dtype (cheap copies of 1-2 byte values), then one vectorised
            # decode of the whole padded batch; padding decodes to zeros (scale 0 for int8).
            values = np.zeros((*mask.shape, first.values.shape[1]), dtype=first.values.dtype)
            scales = None if first.scales is None else np.zeros(mask.shape, dtype=np.float32)
            for i, (_, row_states) in enumerate(rows):
                row = row_states[k]
                values[i, : lengths[i]] = row.values
                if scales is not None:
                    scales[i, : lengths[i]] = row.scales
            b, t, d = values.shape
            flat = Encoded(values.reshape(b * t, d), None if scales is None else scales.reshape(-1))
            states[k] = decode_tensor(flat, dtype).view(b, t, d)
        out[s] = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "states": states,
        }
    return out


def split_batch(batch: dict, max_tokens: int) -> list[dict]:
    """A collated batch as consecutive row ranges of at most `max_tokens` tokens each (rows x the
    padded lengths of every stream), each trimmed to its own longest row; [batch] when it fits
    or `max_tokens` is 0. Batches are length-sorted (see _shuffled), so the ranges pad little."""
    rows = len(batch["labels"])
    tokens = rows * sum(v["attention_mask"].shape[1] for v in batch.values() if isinstance(v, dict))
    if not max_tokens or tokens <= max_tokens:
        return [batch]
    pieces = min(rows, -(-tokens // max_tokens))
    size = -(-rows // pieces)
    return [_rows(batch, slice(k, k + size)) for k in range(0, rows, size)]


def _rows(batch: dict, rows: slice) -> dict:
    out = {}
    for key, value in batch.items():
        if not isinstance(value, dict):
            out[key] = value[rows]
            continue
        mask = value["attention_mask"][rows]
        t = max(int(mask.sum(1).max()), 1)
        out[key] = {
            "input_ids": value["input_ids"][rows, :t],
            "attention_mask": mask[:, :t],
            "states": {k: v[rows, :t] for k, v in value["states"].items()},
        }
    return out
