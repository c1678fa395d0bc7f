"""One writing run per store: a lease file beside the store, renewed while the run lives.

Zarr has no safe concurrent writes to one chunk, and two runs on one store would rewrite each
other's uncommitted parts. A lease (owner, host, pid, expiry) survives a crash: it simply expires,
and a lease whose owner process is gone on this very host is taken over at once, so a run killed
with SIGKILL and started again does not wait. Works on any fsspec filesystem; on a local disk the
first lease is created atomically (O_EXCL), elsewhere a read-back after writing settles races.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cache_store.errors import StoreBusyError
from cache_store.progress import check

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    def __init__(self, url: str, ttl_s: float = 30.0):
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url + ".lock")
        self.ttl_s = ttl_s
        self.me = {"owner": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        try:
            with self.fs.open(self.path, "r") as handle:
                return json.loads(handle.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, exclusive: bool) -> bool:
        body = json.dumps({**self.me, "expires": time.time() + self.ttl_s})
        if exclusive and isinstance(self.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
            return True
        self.fs.pipe_file(self.path, body.encode())
        return True

    def _holder(self) -> dict | None:
        """The live lease of another run, or None when the store is free to take."""
        lease = self._read()
        if lease is None or lease.get("owner") == self.me["owner"]:
            return None
        if lease.get("expires", 0) < time.time():
            return None
        if lease.get("host") == self.me["host"] and not _pid_alive(int(lease.get("pid", -1))):
            log.info("taking over the lease of dead process %s on %s", lease["pid"], lease["host"])
            return None
        return lease

    def acquire(self, wait_s: float = 0.0) -> StoreLock:
        """Take the lease, waiting up to `wait_s` for its holder (StoreBusyError after that); a
        listener's check (cache_store.progress: a cancelled job) may end the wait sooner."""
        deadline = time.time() + wait_s
        while True:
            holder = self._holder()
            if holder is None:
                fresh = self._read() is None
                if self._write(exclusive=fresh):
                    time.sleep(0.05)
                    if (self._read() or {}).get("owner") == self.me["owner"]:
                        break
                continue
            left = holder["expires"] - time.time()
            if time.time() >= deadline:
                raise StoreBusyError(
                    f"store {self.url} is being written by another run (pid {holder.get('pid')} on "
                    f"{holder.get('host')}; its lease ends in {max(left, 0):.0f}s unless renewed); "
                    f"wait for it to finish, or pass --wait SECONDS"
                )
            time.sleep(min(1.0, max(deadline - time.time(), 0.05)))
            check()
        self._thread = threading.Thread(target=self._renew, name="ladder-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            lease = self._read()
            if lease is not None and lease.get("owner") != self.me["owner"]:
                log.error(
                    "lease on %s was taken by another run; this run's writes may conflict", self.url
                )
                return
            self._write(exclusive=False)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if (self._read() or {}).get("owner") == self.me["owner"]:
            self.fs.rm_file(self.path)

    def __enter__(self) -> StoreLock:
        return self.acquire() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.release()
