"""Compressed Zarr v3 store of frozen-backbone ladder states: written once per part by cache
workers, read back as padded, shuffled training batches. Imports nothing from the rest of Ladder."""
from cache_store.codecs import DTYPES, bytes_per_element, decode, encode
from cache_store.errors import (CorruptPartError, StateRangeError, StoreBusyError, StoreError,
                               StoreMismatchError)
from cache_store.lock import StoreLock
from cache_store.store import ActivationStore

__all__ = ["ActivationStore", "StoreLock", "DTYPES", "CorruptPartError", "StateRangeError",
           "StoreBusyError", "StoreError", "StoreMismatchError", "bytes_per_element", "decode",
           "encode"]
