"""The service's state in SQLite (WAL): uploaded files, fine-tuning jobs, their events, models.

One database file under LADDER_HOME, shared by the API process and the job processes (Ray tasks
on the same volume); every call opens a short transaction, so writers never hold the file long.
"""

from __future__ import annotations

import json
import logging
import os
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

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "caching", "training")
# Jobs that hold a place among LADDER_MAX_ACTIVE_JOBS: the active ones, and the cancelled ones
# whose run has not stopped yet (`cancel_job` leaves finished_at unset, `finish_cancelled` sets it).
_HOLDING = (
    f"(status IN ({','.join(map(repr, ACTIVE))}) OR (status = 'cancelled' AND finished_at IS NULL))"
)
_JSON_FIELDS = {"labels", "hyperparameters", "error", "result", "data"}


class TooManyJobs(Exception):
    def __init__(self, active: int, cap: int):
        super().__init__(f"{active} jobs active (at most {cap})")
        self.active, self.cap = active, cap


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
            _add_columns(con, "jobs", {"store": "TEXT"})
            _add_columns(con, "files", {"task": "TEXT DEFAULT 'classification'", "kind": "TEXT"})

    def check(self) -> None:
        """Raise sqlite3.DatabaseError when the file is damaged."""
        with self._tx() as con:
            result = con.execute("PRAGMA quick_check").fetchone()[0]
        if result != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {result}")

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
            con.execute(
                "INSERT INTO files (id, filename, bytes, created_at, purpose, rows, labels, "
                "has_pair, path, task, kind) VALUES (:id, :filename, :bytes, :created_at, "
                ":purpose, :rows, :labels, :has_pair, :path, :task, :kind)",
                {
                    "task": "classification",
                    "kind": None,
                    **record,
                    "labels": json.dumps(record["labels"]),
                },
            )
        return record

    def get_file(self, file_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone())

    def has_file_path(self, path: str) -> bool:
        with self._tx() as con:
            return con.execute("SELECT 1 FROM files WHERE path = ?", (path,)).fetchone() is not None

    def delete_file(self, file_id: str) -> list[str]:
        """Delete a file's record, unless a job that is active, or cancelled and still stopping,
        uses it: then delete nothing and return those jobs' ids. The check and the delete are
        one transaction."""
        with self._tx() as con:
            users = [
                r[0]
                for r in con.execute(
                    f"SELECT id FROM jobs WHERE {_HOLDING} AND "
                    f"(training_file = ? OR validation_file = ?) ORDER BY rowid",
                    (file_id, file_id),
                )
            ]
            if not users:
                con.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return users

    def list_files(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` is the last id of the previous page (a cursor)."""
        return self._page("files", after, limit)

    def _page(self, table: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """A page of `table` (files or jobs), newest first (rows are added in time order), after
        the row with id `after`; and whether more follow."""
        with self._tx() as con:
            since, anchor = "", ()
            if after:
                row = con.execute(f"SELECT rowid FROM {table} WHERE id = ?", (after,)).fetchone()
                if row is None:
                    return [], False
                since, anchor = "WHERE rowid < ? ", (row[0],)
            rows = con.execute(
                f"SELECT * FROM {table} {since}ORDER BY rowid DESC LIMIT ?", (*anchor, limit + 1)
            ).fetchall()
        return [_row(r) for r in rows[:limit]], len(rows) > limit

    # ---- jobs ----------------------------------------------------------------------------

    def add_job(self, job: dict, max_active: int | None = None) -> dict:
        """Insert a job; with max_active, only while fewer jobs are active or still stopping
        after a cancel (else TooManyJobs). The count and the insert are one statement, so
        simultaneous requests, or servers on one home, cannot all pass the check before any of
        them inserts."""
        holding = f"SELECT COUNT(*) FROM jobs WHERE {_HOLDING}"
        values = [job[k] for k in ("id", "created_at", "model", "training_file")]
        values += [job[k] for k in ("validation_file", "seed", "suffix", "status")]
        values.append(json.dumps(job["hyperparameters"]))
        below_cap = ""
        if max_active is not None:
            below_cap = f" WHERE ({holding}) < ?"
            values.append(max_active)
        with self._tx() as con:
            cur = con.execute(
                "INSERT INTO jobs (id, created_at, model, training_file, validation_file, seed, "
                "suffix, status, hyperparameters) SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?" + below_cap,
                values,
            )
            if cur.rowcount == 0:
                raise TooManyJobs(con.execute(holding).fetchone()[0], max_active)
        return self.get_job(job["id"])

    def get_job(self, job_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_jobs(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Newest first; `after` is the last id of the previous page (a cursor)."""
        return self._page("jobs", after, limit)

    def jobs_with_status(self, statuses: tuple[str, ...]) -> list[dict]:
        marks = ",".join("?" * len(statuses))
        with self._tx() as con:
            return [
                _row(r)
                for r in con.execute(
                    f"SELECT * FROM jobs WHERE status IN ({marks}) ORDER BY rowid", statuses
                )
            ]

    def needed_stores(self) -> set[str]:
        """The stores (names under stores/) that a job which is active (or cancelled and still
        stopping), or whose training file still exists, has cached into."""
        with self._tx() as con:
            return {
                r[0]
                for r in con.execute(
                    f"SELECT DISTINCT store FROM jobs WHERE store IS NOT NULL AND ({_HOLDING} "
                    f"OR training_file IN (SELECT id FROM files))"
                )
            }

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
            cur = con.execute(
                f"UPDATE jobs SET {sets} WHERE id = :id{guard}", {**fields, "id": job_id}
            )
            return cur.rowcount > 0

    def cancel_job(self, job_id: str) -> bool:
        """Cancel an active job: its status says cancelled at once, while finished_at stays
        unset until its run has stopped (`finish_cancelled`). Returns whether it was active."""
        with self._tx() as con:
            cur = con.execute(
                f"UPDATE jobs SET status = 'cancelled' WHERE id = ? AND status IN "
                f"({','.join('?' * len(ACTIVE))})",
                (job_id, *ACTIVE),
            )
            return cur.rowcount > 0

    def finish_cancelled(self, job_id: str) -> None:
        """A cancelled job's run has stopped (or will never run: cancelled while queued, or its
        server died): set its finished_at, unless set, and add its last event, "cancelled",
        unless added, in one transaction. Nothing for a job that is not cancelled."""
        with self._tx() as con:
            cur = con.execute(
                "UPDATE jobs SET finished_at = COALESCE(finished_at, ?) WHERE id = ? AND "
                "status = 'cancelled'",
                (int(time.time()), job_id),
            )
            if cur.rowcount:
                self._insert_event(con, job_id, "cancelled", "warning", {"status": "cancelled"})

    def finish_job(
        self, job_id: str, model_id: str, backbone: str, path: str, result: dict
    ) -> bool:
        """Succeed a job and register its model in one transaction, only while the job is still
        active: a job cancelled meanwhile registers nothing. Returns whether it happened."""
        with self._tx() as con:
            cur = con.execute(
                f"UPDATE jobs SET status = 'succeeded', fine_tuned_model = ?, result = ?, "
                f"finished_at = ? WHERE id = ? AND status IN ({','.join('?' * len(ACTIVE))})",
                (model_id, json.dumps(result), int(time.time()), job_id, *ACTIVE),
            )
            if cur.rowcount == 0:
                return False
            con.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                (model_id, int(time.time()), backbone, path, job_id),
            )
            self._insert_event(
                con, job_id, f"succeeded: {model_id}", "info", {"status": "succeeded", **result}
            )
            return True

    # ---- events --------------------------------------------------------------------------

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None):
        """Add an event. One whose data has a terminal status (the job's last word) is added
        only if the job has none yet, so racing writers (a cancel, the job) never repeat it."""
        with self._tx() as con:
            self._insert_event(con, job_id, message, level, data or {})

    def _insert_event(self, con, job_id: str, message: str, level: str, data: dict) -> None:
        if data.get("status") in TERMINAL and self._terminal_event(con, job_id):
            return
        con.execute(
            "INSERT INTO events (id, job_id, created_at, level, message, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (new_id("ftevent"), job_id, int(time.time()), level, message, json.dumps(data)),
        )

    @staticmethod
    def _terminal_event(con, job_id: str) -> bool:
        marks = ",".join("?" * len(TERMINAL))
        return (
            con.execute(
                f"SELECT 1 FROM events WHERE job_id = ? AND json_extract(data, "
                f"'$.status') IN ({marks}) LIMIT 1",
                (job_id, *TERMINAL),
            ).fetchone()
            is not None
        )

    def has_terminal_event(self, job_id: str) -> bool:
        with self._tx() as con:
            return self._terminal_event(con, job_id)

    def list_events(self, job_id: str, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Oldest first, so a client can follow a job with `after` = the last id it saw."""
        with self._tx() as con:
            start = 0
            if after:
                anchor = con.execute("SELECT seq FROM events WHERE id = ?", (after,)).fetchone()
                start = anchor[0] if anchor else 0
            rows = con.execute(
                "SELECT * FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (job_id, start, limit + 1),
            ).fetchall()
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
            con.execute(
                "INSERT OR REPLACE INTO models VALUES (?, ?, ?, ?, ?)",
                (model_id, int(time.time()), backbone, path, job_id),
            )

    def get_model(self, model_id: str) -> dict | None:
        with self._tx() as con:
            return _row(con.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone())

    def list_models(self) -> list[dict]:
        """Newest first, each with its job's training file (id and name) and result: None
        where the job or the file is gone (a database rebuilt from the models' records)."""
        with self._tx() as con:
            return [
                _row(r)
                for r in con.execute(
                    "SELECT models.*, jobs.training_file, files.filename AS training_filename, "
                    "jobs.result FROM models LEFT JOIN jobs ON jobs.id = models.job_id "
                    "LEFT JOIN files ON files.id = jobs.training_file ORDER BY models.created DESC"
                )
            ]

    def delete_model(self, model_id: str) -> None:
        with self._tx() as con:
            con.execute("DELETE FROM models WHERE id = ?", (model_id,))


MODEL_RECORD = (
    "model.json"  # beside a side model's weights: its id, so a lost database can be rebuilt
)


def write_model_record(model_dir: Path, model_id: str, backbone: str, job_id: str) -> None:
    path = Path(model_dir) / MODEL_RECORD
    write_durably(
        path,
        json.dumps(
            {"id": model_id, "backbone": backbone, "job_id": job_id, "created": int(time.time())}
        ).encode(),
    )


def write_durably(path: Path, data: bytes) -> None:
    """Write a file and flush it to disk before anything records that it exists."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def open_database(home: Path) -> tuple[Database, str | None]:
    """The service's database. A damaged one is moved aside (never deleted) and a new one is
    rebuilt from what the home holds: every side model (its model.json) and every uploaded file.
    Job history cannot be rebuilt. Returns the database and where the damaged file went."""
    path = Path(home) / "ladder.db"
    try:
        db = Database(path)
        db.check()
        return db, None
    except sqlite3.DatabaseError as exc:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = path.with_name(f"ladder.db.damaged-{stamp}")
        log.error(
            "the database %s is damaged (%s); moving it to %s and rebuilding the models and "
            "files from %s (job history is lost)",
            path,
            exc,
            aside,
            home,
        )
        for suffix in ("", "-wal", "-shm"):
            source = Path(f"{path}{suffix}")
            if source.exists():
                source.replace(Path(f"{aside}{suffix}"))
    db = Database(path)
    _rebuild(db, Path(home))
    return db, str(aside)


def _add_columns(con, table: str, columns: dict[str, str]) -> None:
    """Columns a database made by an earlier version lacks."""
    have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns.items():
        if name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def _rebuild(db: Database, home: Path) -> None:
    for record in sorted((home / "models").glob(f"*/{MODEL_RECORD}")):
        try:
            model = json.loads(record.read_text())
            db.add_model(model["id"], model["backbone"], str(record.parent), model["job_id"])
        except (OSError, ValueError, KeyError) as exc:
            log.error("cannot restore the model in %s: %r", record.parent, exc)
    from backbone_worker.chat import GENERATION, scan_gen_file, task_of_file
    from backbone_worker.data import DataError, scan_file

    for upload in sorted((home / "files").glob("file-*")):
        try:
            generation = task_of_file(upload) == GENERATION
            summary = scan_gen_file(upload) if generation else scan_file(upload)
        except DataError:
            continue
        db.add_file(
            {
                "id": upload.stem,
                "filename": upload.name,
                "bytes": upload.stat().st_size,
                "created_at": int(upload.stat().st_mtime),
                "purpose": "fine-tune",
                "rows": summary.rows,
                "labels": summary.labels,
                "has_pair": summary.has_pair,
                "task": summary.task,
                "kind": summary.kind,
                "path": str(upload),
            }
        )
