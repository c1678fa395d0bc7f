"""A sweep as a service job, against a single run on the same upload.

The upload is the train and validation rows of the `--limit` sample of the data (never a row of
its test split). Through a real `ladder serve` process: one job with `learning_rate` a list and
`n_seeds`, one job at the family's default rate and one seed, same epochs; both share one store.
Both saved models are then scored through the live backbone on the data's whole test split.

    python -m bench.sweep_job --backbone smollm2 --limit 1500 --json bench/results/sweep_smollm2.json
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
from pathlib import Path

import httpx

from bench.compare import machine, script_parser
from bench.serve_many import start_server


def wait(base: str, job_id: str, timeout_s: float = 7200) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = httpx.get(f"{base}/v1/fine_tuning/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(2)
    raise TimeoutError(job_id)


def main() -> None:
    parser = script_parser(__doc__, limit=1500, epochs=3)
    parser.add_argument("--rates", default="3e-4,1e-3,3e-3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default="bench/results/sweep_job.json")
    args = parser.parse_args()
    from api.inference import JointModel, evaluate
    from backbone_worker.backbone import load_backbone
    from backbone_worker.data import load_dataset
    from side_trainer.artifacts import load_side_model

    data = load_dataset(args.data, limit=args.limit)
    rows = data.split("train") + data.split("validation")
    home = Path(tempfile.mkdtemp(prefix="ladder-sweep-job-"))
    upload = home / "upload.csv"
    with open(upload, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((e.text, e.label) for e in rows)
    rates = [float(x) for x in args.rates.split(",")]
    server, base = start_server(home, args.backbone, {})
    started = time.perf_counter()
    try:
        with open(upload, "rb") as handle:
            file_id = httpx.post(
                f"{base}/v1/files",
                data={"purpose": "fine-tune"},
                files={"file": (upload.name, handle)},
                timeout=120,
            ).json()["id"]
        jobs = {}
        for name, hp in (
            ("sweep", {"learning_rate": rates, "n_seeds": args.seeds}),
            ("single", {}),
        ):
            r = httpx.post(
                f"{base}/v1/fine_tuning/jobs",
                json={
                    "model": args.backbone,
                    "training_file": file_id,
                    "hyperparameters": {"n_epochs": args.epochs, **hp},
                },
                timeout=60,
            )
            r.raise_for_status()
            jobs[name] = r.json()["id"]
        done = {name: wait(base, job_id) for name, job_id in jobs.items()}
        seconds = time.perf_counter() - started
        for name, job in done.items():
            if job["status"] != "succeeded":
                raise RuntimeError(f"the {name} job ended {job['status']}: {job.get('error')}")
        events = httpx.get(
            f"{base}/v1/fine_tuning/jobs/{jobs['sweep']}/events",
            params={"limit": 1000},
            timeout=30,
        ).json()["data"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    sides = [load_side_model(home / "models" / jobs[name]) for name in ("sweep", "single")]
    examples = load_dataset(args.data).split("test")  # the whole data's, as `ladder evaluate`
    tested = evaluate(JointModel(load_backbone(args.backbone), sides), examples)
    report = {
        "backbone": args.backbone,
        "data": args.data,
        "limit": args.limit,
        "upload_rows": len(rows),
        "epochs": args.epochs,
        "machine": machine(),
        "seconds_both_jobs": round(seconds, 1),
        "n_test": tested["n"],
        "sweep": {
            "hyperparameters": done["sweep"]["hyperparameters"],
            "candidates": [
                {k: c[k] for k in ("lr", "seed", "best_val_accuracy", "best_epoch")}
                | {"val_curve": [h["val_accuracy"] for h in c["history"]]}
                for c in done["sweep"]["result"]["candidates"]
            ],
            "chosen": done["sweep"]["result"]["chosen"],
            "best_val_accuracy": done["sweep"]["result"]["best_val_accuracy"],
            "job_test_accuracy": done["sweep"]["result"]["test_accuracy"],
            "whole_test_accuracy": tested["accuracy"][0],
            # Epoch events that carry every candidate's latest epoch in their data.
            "epoch_events": sum(
                len(e["data"].get("candidates", [])) == len(done["sweep"]["result"]["candidates"])
                for e in events
            ),
        },
        "single": {
            "hyperparameters": done["single"]["hyperparameters"],
            "best_val_accuracy": done["single"]["result"]["best_val_accuracy"],
            "job_test_accuracy": done["single"]["result"]["test_accuracy"],
            "whole_test_accuracy": tested["accuracy"][1],
        },
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
