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
import threading
import time
from pathlib import Path

from api.db import ACTIVE, Database

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3     # a job interrupted this many times (e.g. restarts mid-run) is failed


class JobCancelled(Exception):
    pass


def resolve_hyperparameters(hp: dict, n_rows: int, default_layers: list[int],
                            train_defaults: dict) -> dict:
    """Replace "auto" by defaults that suit the upload's size and the backbone
    (`train_defaults`: the family's entry of side_trainer.train.FAMILY_DEFAULTS)."""
    auto = {"n_epochs": 10 if n_rows < 1000 else 5 if n_rows < 10000 else 3,
            "batch_size": train_defaults["batch_size"], "learning_rate": train_defaults["lr"],
            "reduction_factor": 8, "kept_layers": default_layers,
            "init": "fisher", "cache_dtype": "fp16"}
    return {k: auto[k] if hp.get(k, "auto") == "auto" else hp[k] for k in auto}


def model_id(job: dict) -> str:
    return f"ft:{job['model']}:{job.get('suffix') or 'side'}:{job['id'][-8:]}"


def store_key(backbone_fingerprint: str, data_fingerprint: str, hp: dict) -> str:
    """Stores are shared between jobs with the same backbone, data and caching settings."""
    key = json.dumps([backbone_fingerprint, data_fingerprint, hp["kept_layers"],
                      hp["cache_dtype"], 128])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def run_job(home: str, job_id: str) -> None:
    """The whole job; safe to run again after an interruption (every step resumes)."""
    import torch
    from transformers import AutoConfig

    from api.inference import JointModel, evaluate
    from backbone_worker.backbone import fingerprint_dir, load_backbone, resolve
    from backbone_worker.cache import CacheOptions, build_cache
    from backbone_worker.data import load_dataset
    from backbone_worker.families import family_of
    from side_trainer.artifacts import load_side_model
    from side_trainer.train import FAMILY_DEFAULTS, TrainOptions, train

    home_path = Path(home)
    db = Database(home_path / "ladder.db")
    job = db.get_job(job_id)
    if job is None or job["status"] not in ACTIVE:
        return
    db.update_job(job_id, attempts=job["attempts"] + 1)

    def check_cancelled() -> None:
        if db.get_job(job_id)["status"] == "cancelled":
            raise JobCancelled

    def set_status(status: str, message: str) -> None:
        check_cancelled()
        db.update_job(job_id, only_if_active=True, status=status)
        db.add_event(job_id, message, data={"status": status})

    try:
        training = db.get_file(job["training_file"])
        set_status("validating_files", f"validating {training['filename']}")
        dataset = load_dataset(training["path"], **_columns(training))
        backbone_dir = resolve(job["model"])
        config = AutoConfig.from_pretrained(backbone_dir, local_files_only=True)
        family = family_of(config)
        hp = resolve_hyperparameters(job["hyperparameters"], len(dataset.examples),
                                     family.default_layers(config), FAMILY_DEFAULTS[family.name])
        db.update_job(job_id, hyperparameters=hp)
        store = str(home_path / "stores" / store_key(fingerprint_dir(backbone_dir),
                                                   dataset.fingerprint, hp))
        set_status("caching", f"caching ladder states of {len(dataset.examples)} examples")
        layers = hp["kept_layers"]
        last = [0.0]

        def on_part(done: int, total: int) -> None:
            check_cancelled()
            if time.time() - last[0] > 2 or done == total:
                last[0] = time.time()
                db.add_event(job_id, f"cached {done}/{total} examples",
                             data={"step": "caching", "done": done, "total": total})

        build_cache(job["model"], dataset, store, CacheOptions(layers=layers,
                    dtype=hp["cache_dtype"], wait_s=60), on_part=on_part)
        set_status("training", "training the side network from the store")
        out_dir = home_path / "models" / job_id

        def on_epoch(record: dict) -> None:
            check_cancelled()
            db.add_event(job_id, f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
                         f"validation accuracy {record['val_accuracy']}",
                         data={"step": "training", **record})

        result = train(store, out_dir, TrainOptions(
            reduction=hp["reduction_factor"], epochs=hp["n_epochs"], batch_size=hp["batch_size"],
            lr=hp["learning_rate"], init=hp["init"], seed=job["seed"] or 0,
            device="cuda" if torch.cuda.is_available() else "cpu"), on_epoch=on_epoch)
        check_cancelled()
        joint = JointModel(load_backbone(job["model"]), [load_side_model(out_dir)])
        metrics = {k: result[k] for k in ("n_train", "epochs_run", "best_val_accuracy",
                                          "best_epoch", "selection", "trainable_params",
                                          "trainable_pct", "train_peak_mem_mb",
                                          "train_examples_per_s")}
        metrics["test_accuracy"] = evaluate(joint, dataset.split("test"))["accuracy"][0]
        if job["validation_file"]:
            validation = db.get_file(job["validation_file"])
            examples = load_dataset(validation["path"], **_columns(validation)).examples
            metrics["validation_file_accuracy"] = evaluate(joint, examples)["accuracy"][0]
        name = model_id(job)
        db.add_model(name, job["model"], str(out_dir), job_id)
        if db.update_job(job_id, only_if_active=True, status="succeeded", fine_tuned_model=name,
                         result=metrics):
            db.add_event(job_id, f"succeeded: {name}", data={"status": "succeeded", **metrics})
    except JobCancelled:
        db.add_event(job_id, "cancelled", level="warning", data={"status": "cancelled"})
    except Exception as exc:  # noqa: BLE001 - any failure ends the job with its reason
        code = _error_code(exc)
        if code == "internal_error":
            log.exception("job %s failed", job_id)
        error = {"code": code, "message": str(exc).splitlines()[0] if str(exc) else repr(exc),
                 "param": None}
        if db.update_job(job_id, only_if_active=True, status="failed", error=error):
            db.add_event(job_id, f"failed: {error['message']}", level="error",
                         data={"status": "failed"})


