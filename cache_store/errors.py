"""Errors raised by the activation store; every message is one line naming the problem and the fix."""
from __future__ import annotations


class StoreError(Exception):
    """The store is missing, foreign, unreadable or not ready for the requested operation."""


class StoreMismatchError(StoreError):
    """An existing store was built with different settings (or a different part plan)."""


class StateRangeError(StoreError):
    """A backbone state the store's dtype cannot hold (fp16 tops out at 65,504)."""
