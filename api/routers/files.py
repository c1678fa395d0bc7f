"""Uploaded training files: validated on upload, stored under LADDER_HOME/files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from api.db import new_id
from api.disk import collect_garbage
from api.errors import APIError, http_message, require_id
from api.guard import max_classes, max_upload_bytes
from api.schemas import DeletedFile, FileList, FileObject
from api.state import Services, services
from api.uploads import staged

router = APIRouter(prefix="/v1/files")

MIN_ROWS = 10
UPLOAD_SUFFIXES = (".csv", ".jsonl", ".json")
# A file object lists at most this many of its labels, of at most this many characters together.
LABELS_SHOWN = 100
LABEL_CHARS_SHOWN = 10_000


@router.post("", response_model=FileObject)
def upload(
    file: UploadFile = File(...), purpose: str = Form(...), s: Services = Depends(services)
) -> FileObject:
    """Plain `def`: copying and validating a large file runs in a worker thread, off the event
    loop that answers every other request. The bytes go to a temporary name, are validated a
    row at a time (memory stays flat whatever the file's size), and take their final name only
    with their record (api/uploads.py: what a crash leaves is swept at the next start)."""
    from backbone_worker.chat import GENERATION, scan_gen_file, task_of_file
    from backbone_worker.data import DataError, TooManyLabels, scan_file

    if purpose != "fine-tune":
        raise APIError(
            400,
            "invalid_purpose",
            f"purpose {purpose!r} is not supported; use 'fine-tune'",
            "purpose",
        )
    name = Path(file.filename or "").name
    suffix = Path(name).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise APIError(
            400,
            "invalid_file",
            f"file {name!r} must be .csv or .jsonl: a classification file with columns text "
            f'and label (optional text_pair), or a JSONL file of chats ({{"messages": '
            f"[...]}}) or prompt/completion pairs",
            "file",
        )
    file_id = new_id("file")
    directory = s.home / "files"
    with staged(directory, file_id, suffix) as stage:
        size = _save(file.file, stage.handle)
        try:
            if task_of_file(stage.path) == GENERATION:
                summary = scan_gen_file(stage.path)
            else:
                summary = scan_file(stage.path, max_labels=max_classes())
            if summary.rows < MIN_ROWS:
                raise DataError(
                    f"the file has {summary.rows} rows; a fine-tuning file "
                    f"needs at least {MIN_ROWS}"
                )
        except DataError as exc:
            if isinstance(exc, TooManyLabels):
                message = (
                    f"the file has more than {exc.cap:,} distinct labels (data row {exc.row} "
                    f"brings one more); this server trains at most {exc.cap:,} classes "
                    f"(LADDER_MAX_CLASSES): check the label column, or merge rare classes"
                )
            else:
                message = http_message(exc).replace(str(stage.path), name)
            raise APIError(400, "invalid_file", message, "file") from None
        final = directory / f"{file_id}{suffix}"
        record = {
            "id": file_id,
            "filename": name,
            "bytes": size,
            "created_at": int(time.time()),
            "purpose": purpose,
            "rows": summary.rows,
            "labels": summary.labels,
            "has_pair": summary.has_pair,
            "task": summary.task,
            "kind": summary.kind,
            "path": str(final),
        }
        stage.keep(final)
        s.db.add_file(record)
    return file_object(record)


def file_object(record: dict) -> FileObject:
    shown, chars = [], 0
    for label in record["labels"][:LABELS_SHOWN]:
        chars += len(label)
        if chars > LABEL_CHARS_SHOWN:
            break
        shown.append(label)
    return FileObject(**{**record, "labels": shown, "n_labels": len(record["labels"])})


def _save(source, out) -> int:
    """Copy an upload into `out`, a MiB at a time, and flush it to disk (before the database
    records it, so a power cut cannot leave a record pointing at an empty file). Returns its
    size."""
    cap = max_upload_bytes()
    size = 0
    while chunk := source.read(1 << 20):
        size += len(chunk)
        if size > cap:
            raise APIError(
                413,
                "file_too_large",
                f"file is larger than {cap} bytes; split it or raise LADDER_MAX_UPLOAD_BYTES",
                "file",
            )
        out.write(chunk)
    out.flush()
    os.fsync(out.fileno())
    return size


@router.get("", response_model=FileList)
def list_files(
    after: str | None = Query(default=None, max_length=128),
    limit: int = Query(default=20, ge=1, le=100),
    s: Services = Depends(services),
) -> FileList:
    """Newest first, cursor paging as the jobs list: `after` is the last id of a page."""
    files, more = s.db.list_files(require_id(after, "after") if after else None, limit)
    return FileList(data=[file_object(f) for f in files], has_more=more)


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, s: Services = Depends(services)) -> FileObject:
    return file_object(file_record(s, require_id(file_id, "file_id"), "file_id"))


@router.delete("/{file_id}", response_model=DeletedFile)
def delete_file(file_id: str, s: Services = Depends(services)) -> DeletedFile:
    """Delete an upload, unless a queued or running job uses it (409), and then every store
    that only its jobs needed (api/disk.py). Finished jobs and their models stay."""
    record = file_record(s, require_id(file_id, "file_id"), "file_id")
    users = s.db.delete_file(file_id)
    if users:
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise APIError(
            409,
            "file_in_use",
            f"file {file_id} is used by queued or running job(s) {shown}; wait for them to "
            f"finish or cancel them, then delete it",
            "file_id",
        )
    Path(record["path"]).unlink(missing_ok=True)
    collect_garbage(s.home, s.db)
    return DeletedFile(id=file_id, deleted=True)


def file_record(s: Services, file_id: str, param: str, status: int = 404) -> dict:
    record = s.db.get_file(file_id)
    if record is None:
        raise APIError(
            status,
            "file_not_found",
            f"no file with id {file_id!r}; upload it with POST /v1/files",
            param,
        )
    return record
