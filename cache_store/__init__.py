"""Compressed Zarr v3 store of frozen-backbone ladder states: written once per part by cache
workers, read back as padded, shuffled training batches. Imports nothing from the rest of Ladder.

Names are imported on first use, so option lists (`cache_store.codecs.DTYPES`,
`cache_store.projection.KINDS`) can be read without loading zarr or torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ActivationStore": "cache_store.store",
    "StoreLock": "cache_store.lock",
    "DTYPES": "cache_store.codecs",
    "bytes_per_element": "cache_store.codecs",
    "decode": "cache_store.codecs",
    "encode": "cache_store.codecs",
    **dict.fromkeys(
        (
            "CorruptPartError",
            "StateRangeError",
            "StoreBusyError",
            "StoreError",
            "StoreMismatchError",
        ),
        "cache_store.errors",
    ),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cache_store' has no attribute {name!r}")
