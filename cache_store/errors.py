"""Errors raised by the activation store; every message is one line naming the problem and the fix."""

from __future__ import annotations


class StoreError(Exception):
    """The store is missing, foreign, unreadable or not ready for the requested operation."""


class StoreMismatchError(StoreError):
    """An existing store was built with different settings (or a different part plan)."""


class StateRangeError(StoreError):
    """A backbone state the store's dtype cannot hold (fp16 tops out at 65,504)."""


class StoreBusyError(StoreError):
    """Another run holds the store's lease (it is being written)."""


class CorruptPartError(StoreError):
    """A committed part whose bytes no longer match what was committed."""

    def __init__(self, message: str, part: int):
        super().__init__(message)
        self.part = part
