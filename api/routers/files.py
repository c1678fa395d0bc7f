"""Uploaded training files: validated on upload, stored under LADDER_HOME/files."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile

from api.db import new_id
from api.errors import APIError, http_message, require_id
from api.guard import max_classes, max_upload_bytes
from api.schemas import FileList, FileObject
from api.state import Services, services

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
    loop that answers every other request."""
    from backbone_worker.data import DataError, has_column, load_dataset

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
            f"file {name!r} must be .csv or .jsonl with "
            f"columns text and label (optional text_pair)",
            "file",
        )
    file_id = new_id("file")
    path = s.home / "files" / f"{file_id}{suffix}"
    try:
        size = _save(file.file, path)
        has_pair = has_column(path, "text_pair")
        dataset = load_dataset(str(path), text_pair_column="text_pair" if has_pair else None)
        if len(dataset.examples) < MIN_ROWS:
            raise DataError(
                f"the file has {len(dataset.examples)} rows; a fine-tuning file "
                f"needs at least {MIN_ROWS}"
            )
        if len(dataset.labels) > max_classes():
            raise DataError(
                f"the file has {len(dataset.labels):,} distinct labels; this server trains "
                f"at most {max_classes():,} classes (LADDER_MAX_CLASSES): check the label "
                f"column, or merge rare classes"
            )
        record = {
            "id": file_id,
            "filename": name,
            "bytes": size,
            "created_at": int(time.time()),
            "purpose": purpose,
            "rows": len(dataset.examples),
            "labels": dataset.labels,
            "has_pair": has_pair,
            "path": str(path),
        }
        s.db.add_file(record)
    except BaseException as exc:
        path.unlink(missing_ok=True)  # nothing is kept of an upload that was not recorded
        if isinstance(exc, DataError):
            message = http_message(exc).replace(str(path), name)
            raise APIError(400, "invalid_file", message, "file") from None
        raise
    return file_object(record)


def file_object(record: dict) -> FileObject:
    shown, chars = [], 0
    for label in record["labels"][:LABELS_SHOWN]:
        chars += len(label)
        if chars > LABEL_CHARS_SHOWN:
            break
        shown.append(label)
    return FileObject(**{**record, "labels": shown, "n_labels": len(record["labels"])})


def _save(source, path: Path) -> int:
    """Copy an upload to its place and flush it to disk (before the database records it, so a
    power cut cannot leave a record pointing at an empty file). Returns its size."""
    cap = max_upload_bytes()
    size = 0
    with open(path, "wb") as out:
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
