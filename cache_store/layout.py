"""Zarr layout of one part: array names, chunking along the token axis and compression.

parts/part-00000/
    example_ids  int64 (n)            labels  int64 (n)
    <stream>/offsets    int64 (n+1)   token offsets of the ragged rows (padding is never stored)
    <stream>/input_ids  int32 (T)     T = total tokens of the stream in this part
    <stream>/states/<name>  (T, d)    stored dtype (float16 | uint16 bf16 bits | int8)
    <stream>/scales/<name>  float32 (T)   int8 only
    <stream>/outlier_index/<name>   int16 (T, k)   int8 stores with settings int8_outliers = k
    <stream>/outlier_values/<name>  uint16 (T, k)  bf16 bits of those channels
The part group's attributes carry `committed`, `n_tokens` and per-stream metadata; they are
written last, so a part without `committed` is an interrupted write.
"""

from __future__ import annotations

import asyncio
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import blosc
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
    group: zarr.Group | None, names: list[str], opened: dict | None = None, direct: bool = True
) -> list[np.ndarray | BaseException]:
    """Several whole arrays of a group. Handles not yet opened are opened concurrently in one
    round trip to zarr's event loop (one call per array costs a round trip each); each array is
    then read directly (`DirectArray`) where it can be, and the others concurrently through
    zarr in one more round trip. An array that cannot be read gives its exception in its place.
    `opened` (name -> a DirectArray, or zarr's handle where reading directly does not apply)
    supplies handles kept from before and takes those made now; `group` may be None when it
    holds every name. direct=False: every array through zarr, from handles opened afresh."""
    if not direct:
        opened = None  # kept handles may be DirectArrays: zarr's own are opened afresh
    handles = {n: None if opened is None else opened.get(n) for n in names}
    missing = [n for n, h in handles.items() if h is None]

    async def gather(calls):
        return await asyncio.gather(*calls, return_exceptions=True)

    if missing:
        # zarr has no public async handle of a group's arrays
        calls = (group._async_group.getitem(n) for n in missing)
        for name, handle in zip(missing, sync(gather(calls))):
            if direct and not isinstance(handle, BaseException):
                try:
                    handle = DirectArray.of(handle) or handle
                except Exception:  # noqa: BLE001 - metadata this code does not know: zarr reads it
                    pass
            handles[name] = handle
            if opened is not None and not isinstance(handle, BaseException):
                opened[name] = handle
    out: dict[str, np.ndarray | BaseException | None] = {}
    for name, handle in handles.items():
        if isinstance(handle, BaseException):
            out[name] = handle
        elif isinstance(handle, DirectArray):
            try:
                out[name] = handle.read()
            except Exception as exc:  # noqa: BLE001 - a damaged chunk: reported in its place
                out[name] = exc
        else:
            out[name] = None
    slow = [n for n, v in out.items() if v is None]
    if slow:
        for name, value in zip(slow, sync(gather(handles[n].getitem(...) for n in slow))):
            out[name] = value if isinstance(value, BaseException) else np.asarray(value)
    return [out[n] for n in names]


@dataclass(frozen=True)
class DirectArray:
    """A stored array read on the reader's own thread, its chunk files read and decoded here,
    where that is all zarr would do: a local directory store, zarr format 3, chunks along the
    first axis only, this layout's codecs (bytes, then blosc). Through zarr's event loop each
    of a part's dozen small arrays cost ~0.5 ms of hand-offs between threads, 3-4x the file
    reads and decompression themselves (the quick bench's store: ~8 ms a part against ~1.8 ms),
    and more on a busy machine, where each hand-off waits for a core. It is also what a
    read-only store keeps per array between epochs, instead of zarr's handle and its metadata
    objects (~20 KB a part of Python objects, and the heap they fragment). A missing chunk file
    reads as the fill value, as in zarr; the checksums recorded at commit catch a hole."""

    directory: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    chunk_rows: int
    fill_value: Any
    chunk_files: tuple[str, ...]  # relative to `directory`, in order along the first axis

    @classmethod
    def of(cls, array) -> DirectArray | None:
        """For zarr's handle of an array, or None where reading directly does not apply."""
        from zarr.codecs import BytesCodec
        from zarr.core.metadata.v3 import ArrayV3Metadata
        from zarr.storage import LocalStore

        store, meta = array.store_path.store, array.metadata
        if not isinstance(store, LocalStore) or not isinstance(meta, ArrayV3Metadata):
            return None
        codecs, dtype = meta.codecs, np.dtype(array.dtype)
        endian = getattr(codecs[0], "endian", None) if codecs else None
        if (
            len(codecs) != 2
            or not isinstance(codecs[0], BytesCodec)
            or not isinstance(codecs[1], BloscCodec)
            or (dtype.itemsize > 1 and getattr(endian, "value", None) != sys.byteorder)
        ):
            return None
        shape, chunk = tuple(meta.shape), tuple(meta.chunk_grid.chunk_shape)
        if not shape or chunk[1:] != shape[1:]:
            return None
        zeros = (0,) * (len(shape) - 1)
        return cls(
            directory=Path(store.root) / array.store_path.path,
            dtype=dtype,
            shape=shape,
            chunk_rows=chunk[0],
            fill_value=meta.fill_value,
            chunk_files=tuple(
                meta.encode_chunk_key((i, *zeros)) for i in range(-(-shape[0] // chunk[0]))
            ),
        )

    def read(self) -> np.ndarray:
        rows_per = self.chunk_rows
        out = np.empty((len(self.chunk_files) * rows_per, *self.shape[1:]), dtype=self.dtype)
        for i, name in enumerate(self.chunk_files):
            rows = out[i * rows_per : (i + 1) * rows_per]
            try:
                raw = (self.directory / name).read_bytes()
            except FileNotFoundError:
                rows[...] = self.fill_value
                continue
            decoded = blosc.decompress(raw)
            if len(decoded) != rows.nbytes:
                raise ValueError(
                    f"chunk {name} decodes to {len(decoded)} bytes, {rows.nbytes} expected"
                )
            rows.reshape(-1).view(np.uint8)[...] = np.frombuffer(decoded, dtype=np.uint8)
        return out[: self.shape[0]]
