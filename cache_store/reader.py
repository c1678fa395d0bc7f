"""Padded training batches from the committed parts of one split.

Pipeline, all in one background thread (prefetch.py) so reading and decoding overlap training:
parts (order shuffled with the seed) -> whole part read and decoded once -> per-example views ->
shuffle buffer -> batches of B examples -> padded torch tensors.
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
    shuffle_bytes: int  # bytes of examples held for shuffling (mixes across parts)
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
    examples = _examples(source, parts, plan.state_names)
    if plan.shuffle:
        examples = _shuffle_buffer(examples, rng, plan.shuffle_bytes)
    for batch in _batched(examples, plan, rng):
        if len(batch) == plan.batch_size or not plan.drop_last:
            yield collate(batch, source.dtype)


def _batched(examples: Iterator[Example], plan: BatchPlan, rng: random.Random) -> Iterator[list]:
    """Batches of B examples. When shuffling, each window of BUCKET_BATCHES * B examples (fewer
    if they pass half the shuffle budget in bytes) is sorted by length before it is cut, and its
    batches are emitted in random order: batches then hold examples of similar length, so
    little compute goes to padding."""
    window = plan.batch_size * (BUCKET_BATCHES if plan.shuffle else 1)
    pending: list[Example] = []
    held = 0
    for example in itertools.chain(examples, [None]):
        if example is not None:
            pending.append(example)
            held += example.nbytes
            over_budget = (
                plan.shuffle
                and held >= plan.shuffle_bytes // 2
                and len(pending) % plan.batch_size == 0
            )
            if len(pending) < window and not over_budget:
                continue
        if plan.shuffle:
            pending.sort(key=lambda e: len(next(iter(e.streams.values()))[0]))
        batches = [
            pending[k : k + plan.batch_size] for k in range(0, len(pending), plan.batch_size)
        ]
        if plan.shuffle:
            rng.shuffle(batches)
        yield from batches
        pending, held = [], 0


def _examples(
    source: PartSource, parts: list[int], state_names: list[str] | None
) -> Iterator[Example]:
    for index in parts:
        part = source.read_part(index, state_names=state_names, decode=False)
        streams = part["streams"]
        for j, (example_id, label) in enumerate(
            zip(part["example_ids"].tolist(), part["labels"].tolist())
        ):
            views, nbytes = {}, 0
            for s, stream in streams.items():
                start, end = int(stream["offsets"][j]), int(stream["offsets"][j + 1])
                # Views into the part: it stays alive while any of its examples wait in the
                # shuffle buffer (a few parts of a few tens of MB), which costs less than copying.
                states = {
                    k: Encoded(
                        v.values[start:end], None if v.scales is None else v.scales[start:end]
                    )
                    for k, v in stream["states"].items()
                }
                views[s] = (stream["input_ids"][start:end], states)
                nbytes += sum(e.values.nbytes for e in states.values())
            yield Example(example_id, label, views, nbytes)


def _shuffle_buffer(
    examples: Iterator[Example], rng: random.Random, budget: int
) -> Iterator[Example]:
    """Windows of examples holding up to `budget` bytes of states, each shuffled and emitted
    whole. Examples are views into their part, so a part stays in memory until its last example
    is out: emitting whole windows bounds that to about two windows and a part, whatever the
    store's size. (A reservoir that evicts one random example at a time keeps stragglers of
    every part read so far, i.e. the whole epoch, in memory.) Every example comes out once."""
    window: list[Example] = []
    held = 0
    for example in examples:
        window.append(example)
        held += example.nbytes
        if held >= budget:
            rng.shuffle(window)
            yield from window
            window, held = [], 0
    rng.shuffle(window)
    yield from window


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
