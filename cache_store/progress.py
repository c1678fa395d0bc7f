"""Progress of long work, for a terminal and for whoever else is listening.

Every long loop (the importance pass, the width map, caching, training epochs, evaluation) counts
through `Bar`, a tqdm bar. On a terminal that is all it does. A caller that wants the same counts
elsewhere (a fine-tuning job writes them into its events) wraps the work in `reporting(callback)`:
every bar opened inside then also calls `callback(phase, stage, done, total, eta_s)`, at most
once per `every_s` seconds of a bar and always at its end. The callback travels in a context
variable, so the code between the job and the loops passes nothing along; a thread of its own
(a Ray part worker) reports through its caller's per-part counts instead.

The listener may also stop the work: with `reporting(callback, stop=stop)`, every bar's step,
and every loop without a bar that calls `check()` between its batches, runs `stop()` (which
raises to stop the work: a cancelled job's JobCancelled) at most once per `check_s` seconds. A
`stop` that reads a database so costs next to nothing per batch, and the work stops within
`check_s` seconds and one batch of any loop that counts or checks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from tqdm.auto import tqdm

Callback = Callable[[str, str, int, int, float | None], None]


@dataclass
class _Listener:
    callback: Callback
    every_s: float  # between two reports of a bar
    stop: Callable[[], None] | None
    check_s: float  # between two calls of stop
    checked: float = -math.inf  # time.monotonic() of the last call of stop

    def check(self) -> None:
        now = time.monotonic()
        if self.stop is not None and now - self.checked >= self.check_s:
            self.checked = now
            self.stop()


_listener: ContextVar[_Listener | None] = ContextVar("progress", default=None)


@contextmanager
def reporting(
    callback: Callback,
    every_s: float = 2.0,
    stop: Callable[[], None] | None = None,
    check_s: float = 0.5,
) -> Iterator[None]:
    token = _listener.set(_Listener(callback, every_s, stop, check_s))
    try:
        yield
    finally:
        _listener.reset(token)


def check() -> None:
    """Call between two batches of long work that no bar counts: the listener may stop it here."""
    listener = _listener.get()
    if listener is not None:
        listener.check()


class Bar(tqdm):
    """tqdm that also reports to the listener, if any: `phase` names the job's step (caching,
    training, ...); `desc` is the stage shown to a person. `start`/`overall` count this bar as
    a stretch of a longer one (an epoch of all the training steps)."""

    def __init__(
        self,
        iterable=None,
        *,
        phase: str,
        start: int = 0,
        overall: int | None = None,
        **kwargs,
    ):
        super().__init__(iterable, **kwargs)
        self.phase, self.start, self.overall = phase, start, overall
        self._listener = _listener.get()
        self._began = time.monotonic()
        self._said = -1.0

    def __iter__(self):
        # Counted through update(), which tqdm's own fast iterator bypasses.
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float | None = 1) -> bool | None:
        shown = super().update(n)
        if self._listener is not None:
            self._listener.check()
            self._report()
        return shown

    def _report(self) -> None:
        callback, every_s = self._listener.callback, self._listener.every_s
        now = time.monotonic()
        total = self.overall if self.overall is not None else self.total
        done = self.start + self.n
        if total is not None and done < total and now - self._said < every_s:
            return
        self._said = now
        rate = self.n / max(now - self._began, 1e-9)
        eta = (total - done) / rate if total is not None and rate > 0 else None
        callback(self.phase, self.desc.rstrip(": "), int(done), int(total or 0), eta)
