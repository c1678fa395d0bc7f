"""Run an iterator in a background thread, handing items over through a bounded queue.

The consumer's generator owns the thread: closing it (break, garbage collection, an exception)
stops the producer at its next hand-over and joins it; an exception raised by the producer is
re-raised in the consumer.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")

_ITEM, _DONE, _FAILED = range(3)
_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone
_ids = itertools.count()


def prefetched(
    make_source: Callable[[], Iterator[T]], size: int, name: str = "prefetch"
) -> Iterator[T]:
    """Yield make_source()'s items, produced up to `size` (at least 1) items ahead in a thread."""
    handover: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(message: tuple) -> bool:
        while not stop.is_set():
            try:
                handover.put(message, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            source = make_source()
            try:
                for item in source:
                    if not put((_ITEM, item)):
                        return
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
            put((_DONE, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put((_FAILED, e))

    thread = threading.Thread(target=produce, name=f"{name}-{next(_ids)}", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handover.get()
            if kind == _DONE:
                return
            if kind == _FAILED:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
