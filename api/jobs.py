"""Fine-tuning jobs: cache (reusing a store built for the same fingerprint), train, evaluate.

A job runs as a Ray task when the service runs with Ray (the default: a local Ray, or the cluster
at RAY_ADDRESS), or in a worker thread of the API process (LADDER_EXECUTOR=thread). Either way it
reports through the SQLite database, so the API only reads state. A job survives an API restart:
`JobRunner.recover()` submits every job that was not finished again, and the run resumes from the
store's committed parts and the trainer's last epoch checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import socket
import threading
from functools import partial
from pathlib import Path

from api import hyperparameters
from api.db import ACTIVE, Database, write_model_record
from api.disk import InsufficientStorage, check_space, discard_checkpoint, store_estimate
from backbone_worker.chat import GENERATION
from backbone_worker.options import CacheOptions
from cache_store.progress import reporting

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job interrupted this many times (e.g. restarts mid-run) is failed
# What a job's result keeps of its training's figures, whatever the task.
TRAINING_FIGURES = (
    "n_train",
    "epochs_run",
    "best_epoch",
    "selection",
    "trainable_params",
    "trainable_pct",
    "train_peak_mem_mb",
    "train_examples_per_s",
)
CHECK_S = 0.5  # a running job reads its status (has it been cancelled?) at most this often


class JobCancelled(Exception):
    pass


def model_id(job: dict) -> str:
    """`ft:{backbone}:{suffix}:{job}`, a valid id whatever names the backbone (a hub id, a
    local directory): see `id_name`."""
    from backbone_worker.backbone import id_name

    return f"ft:{id_name(job['model'])}:{job.get('suffix') or 'side'}:{job['id'][-8:]}"


def store_key(
    backbone: str, backbone_fingerprint: str, data_fingerprint: str, cache: CacheOptions
) -> str:
    """Stores are shared between jobs with the same backbone, data and caching settings. The
    backbone's name is part of the key as its files are: a store records the name its models
    load the backbone by, so an alias and a directory of the same files keep a store each."""
    key = json.dumps(
        [
            backbone,
            backbone_fingerprint,
            data_fingerprint,
            cache.layers,
            cache.dtype,
            cache.max_length,
            cache.width,
            cache.projection,
        ]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def run_job(home: str, job_id: str) -> None:
    """The whole job; safe to run again after an interruption (every step resumes)."""
    home_path = Path(home)
    db = Database(home_path / "ladder.db")
    job = db.get_job(job_id)
    if job is None:
        return
    if job["status"] not in ACTIVE:
        db.finish_cancelled(job_id)  # cancelled before it started: it has stopped
        return
    attempt = job["attempts"] + 1
    db.update_job(job_id, attempts=attempt)
    # Where the job runs (a worker container's host name under docker compose): the first event
    # of every attempt, so a resumed job says where and how many times it ran.
    host = socket.gethostname()
    db.add_event(
        job_id,
        f"running on {host}" if attempt == 1 else f"resumed on {host} (attempt {attempt})",
        data={"host": host, "attempt": attempt},
    )

    def check_cancelled() -> None:
        if db.get_job(job_id)["status"] == "cancelled":
            raise JobCancelled

    def on_progress(phase: str, stage: str, done: int, total: int, eta_s: float | None) -> None:
        """Every long loop's counts (the terminal's bars) as events, every 2 s at most."""
        left = f", about {_duration(eta_s)} left" if eta_s is not None and done < total else ""
        db.add_event(
            job_id,
            f"{stage}: {done}/{total}{left}",
            data={
                "step": phase,
                "stage": stage,
                "done": done,
                "total": total,
                "eta_s": None if eta_s is None else round(eta_s, 1),
            },
        )

    training = db.get_file(job["training_file"])
    try:
        # Every loop checks for a cancel between its batches, reading the job's row at most
        # every CHECK_S seconds (cache_store.progress): a cancel stops the job within about that.
        with reporting(on_progress, stop=check_cancelled, check_s=CHECK_S):
            _run(home_path, db, job, training, check_cancelled)
    except JobCancelled:
        log.info("job %s stopped: it was cancelled", job_id)
        discard_checkpoint(home_path, job_id)
    except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason
        discard_checkpoint(home_path, job_id)
        import re

        code, message, param = _error(exc)
        if code not in ("invalid_training_data", "invalid_hyperparameters"):
            log.exception("job %s failed", job_id)
        # The client knows its uploads by name, and server paths are not its business.
        validation = db.get_file(job["validation_file"]) if job["validation_file"] else None
        for upload in filter(None, (training, validation)):
            message = message.replace(upload["path"], upload["filename"])
        message = re.sub(
            re.escape(str(home_path)) + r"[^\s;,'\"()]*", "(a path on the server)", message
        )
        error = {"code": code, "message": message, "param": param}
        if db.update_job(job_id, only_if_active=True, status="failed", error=error):
            db.add_event(job_id, f"failed: {message}", level="error", data={"status": "failed"})
    finally:
        # However the run ended, a cancelled job has now stopped: it leaves the cap's count,
        # and its stream ends with "cancelled".
        db.finish_cancelled(job_id)


def resolved_hyperparameters(model: str, hp: dict, n_rows: int) -> dict:
    """A job's hyperparameters with every "auto" replaced, for this backbone and an upload of
    `n_rows` rows (what the job will run with, and what the console shows before it is created)."""
    from backbone_worker.backbone import backbone_config

    config, family = backbone_config(model)
    return hyperparameters.resolve(
        hp,
        n_rows,
        family.name,
        family.default_layers(config),
        family.hidden_size(config),
        partial(family.default_side_heads, config),
    )


def check_room(home_path: Path, model: str, hp: dict, training: dict, store: str | None = None):
    """Raise api.disk.InsufficientStorage unless the disk has room for the store of a job on
    `model` with resolved hyperparameters `hp` and the upload `training` (nothing to check
    when that store is already complete). `store`: its path, where the caller knows it."""
    if store is None:
        from backbone_worker.backbone import fingerprint_dir, resolve
        from backbone_worker.data import data_fingerprint

        cache_opts, _ = hyperparameters.options(hp)
        data = data_fingerprint(training["path"], **_columns(training))
        key = store_key(model, fingerprint_dir(resolve(model)), data, cache_opts)
        store = str(home_path / "stores" / key)
    if not _store_complete(store):
        check_space(home_path, job_store_estimate(model, hp, training))


def job_store_estimate(model: str, hp: dict, training: dict) -> int:
    """Bytes the store of a job on `model` with resolved hyperparameters `hp` and the upload
    `training` would take (api/disk.py's estimate)."""
    from backbone_worker.backbone import backbone_config
    from backbone_worker.options import stored_width

    config, family = backbone_config(model)
    d = family.hidden_size(config)
    cache_opts, _ = hyperparameters.options(hp)
    layers = cache_opts.layers
    n_layers = family.layer_count(config) if layers == "all" else len(layers)
    return store_estimate(
        training["rows"],
        training["bytes"],
        n_layers + 1,  # and the embeddings
        stored_width(cache_opts.width, d) or d,
        cache_opts.dtype,
        cache_opts.max_length,
        # A generative store also keeps each token's last state at full width, and a target.
        full_width=d if training.get("task") == GENERATION else 0,
    )


def _store_complete(store: str) -> bool:
    from cache_store import ActivationStore, StoreError

    if not Path(store).exists():
        return False
    try:
        opened = ActivationStore.open(store)
        return len(opened.committed_parts()) == len(opened.plan)
    except (StoreError, OSError, ValueError):
        return False


def _run(home_path: Path, db: Database, job: dict, training: dict, check_cancelled) -> None:
    import torch

    from api.inference import JointModel, evaluate, test_report
    from backbone_worker.backbone import fingerprint_dir, load_backbone, resolve
    from backbone_worker.chat import load_gen_dataset
    from backbone_worker.data import load_dataset
    from cache_store import CorruptPartError
    from side_trainer.artifacts import load_side_model
    from side_trainer.train import train

    job_id = job["id"]

    def set_status(status: str, message: str) -> None:
        check_cancelled()
        db.update_job(job_id, only_if_active=True, status=status)
        db.add_event(job_id, message, data={"status": status})

    set_status("validating_files", f"validating {training['filename']}")
    generation = training.get("task") == GENERATION
    if generation:
        dataset = load_gen_dataset(training["path"])
    else:
        dataset = load_dataset(training["path"], **_columns(training))
    backbone_dir = resolve(job["model"])
    hp = resolved_hyperparameters(job["model"], job["hyperparameters"], len(dataset.examples))
    db.update_job(job_id, hyperparameters=hp)
    cache_opts, opts = hyperparameters.options(
        hp, wait_s=5, seed=job["seed"] or 0, device="cuda" if torch.cuda.is_available() else "cpu"
    )
    key = store_key(job["model"], fingerprint_dir(backbone_dir), dataset.fingerprint, cache_opts)
    store = str(home_path / "stores" / key)
    db.update_job(job_id, store=key)  # from now on the store is this job's too (api/disk.py)
    check_room(home_path, job["model"], hp, training, store)
    set_status("caching", f"caching ladder states of {len(dataset.examples)} examples")
    _cache(db, job, dataset, store, cache_opts, check_cancelled)
    set_status("training", "training the side network from the store")
    out_dir = home_path / "models" / job_id

    def on_epoch(record: dict) -> None:
        check_cancelled()
        if "valid_loss" in record:  # a generative network: OpenAI's metric names
            db.add_event(job_id, _generation_epoch(record), data={"step": "training", **record})
            return
        of = (
            f" (the best so far of {len(record['candidates'])} configurations)"
            if "candidates" in record
            else ""
        )
        loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        retry = f"retry {record['attempt']}, " if "attempt" in record else ""
        f1 = f", macro-F1 {record['val_macro_f1']:.4f}" if record.get("val_macro_f1") else ""
        db.add_event(
            job_id,
            f"{retry}epoch {record['epoch']}: train loss {loss}, "
            f"validation accuracy {record['val_accuracy']}{f1}{of}",
            data={"step": "training", **record},
        )

    sampler = writer = None
    if generation:  # its epochs' sample generations, and its test split, need the backbone
        from side_trainer.gen_eval import sampler_for

        writer = load_backbone(job["model"])
        sampler = sampler_for(writer, dataset.split("validation"))
    try:
        result = train(store, out_dir, opts, on_epoch=on_epoch, sampler=sampler)
    except CorruptPartError as exc:
        # The service's own cached states are damaged, not the user's data: recompute the
        # damaged parts once, then train on (from the last epoch's checkpoint).
        log.error("job %s: %s", job_id, exc)
        db.add_event(
            job_id,
            f"part {exc.part} of the cached states was damaged; recomputing it",
            level="warning",
            data={"step": "caching", "repair": exc.part},
        )
        _cache(db, job, dataset, store, cache_opts, check_cancelled, repair=True)
        try:
            result = train(store, out_dir, opts, on_epoch=on_epoch, sampler=sampler)
        except CorruptPartError as again:
            raise StoreDamaged() from again
    check_cancelled()
    for attempt in result["attempts"] or []:
        if attempt["collapsed"]:
            db.add_event(
                job_id,
                f"the model at learning rate {attempt['lr']:.3g}, seed {attempt['seed']} was no "
                f"better than the majority class ({attempt['collapsed']})",
                level="warning",
                data={"step": "training", "attempt": attempt},
            )
    if result["warning"]:
        db.add_event(
            job_id,
            result["warning"]["message"],
            level="warning",
            data={"step": "training", "warning": result["warning"]},
        )
    db.add_event(job_id, "evaluating on the held-out test split", data={"step": "evaluating"})
    if generation:
        metrics = _generation_metrics(job, dataset, result, out_dir, writer)
        _finish(db, job, out_dir, metrics, check_cancelled)
        return
    joint = JointModel(load_backbone(job["model"]), [load_side_model(out_dir)])
    metrics = {k: result[k] for k in (*TRAINING_FIGURES, "best_val_accuracy")}
    if "candidates" in result:  # a sweep: every configuration's curve, and which was kept
        metrics.update({k: result[k] for k in ("sweep", "chosen", "candidates")})
    # What accuracy alone hides: macro-F1, per class, the confusion matrix, the majority rate.
    metrics["validation"] = result["validation"]
    metrics["warning"], metrics["attempts"] = result["warning"], result["attempts"]
    test = test_report(joint, dataset)
    if test is None:
        db.add_event(
            job_id,
            f"the file's {len(dataset.examples)} rows leave its test split empty: no test "
            f"figures (a tenth of the rows, about, are test rows)",
            level="warning",
            data={"step": "evaluating"},
        )
    metrics["test"] = test
    metrics["test_accuracy"] = test and test["accuracy"]
    metrics["test_macro_f1"] = test and test["macro_f1"]
    if job["validation_file"]:
        validation = db.get_file(job["validation_file"])
        examples = load_dataset(validation["path"], **_columns(validation)).examples
        split = evaluate(joint, examples)["reports"][0]
        metrics["validation_file"] = split
        metrics["validation_file_accuracy"] = split["accuracy"]
    _finish(db, job, out_dir, metrics, check_cancelled)


def _finish(db: Database, job: dict, out_dir: Path, metrics: dict, check_cancelled) -> None:
    """Succeeding and registering the model are one transaction that a cancel, arriving at any
    point before it, prevents; a cancelled job's model directory is removed."""
    write_model_record(out_dir, model_id(job), job["model"], job["id"])
    if not db.finish_job(job["id"], model_id(job), job["model"], str(out_dir), metrics):
        shutil.rmtree(out_dir, ignore_errors=True)
        check_cancelled()


def _generation_epoch(record: dict) -> str:
    """An epoch of a generative job, in words."""
    loss = "n/a" if record["train_loss"] is None else f"{record['train_loss']:.4f}"
    valid = record.get("valid_loss")
    shown = f", validation loss {valid:.4f}" if valid is not None else ""
    accuracy = record.get("valid_mean_token_accuracy")
    shown += f", token accuracy {accuracy:.4f}" if accuracy is not None else ""
    return f"epoch {record['epoch']}: train loss {loss}{shown}"


def _generation_metrics(job: dict, dataset, result: dict, out_dir: Path, backbone) -> dict:
    """A generative job's result: the training figures under OpenAI's names, the sample
    generations, and exact match and loss on the test split (greedy generations)."""
    from side_trainer.artifacts import load_side_model
    from side_trainer.gen_eval import generation_report
    from side_trainer.train import GENERATION_METRICS

    keys = (*TRAINING_FIGURES, "task", *GENERATION_METRICS, "samples")
    metrics = {k: result.get(k) for k in keys}
    metrics["warning"], metrics["attempts"] = None, None
    net = load_side_model(out_dir)
    rows = dataset.split("test")
    test = generation_report(backbone, net, rows, net.cfg.max_length) if rows else None
    metrics["test"] = test
    metrics["test_exact_match"] = test and test["exact_match"]
    metrics["test_loss"] = test and test["loss"]
    metrics["test_accuracy"] = metrics["test_macro_f1"] = None
    return metrics


def _cache(
    db: Database,
    job: dict,
    dataset,
    store: str,
    opts: CacheOptions,
    check_cancelled,
    repair: bool = False,
) -> None:
    """Fill the job's store (shared by jobs with the same backbone, data and settings). Waits,
    still cancellable, while another job writes the same store; with `repair`, first un-commits
    parts whose checksums fail so they are computed again."""
    from backbone_worker.cache import build_cache
    from cache_store import ActivationStore, StoreBusyError, StoreLock
    from cache_store.progress import check

    job_id = job["id"]

    def on_part(done: int, total: int) -> None:  # the caching bar reports the counts
        check_cancelled()

    waiting = False
    while True:
        try:
            if repair:
                with StoreLock(store).acquire(wait_s=5):
                    ActivationStore.open(store, writable=True).verify(repair=True)
                repair = False
            # Before every forward batch: the job's check, at most every CHECK_S (run_job).
            build_cache(job["model"], dataset, store, opts, on_part=on_part, check=check)
            return
        except StoreBusyError:
            check_cancelled()
            if not waiting:
                waiting = True
                db.add_event(
                    job_id,
                    "waiting for another job that is caching the same data",
                    data={"step": "caching"},
                )


class StoreDamaged(RuntimeError):
    """The service's cached states stay damaged after recomputing them: a server fault."""

    def __init__(self):
        super().__init__(
            "the server's cached states of this data are damaged and recomputing "
            "them did not help; this is a fault of the server, see its log"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _columns(file_record: dict) -> dict:
    return {"text_pair_column": "text_pair" if file_record.get("has_pair") else None}


def _error(exc: Exception) -> tuple[str, str, str | None]:
    """The failed job's error code, one-line message in the service's words, and the request
    field at fault. The client's to fix: its data, and its hyperparameters (an error naming
    one). Everything else (store_damaged, internal_error) is the server's: a job runs on a
    backbone and uploads the server checked, in stores the server keeps, so a store that does
    not match or cannot be read is no advice to the client."""
    from api.errors import http_field, http_message
    from backbone_worker.data import DataError
    from backbone_worker.options import OptionError

    message = http_message(exc).splitlines()[0] if str(exc) else repr(exc)
    if isinstance(exc, StoreDamaged):
        return "store_damaged", message, None
    if isinstance(exc, InsufficientStorage):
        return "insufficient_storage", message, None
    if isinstance(exc, DataError):
        return "invalid_training_data", message, None
    if field := http_field(exc):
        return "invalid_hyperparameters", message, field
    if isinstance(exc, OptionError) and exc.setting is None:  # e.g. a sweep too large
        return "invalid_hyperparameters", message, "hyperparameters"
    error = "the server hit an unexpected error while running the job; see its log"
    return "internal_error", error, None


class JobRunner:
    """Runs jobs in Ray tasks or in one worker thread (jobs then run one after another).

    One runner per LADDER_HOME runs jobs: the one holding the home's job lease. It resumes what
    was unfinished when it took the lease, and runs every queued job it finds in the database,
    whichever server created it. Another server on the same home serves requests without
    running jobs, and takes the lease over when its holder stops or dies."""

    POLL_S = 1.0

    def __init__(self, db: Database, home: Path, executor: str, lease_ttl_s: float = 30.0):
        from cache_store import StoreLock

        self.db = db
        self.home = home
        self.executor = executor
        self.refs: dict[str, object] = {}
        self.lease = StoreLock(str(home / "job-runner"), ttl_s=lease_ttl_s)
        self.leader = False
        self._submitted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Nothing here blocks a request: joining Ray (seconds) or running a job happen in threads.
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._work, name="ladder-jobs", daemon=True).start()
        threading.Thread(target=self._lead, name="ladder-job-lease", daemon=True).start()

    def _lead(self) -> None:
        from cache_store import StoreBusyError

        while not self._stop.is_set():
            if not self.leader:
                try:
                    self.lease.acquire(wait_s=0)
                except StoreBusyError:
                    self._stop.wait(self.lease.ttl_s / 3)
                    continue
                log.info("this server runs the jobs of %s", self.home)
                self.leader = True
                self.recover()
            for job in self.db.jobs_with_status(("queued",)):
                self._enqueue(job["id"])
            self._stop.wait(self.POLL_S)

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._submitted:
                return
            self._submitted.add(job_id)
        self.queue.put(job_id)

    def _work(self) -> None:
        if self.executor == "thread":
            while True:
                run_job(str(self.home), self.queue.get())
        import ray

        from backbone_worker.pool import init_ray

        # Ray workers start with their node's environment: hand them the service's own settings
        # (extra backbone aliases, offline flags) so a job sees what the API saw.
        env = {
            k: v
            for k, v in os.environ.items()
            if k.startswith(("LADDER_", "HF_", "TRANSFORMERS_")) and k != "LADDER_API_KEY"
        }
        # A job whose Ray worker or node dies (a worker container stopped, a node lost) is run
        # again by Ray, on whichever node has room, up to MAX_ATTEMPTS runs in all: every step
        # of run_job resumes. The watcher fails it with the reason once those are spent.
        task = ray.remote(max_retries=MAX_ATTEMPTS - 1, runtime_env={"env_vars": env})(run_job)
        threading.Thread(target=self._watch, name="ladder-job-watch", daemon=True).start()
        while True:
            job_id = self.queue.get()
            try:
                init_ray()
                # On a cluster with GPU workers the job (its backbone and its trainer) takes one.
                gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
                ref = task.options(num_cpus=1, num_gpus=gpus).remote(str(self.home), job_id)
                with self._lock:
                    self.refs[job_id] = ref
            except Exception as exc:  # noqa: BLE001 - the job fails with the reason
                error = {
                    "code": "executor_unavailable",
                    "param": None,
                    "message": f"could not start the job on Ray: {exc}",
                }
                self._fail(job_id, error)

    def _watch(self) -> None:
        """Forget the Ray tasks that ended; one that ended in an error of Ray's own (its worker or
        node died on every attempt) leaves its job failed with that reason, not running forever.
        run_job records its own failures, so a task that returns has left its job finished."""
        import ray

        while not self._stop.is_set():
            with self._lock:
                refs = dict(self.refs)
            if not refs:
                self._stop.wait(self.POLL_S)
                continue
            ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.POLL_S)
            for job_id, ref in refs.items():
                if ref not in ready:
                    continue
                with self._lock:
                    self.refs.pop(job_id, None)
                    self._submitted.discard(job_id)
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - Ray's reason becomes the job's
                    self._lost(job_id, exc)

    def _lost(self, job_id: str, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        log.error("job %s: its Ray task ended without finishing it: %r", job_id, exc)
        error = {
            "code": "worker_lost",
            "param": None,
            "message": f"the job's Ray task ended before the job finished ({type(exc).__name__}"
            f"{': ' + reason if reason else ''}); Ray runs a job again when its worker or node "
            f"dies, {MAX_ATTEMPTS} times in all: check the workers (`ray status`) and create "
            f"the job again",
        }
        self._fail(job_id, error)

    def _fail(self, job_id: str, error: dict) -> None:
        """An active job ends failed with `error`, its message the job's last event."""
        if self.db.update_job(job_id, only_if_active=True, status="failed", error=error):
            self.db.add_event(job_id, error["message"], level="error", data={"status": "failed"})

    def submit(self, job_id: str) -> None:
        """A job just created: the lease holder starts it (this server, or within POLL_S the
        server that holds the lease)."""
        if self.leader:
            self._enqueue(job_id)

    def cancel(self, job_id: str) -> None:
        """The database already says cancelled; the job stops within about a second (its next
        check between batches: run_job), and its run then sets its finished_at."""
        self.db.add_event(job_id, "cancellation requested", level="warning")

    def recover(self) -> None:
        """On taking the lease: resume unfinished jobs, or fail those interrupted too often;
        a job cancelled while it ran here before has stopped (its run ended with the server)."""
        for job in self.db.jobs_with_status(("cancelled",)):
            if job["finished_at"] is None:
                self.db.finish_cancelled(job["id"])
        for job in self.db.jobs_with_status(ACTIVE):
            if job["attempts"] >= MAX_ATTEMPTS:
                error = {
                    "code": "interrupted",
                    "param": None,
                    "message": f"the job was interrupted {job['attempts']} times",
                }
                self._fail(job["id"], error)
                continue
            if job["status"] != "queued":
                self.db.add_event(job["id"], "resuming after a service restart", level="warning")
            self._enqueue(job["id"])

    def stop(self) -> None:
        self._stop.set()
        if self.leader:
            self.lease.release()
            self.leader = False

    def delete_model_files(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
