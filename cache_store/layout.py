"""Zarr layout of one part: array names, chunking along the token axis and compression.

parts/part-00000/
    example_ids  int64 (n)            labels  int64 (n)
    <stream>/offsets    int64 (n+1)   token offsets of the ragged rows (padding is never stored)
    <stream>/input_ids  int32 (T)     T = total tokens of the stream in this part
    <stream>/states/<name>  (T, d)    stored dtype (float16 | uint16 bf16 bits | int8)
    <stream>/scales/<name>  float32 (T)   int8 only
The part group's attributes carry `committed`, `n_tokens` and per-stream metadata; they are
written last, so a part without `committed` is an interrupted write.
"""

from __future__ import annotations

import asyncio
import math
import zlib

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle
from zarr.core.sync import sync

FORMAT_VERSION = 1
PARTS = "parts"
CHUNK_BYTES = 1 << 20  # a chunk holds >= 1 MiB uncompressed: fewer, larger objects on remote stores


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def part_path(index: int) -> str:
    return f"{PARTS}/{part_name(index)}"


def chunk_rows(n_rows: int, row_bytes: int) -> int:
    """Rows per chunk along axis 0: enough for CHUNK_BYTES, capped so small arrays are one chunk."""
    return max(1, min(math.ceil(CHUNK_BYTES / max(row_bytes, 1)), n_rows))


def compressor(dtype: np.dtype) -> BloscCodec:
    # LZ4, not zstd: on MiniLM fp16 states zstd-3 saved only 7.6% of the bytes but decoded at
    # ~1 GB/s, which was most of the read path's cost per training epoch; LZ4 decodes at ~28 GB/s
    # and still shrinks what is compressible (int8 codes, all-zero rows). Byte shuffle groups the
    # high (sign/exponent) bytes of 2-, 4- and 8-byte values; for 1-byte int8 it is a no-op, so
    # bit-shuffle instead.
    shuffle = BloscShuffle.bitshuffle if dtype.itemsize == 1 else BloscShuffle.shuffle
    return BloscCodec(cname="lz4", clevel=5, shuffle=shuffle)


def checksum(data: np.ndarray) -> int:
    """CRC-32 of an array's bytes: recorded at commit, checked on every read. (A chunk file that
    goes missing reads back as zeros in zarr, so per-chunk codec checksums would not catch it.)"""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def write_array(group: zarr.Group, name: str, data: np.ndarray) -> int:
    """Write a whole array; returns its checksum."""
    data = np.ascontiguousarray(data)
    row_bytes = data.dtype.itemsize * int(np.prod(data.shape[1:], dtype=np.int64))
    chunks = (chunk_rows(data.shape[0], row_bytes), *data.shape[1:])
    group.create_array(name, data=data, chunks=chunks, compressors=compressor(data.dtype))
    return checksum(data)


def read_array(group: zarr.Group, name: str) -> np.ndarray:
    """The whole array in one call, so zarr fetches and decodes its chunks concurrently."""
    return group[name][...]


def read_arrays(
    group: zarr.Group | None, names: list[str], opened: dict | None = None
) -> list[np.ndarray | BaseException]:
    """Several whole arrays of a group, opened and read concurrently in one round trip to zarr's
    event loop (one call per array costs a round trip each to open it and to read it: most of
    the time of reading a part of a dozen small arrays). An array that cannot be read gives its
    exception in its place. `opened` (name -> zarr's array handle) supplies handles opened
    before and takes those opened now; `group` may be None when it holds every name."""

    async def one(name: str):
        array = None if opened is None else opened.get(name)
        if array is None:
            array = await group._async_group.getitem(name)  # noqa: SLF001 - no public async handle
            if opened is not None:
                opened[name] = array
        return await array.getitem(...)

    async def every():
        return await asyncio.gather(*(one(n) for n in names), return_exceptions=True)

    return [r if isinstance(r, BaseException) else np.asarray(r) for r in sync(every())]