def _columns(file_record: dict) -> dict:
    return {"text_pair_column": "text_pair" if file_record.get("has_pair") else None}


def _error_code(exc: Exception) -> str:
    from api.cli import user_errors
    return "invalid_training_data" if isinstance(exc, user_errors()) else "internal_error"


class JobRunner:
    """Submits jobs to Ray tasks or to one worker thread (jobs then run one after another)."""

    def __init__(self, db: Database, home: Path, executor: str):
        self.db = db
        self.home = home
        self.executor = executor
        self.refs: dict[str, object] = {}
        # submit() only queues: joining Ray (seconds) or running a job never blocks a request.
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._work, name="ladder-jobs", daemon=True).start()

    def _work(self) -> None:
        if self.executor == "thread":
            while True:
                run_job(str(self.home), self.queue.get())
        import ray

        from backbone_worker.pool import init_ray
        # Ray workers start with their node's environment: hand them the service's own settings
        # (extra backbone aliases, offline flags) so a job sees what the API saw.
        env = {k: v for k, v in os.environ.items()
               if k.startswith(("LADDER_", "HF_", "TRANSFORMERS_")) and k != "LADDER_API_KEY"}
        task = ray.remote(max_retries=0, runtime_env={"env_vars": env})(run_job)
        while True:
            job_id = self.queue.get()
            try:
                init_ray()
                # On a cluster with GPU workers the job (its backbone and its trainer) takes one.
                gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
                self.refs[job_id] = task.options(num_cpus=1, num_gpus=gpus).remote(
                    str(self.home), job_id)
            except Exception as exc:  # noqa: BLE001 - the job fails with the reason
                error = {"code": "executor_unavailable", "param": None,
                         "message": f"could not start the job on Ray: {exc}"}
                if self.db.update_job(job_id, only_if_active=True, status="failed", error=error):
                    self.db.add_event(job_id, error["message"], level="error")

    def submit(self, job_id: str) -> None:
        self.queue.put(job_id)

    def cancel(self, job_id: str) -> None:
        """The job stops at its next part or epoch; the database already says cancelled."""
        self.db.add_event(job_id, "cancellation requested", level="warning")

    def recover(self) -> None:
        """After a restart: resume unfinished jobs, or fail those interrupted too often."""
        for job in self.db.jobs_with_status(ACTIVE):
            if job["attempts"] >= MAX_ATTEMPTS:
                error = {"code": "interrupted", "param": None,
                         "message": f"the job was interrupted {job['attempts']} times"}
                self.db.update_job(job["id"], status="failed", error=error)
                self.db.add_event(job["id"], error["message"], level="error")
                continue
            self.db.add_event(job["id"], "resuming after a service restart", level="warning")
            self.submit(job["id"])

    def delete_model_files(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)
