"""What the service keeps on disk under LADDER_HOME, and how it is reclaimed.

- `files/`: uploads (api/uploads.py; `DELETE /v1/files/{id}` removes one no active job uses);
- `stores/<key>`: cached ladder states, shared by the jobs of one backbone, data and caching
  settings. A store is kept while a job that is active, or whose training file still exists,
  names it (`jobs.store`); `collect_garbage` removes the rest, at start and after a file or a
  model is deleted. Models never read a store, so deleting one frees nothing by itself;
- `models/<job>`: a job's trained side network. A job that fails or is cancelled leaves nothing
  there (`discard_checkpoint`).

Before caching, a job checks that the disk has room for its store (`check_space`): an estimate
from the upload's size and the caching settings, compression not counted (stores compress a
little, so the estimate errs on the safe side).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from cache_store.codecs import INT8_OUTLIERS
from cache_store.errors import FixableError

log = logging.getLogger(__name__)

# Bytes of text per token, at least, for the subword tokenizers Ladder's backbones use (English
# text averages about 4): the estimate's token count errs high.
BYTES_PER_TOKEN = 3
SPECIAL_TOKENS = 2  # a row's [CLS]/[SEP] or BOS/EOS


class InsufficientStorage(FixableError):
    """The disk lacks room for what a job would write."""


def min_free_bytes() -> int:
    """What the server keeps free for its database, logs and uploads (LADDER_MIN_FREE_MB, 100
    by default): /ready says 503 under it, and a store must fit above it."""
    return int(float(os.environ.get("LADDER_MIN_FREE_MB", 100)) * 2**20)


def store_estimate(
    n_rows: int,
    data_bytes: int,
    n_layers: int,
    width: int,
    dtype: str,
    max_length: int,
    full_width: int = 0,
) -> int:
    """Bytes a store of `n_rows` rows of `data_bytes` bytes of text would take, before
    compression: tokens (at most max_length a row) x stored states (`n_layers`: kept layers
    and embeddings) x stored width x the dtype's size, plus an int8 scale and outliers per state and the
    token ids; with `full_width`, a generative store's last state per token at that width and
    its target id."""
    tokens = min(n_rows * max_length, data_bytes // BYTES_PER_TOKEN + SPECIAL_TOKENS * n_rows)
    per_value = 1 if dtype == "int8" else 2
    # int8: a float32 scale per state and token, and an int16 channel and bf16 value per outlier
    scale = 4 + 4 * INT8_OUTLIERS if dtype == "int8" else 0
    per_token = n_layers * (width * per_value + scale) + 4
    if full_width:
        per_token += full_width * per_value + scale + 4
    return tokens * per_token + 8 * n_rows


def check_space(where: Path, needed: int) -> None:
    """Raise InsufficientStorage unless `where`'s disk has `needed` bytes beyond the reserve."""
    free = shutil.disk_usage(where).free
    reserve = min_free_bytes()
    if free - reserve < needed:
        raise InsufficientStorage(
            f"caching this job's states needs about {_mb(needed)} of disk and the server has "
            f"{_mb(max(free - reserve, 0))} free (beyond the {_mb(reserve)} it keeps); "
            f"delete files or models you no longer need, or cache fewer layers, a smaller "
            f"cache_width or cache_dtype int8"
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MB" if n >= 2**20 else f"{n / 1024:,.0f} KB"


def collect_garbage(home: Path, db) -> list[str]:
    """Remove the stores no job needs (see the module's docstring) and the model directories
    of jobs that ended without a model. Skips a store another process holds (one being
    written). Returns the names removed."""
    from api.db import ACTIVE
    from cache_store import StoreBusyError, StoreLock

    needed = db.needed_stores()
    removed = []
    stores = home / "stores"
    for store in sorted(stores.iterdir()) if stores.is_dir() else ():
        if store.name in needed or not store.is_dir():
            continue
        try:
            with StoreLock(str(store)).acquire(wait_s=0):
                if store.name in db.needed_stores():  # a job took it since the first look
                    continue
                shutil.rmtree(store, ignore_errors=True)
        except StoreBusyError:
            continue
        except FileNotFoundError:
            continue
        removed.append(store.name)
    models = home / "models"

    def registered() -> set[str]:
        return {os.path.realpath(m["path"]) for m in db.list_models()}

    kept = registered()
    for directory in sorted(models.iterdir()) if models.is_dir() else ():
        job = db.get_job(directory.name)
        running = job is not None and (
            job["status"] in ACTIVE or (job["status"] == "cancelled" and not job["finished_at"])
        )
        if os.path.realpath(directory) in kept or running:
            continue
        if not directory.is_dir() or os.path.realpath(directory) in registered():
            continue  # registered since the first look (a job that just succeeded)
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"models/{directory.name}")
    if removed:
        log.info("removed what no file, job or model needs: %s", ", ".join(removed))
    return removed


def discard_checkpoint(home: Path, job_id: str) -> None:
    """A job that will not finish keeps no checkpoint or partial model."""
    shutil.rmtree(Path(home) / "models" / job_id, ignore_errors=True)
