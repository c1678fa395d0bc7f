"""Padded training batches from the committed parts of one split.

Pipeline, all in one background thread (prefetch.py) so reading and decoding overlap training:
parts (order shuffled with the seed) -> whole part read and decoded once -> per-example views ->
shuffle buffer -> batches of B examples -> padded torch tensors.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cache_store.prefetch import prefetched


class PartSource(Protocol):
    def read_part(self, index: int, *, state_names: list[str] | None = None) -> dict[str, Any]: ...


@dataclass(frozen=True)
class BatchPlan:
    parts: list[int]                 # committed part indices of the split, in plan order
    batch_size: int
    shuffle: bool
    seed: int                        # pass e.g. base_seed + epoch for a new order every epoch
    shuffle_buffer: int              # examples held for shuffling (mixes across part boundaries)
    prefetch: int                    # batches prepared ahead of the consumer
    drop_last: bool
    state_names: list[str] | None    # None: every stored state


@dataclass(frozen=True)
class Example:
    example_id: int
    label: int
    # stream -> (input_ids int32 (t,), {state name: float32 (t, d)}); views into the decoded part
    streams: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]


def iter_batches(source: PartSource, plan: BatchPlan) -> Iterator[dict]:
    if plan.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {plan.batch_size}")
    return prefetched(lambda: _batches(source, plan), plan.prefetch, name="ladder-prefetch")


def _batches(source: PartSource, plan: BatchPlan) -> Iterator[dict]:
    rng = random.Random(plan.seed)
    parts = list(plan.parts)
    if plan.shuffle:
        rng.shuffle(parts)
    examples = _examples(source, parts, plan.state_names)
    if plan.shuffle:
        examples = _shuffle_buffer(examples, rng, plan.shuffle_buffer)
    batch: list[Example] = []
    for example in examples:
        batch.append(example)
        if len(batch) == plan.batch_size:
            yield collate(batch)
            batch = []
    if batch and not plan.drop_last:
        yield collate(batch)


def _examples(source: PartSource, parts: list[int], state_names: list[str] | None) -> Iterator[Example]:
    for index in parts:
        part = source.read_part(index, state_names=state_names)
        streams = part["streams"]
        for j, (example_id, label) in enumerate(zip(part["example_ids"].tolist(), part["labels"].tolist())):
            views = {}
            for s, stream in streams.items():
                start, end = int(stream["offsets"][j]), int(stream["offsets"][j + 1])
                views[s] = (stream["input_ids"][start:end],
                            {k: v[start:end] for k, v in stream["states"].items()})
            yield Example(example_id, label, views)


def _shuffle_buffer(examples: Iterator[Example], rng: random.Random, size: int) -> Iterator[Example]:
    """Each incoming example replaces a random one of the buffer, which is emitted; the rest
    are emitted shuffled at the end. Every example comes out exactly once."""
    buffer: list[Example] = []
    for example in examples:
        if len(buffer) < max(1, size):
            buffer.append(example)
            continue
        j = rng.randrange(len(buffer))
        yield buffer[j]
        buffer[j] = example
    rng.shuffle(buffer)
    yield from buffer


def collate(batch: list[Example]) -> dict:
    """labels, example_ids int64 [B]; per stream: input_ids, attention_mask int64 [B, T] and
    states float32 [B, T, d], zero-padded on the right to T = the stream's longest row."""
    out: dict[str, Any] = {
        "labels": torch.tensor([e.label for e in batch], dtype=torch.int64),
        "example_ids": torch.tensor([e.example_id for e in batch], dtype=torch.int64),
    }
    for s, (_, first_states) in batch[0].streams.items():
        rows = [e.streams[s] for e in batch]
        t = max(len(ids) for ids, _ in rows)
        ids = np.zeros((len(batch), t), dtype=np.int64)
        mask = np.zeros((len(batch), t), dtype=np.int64)
        states = {k: np.zeros((len(batch), t, v.shape[1]), dtype=np.float32)
                  for k, v in first_states.items()}
        for i, (row_ids, row_states) in enumerate(rows):
            n = len(row_ids)
            ids[i, :n] = row_ids
            mask[i, :n] = 1
            for k, v in row_states.items():
                states[k][i, :n] = v
        out[s] = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                  "states": {k: torch.from_numpy(v) for k, v in states.items()}}
    return out
