"""Uploaded files on disk: written under a temporary name, renamed once validated and recorded,
and swept of what a crash left behind.

An upload is written to `files/.upload-<id><suffix>`, a file its writer holds an exclusive
`flock` on from creation until the database has recorded it under its final name
(`files/<id><suffix>`, the same inode, so the lock follows the rename). `sweep` removes every
file under `files/` that no record names and that nobody holds: the temporary files of a
process that died mid-upload, and a renamed file whose record never committed. A server that
is still writing (another server on the same home) holds its lock, so a sweep passes its files
by.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_PREFIX = ".upload-"


@dataclass
class Staged:
    path: Path  # where the bytes are now
    handle: object  # the open file, locked

    def keep(self, final: Path) -> None:
        """Flush the bytes to disk, then give them their final name (still locked: a sweep
        meanwhile sees a held file, not an orphan)."""
        self.handle.flush()
        os.fsync(self.handle.fileno())
        os.replace(self.path, final)
        self.path = final
        _fsync_dir(final.parent)


@contextmanager
def staged(directory: Path, file_id: str, suffix: str) -> Iterator[Staged]:
    """A locked temporary file for an upload. On leaving, the lock is released; on an error the
    file, under whichever name it has by then, is removed."""
    path = directory / f"{STAGING_PREFIX}{file_id}{suffix}"
    handle = open(path, "xb")  # noqa: SIM115 - closed below, after the lock's last use
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    stage = Staged(path, handle)
    try:
        yield stage
    except BaseException:
        stage.path.unlink(missing_ok=True)
        raise
    finally:
        handle.close()  # releases the lock


def sweep(directory: Path, recorded: Callable[[str], bool]) -> list[str]:
    """Remove the files in `directory` that no record names (`recorded(path)`, asked once the
    file's lock is ours: a writer records before it lets go) and that no live writer holds.
    Returns the names removed."""
    removed = []
    for path in sorted(directory.iterdir()) if directory.is_dir() else ():
        if not path.is_file() or recorded(str(path)):
            continue
        try:
            handle = open(path, "rb")  # noqa: SIM115
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # an upload in progress (this server or another on the same home)
            if recorded(str(path)):
                continue  # recorded since the first look
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        log.warning(
            "removed %d file(s) under %s left by an interrupted upload: %s",
            len(removed),
            directory,
            ", ".join(removed),
        )
    return removed


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
