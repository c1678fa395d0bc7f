"""The service's state in SQLite (WAL): uploaded files, fine-tuning jobs, their events, models.

One database file under LADDER_HOME, shared by the API process and the job processes (Ray tasks
on the same volume); every call opens a short transaction, so writers never hold the file long.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT, bytes INTEGER, created_at INTEGER, purpose TEXT,
    rows INTEGER, labels TEXT, has_pair INTEGER, path TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, created_at INTEGER, finished_at INTEGER, model TEXT,
    training_file TEXT, validation_file TEXT, seed INTEGER, suffix TEXT, hyperparameters TEXT,
    status TEXT, fine_tuned_model TEXT, error TEXT, result TEXT, attempts INTEGER DEFAULT 0);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE, job_id TEXT, created_at INTEGER,
    level TEXT, message TEXT, data TEXT);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY, created INTEGER, backbone TEXT, path TEXT, job_id TEXT);
"""

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "caching", "training")
_JSON_FIELDS = {"labels", "hyperparameters", "error", "result", "data"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _row(row: sqlite3.Row | None) -> dict | None:
    if row is None:
        return None
    out = dict(row)
    for key in _JSON_FIELDS & out.keys():
        out[key] = json.loads(out[key]) if out[key] is not None else None
    return out


class Database:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._tx() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)

    @contextmanager
    def _tx(self):
        with self._lock:
            con = sqlite3.connect(self.path, timeout=30)
            con.row_factory = sqlite3.Row
            try:
                with con:
                    yield con
            finally:
                con.close()

    # ---- files ---------------------------------------------------------------------------

    def add_file(self, record: dict) -> dict:
        with self._tx() as con:
            con.execute("INSERT INTO files VALUES (:id, :filename, :bytes, :created_at, :purpose, "
                        ":rows, :labels, :has_pair, :path)", {**record, "labels": json.dumps(record["labels"])})
        return record

    def get_file(self, file_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())

    def list_files(self) -> list[dict]:
        with self._tx() as con:
            return [_row(r) for r in con.execute("SELECT * FROM files ORDER BY created_at DESC")]

    # ---- jobs ----------------------------------------------------------------------------

    def add_job(self, job: dict) -> dict:
        with self._tx() as con:
            con.execute(
                "INSERT INTO jobs (id, created_at, model, training_file, validation_file, seed, "
                "suffix, hyperparameters, status) VALUES (:id, :created_at, :model, "
                ":training_file, :validation_file, :seed, :suffix, :hyperparameters, :status)",
                {**job, "hyperparameters": json.dumps(job["hyperparameters"])})
        return self.get_job(job["id"])

    def get_job(self, job_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_jobs(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` is the last id of the previous page (a cursor)."""
        with self._tx() as con:
            if after:
                anchor = con.execute("SELECT rowid FROM jobs WHERE id = ?", (after,)).fetchone()
                if anchor is None:
                    return [], False
                rows = con.execute("SELECT * FROM jobs WHERE rowid < ? ORDER BY rowid DESC "
                                   "LIMIT ?", (anchor[0], limit + 1)).fetchall()
            else:
                rows = con.execute("SELECT * FROM jobs ORDER BY rowid DESC LIMIT ?",
                                   (limit + 1,)).fetchall()
        return [_row(r) for r in rows[:limit]], len(rows) > limit

    def jobs_with_status(self, statuses: tuple[str, ...]) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        with self._tx() as con:
            return [_row(r) for r in con.execute(
                f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid", statuses)]

    def count_jobs_by_status(self) -> dict[str, int]:
        with self._tx() as con:
            return dict(con.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())

    def update_job(self, job_id: str, only_if_active: bool = False, **fields) -> bool:
        """Set fields; with only_if_active, nothing changes once the job is terminal (a late
        progress report must not resurrect a cancelled job). Returns whether a row changed."""
        for key in _JSON_FIELDS & fields.keys():
            fields[key] = json.dumps(fields[key]) if fields[key] is not None else None
        if fields.get("status") in TERMINAL:
            fields.setdefault("finished_at", int(time.time()))
        sets = ", ".join(f"{k} = :{k}" for k in fields)
        guard = f" AND status IN ({','.join(repr(s) for s in ACTIVE)})" if only_if_active else ""
        with self._tx() as con:
            cur = con.execute(f"UPDATE jobs SET {sets} WHERE id = :id{guard}",
                              {**fields, "id": job_id})
            return cur.rowcount > 0

    # ---- events --------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None):
        with self._tx() as con:
            con.execute("INSERT INTO events (id, job_id, created_at, level, message, data) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (new_id("ftevent"), job_id, int(time.time()),
                                                     level, message, json.dumps(data or {})))

    def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Oldest first, so a client can follow a job with `after` = the last id it saw."""
        with self._tx() as con:
            start = 0
            if after:
                anchor = con.execute("SELECT seq FROM events WHERE id = ?", (after,)).fetchone()
                start = anchor[0] if anchor else 0
            rows = con.execute("SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq "
                               "LIMIT ?", (job_id, start, limit + 1)).fetchall()
        out = []
        for row in rows[:limit]:
            event = _row(row)
            event.pop("seq")
            event.pop("job_id")
            out.append(event)
        return out, len(rows) > limit

    # ---- models --------------------------------------------------------------------------

    def add_model(self, model_id: str, backbone: str, path: str, job_id: str) -> None:
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                        (model_id, int(time.time()), backbone, path, job_id))

    def get_model(self, model_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone())

    def list_models(self) -> list[dict]:
        with self._tx() as con:
            return [_row(r) for r in con.execute("SELECT * FROM models ORDER BY created DESC")]

    def delete_model(self, model_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM models WHERE id = ?", (model_id,))
