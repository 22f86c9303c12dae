"""MLflow, written by one process: the orchestrator (jobs never write the tracking store).

Experiment = study. One parent run per study (resolved config, search space, algorithm settings, code
version, budget; the best-so-far validation loss as a stepped metric), one child run per evaluation
(`mlflow.parentRunId`), carrying the decoded and encoded point, the training curve followed live from the
job's metrics.jsonl, the final metrics, the SLURM job id and node, FINISHED or FAILED with the reason, and
the adapter as an artifact. Explicit run ids everywhere (MlflowClient): no implicit "active run".
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Iterable

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CURVE_KEYS = {"loss": "train_loss", "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s"}
# result.json key -> final metric name (distinct from the stepped curve's names, which share no history)
FINAL_KEYS = {"val_loss": "val_loss", "val_loss_before": "val_loss_before", "train_loss": "train_loss_last_epoch",
              "tokens_per_s": "train_tokens_per_s", "train_s": "train_s", "eval_s": "eval_s", "setup_s": "setup_s",
              "total_s": "total_s", "trainable_params": "trainable_params", "steps": "steps", "n_train": "n_train",
              "n_val": "n_val"}


def code_version() -> dict:
    """git SHA (and whether the checkout had uncommitted changes) of the code that runs the study."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": "unknown", "git_dirty": "unknown"}
    return {"git_sha": sha or "unknown", "git_dirty": str(dirty)}


def _artifact_location(uri: str, study: str) -> str | None:
    """For the local SQLite default, artifacts live beside the database: mlruns/artifacts/<study>."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent.resolve() / "artifacts" / study).as_uri()
    return None


def _params(d: dict, prefix: str = "") -> list[Param]:
    text = lambda v: json.dumps(v) if isinstance(v, (dict, list)) else str(v)  # noqa: E731
    return [Param(prefix + k, text(v)[:6000]) for k, v in d.items()]


class Tracker:
    def __init__(self, uri: str, study: str):
        if uri.startswith("sqlite:///"):
            Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        exp = self.client.get_experiment_by_name(study)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(
            study, artifact_location=_artifact_location(uri, study))
        self.parent_id: str | None = None

    # ------------------------------------------------------------------------------------------- parent
    def start_parent(self, config: dict, space: dict, resume_run_id: str | None = None) -> str:
        if resume_run_id:
            self.parent_id = resume_run_id
            self.client.update_run(resume_run_id, status="RUNNING")
            self.client.set_tag(resume_run_id, "resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            return resume_run_id
        tags = {"study": config["study"], "algo": config["algo"], "role": "study", **code_version()}
        run = self.client.create_run(self.experiment_id, run_name=f"{config['study']}", tags=tags)
        self.parent_id = run.info.run_id
        flat = {"algo": config["algo"], "budget": config["budget"], "parallel": config["parallel"],
                "seed": config["seed"], "executor": config["executor"], "preset": config["preset"],
                "objective": config["objective"] or "finetune"}
        self.client.log_batch(self.parent_id, params=_params(flat) + _params(config["searcher_options"], "opt.")
                              + _params(config["trial"], "trial."))
        self.client.log_dict(self.parent_id, config, "study_config.json")
        self.client.log_dict(self.parent_id, space, "search_space.json")
        return self.parent_id

    def log_best(self, step: int, value: float, trial: int, point: dict) -> None:
        self.client.log_metric(self.parent_id, "best_val_loss", value, step=step)
        self.client.log_batch(self.parent_id, tags=[RunTag("best_trial", str(trial)),
                                                    RunTag("best_point", json.dumps(point))])

    def log_trial_value(self, step: int, value: float) -> None:
        self.client.log_metric(self.parent_id, "trial_val_loss", value, step=step)

    def end_parent(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.parent_id, status=status)

    def reconcile(self, trials: dict) -> None:
        """After a crash: finish child runs whose result the journal has but MLflow missed, and mark runs the
        journal never recorded (the crash came between creating the run and journaling it) as KILLED."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.parent_id}' "
                                       "and attributes.status = 'RUNNING'", max_results=10000)
        for run in runs:
            t = trials.get(int(run.data.tags.get("trial", -1)))
            if t is None or t.run_id != run.info.run_id:
                self.client.set_terminated(run.info.run_id, status="KILLED")
            elif t.status is not None:
                self.finish_child(t.run_id, t.status, t.value, t.summary, t.reason, t.out)

    # ------------------------------------------------------------------------------------------- children
    def start_child(self, trial: int, point: dict, encoded, algo: str) -> str:
        tags = {"mlflow.parentRunId": self.parent_id, "trial": str(trial), "algo": algo, "role": "trial"}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial:03d}", tags=tags)
        encoded_params = {"encoded": encoded}
        self.client.log_batch(run.info.run_id, params=_params(point) + _params(encoded_params))
        return run.info.run_id

    def tag(self, run_id: str, **tags) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])

    def last_curve_step(self, run_id: str) -> int:
        """Highest step of the live curve already logged (so a resumed study does not log it twice)."""
        history = self.client.get_metric_history(run_id, "train_loss")
        return max((m.step for m in history), default=0)

    def log_curve(self, run_id: str, records: Iterable[dict]) -> None:
        now = int(time.time() * 1000)
        metrics = []
        for r in records:
            ts = int(r.get("time", now / 1000) * 1000)
            if "val_loss" in r:
                metrics.append(Metric("val_loss_curve", r["val_loss"], ts, r["step"]))
            metrics += [Metric(name, float(r[key]), ts, r["step"]) for key, name in CURVE_KEYS.items() if key in r]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(run_id, metrics=metrics[i:i + 900])

    def finish_child(self, run_id: str, status: str, value: float | None, summary: dict, reason: str | None,
                     out: str | None) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(name, float(summary[k]), now, 0) for k, name in FINAL_KEYS.items()
                   if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)]
        if isinstance(summary.get("peak_memory_bytes"), (int, float)):
            metrics.append(Metric("peak_memory_gb", summary["peak_memory_bytes"] / 2**30, now, 0))
        tags = [RunTag("status", status)] + ([RunTag("failure_reason", reason[:5000])] if reason else [])
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        folder = Path(out) if out else None
        if folder and folder.is_dir():
            for name in ("result.json", "spec.json"):
                if (folder / name).exists():
                    self.client.log_artifact(run_id, str(folder / name))
            if status == "ok" and (folder / "adapter").is_dir():
                self.client.log_artifacts(run_id, str(folder / "adapter"), "adapter")
        self.client.set_terminated(run_id, status="FINISHED" if status == "ok" else "FAILED")


def register(client: MlflowClient, name: str, run_id: str, tags: dict) -> str:
    """Register the run's adapter artifact as a new version of `name`, alias it `champion`; returns the version."""
    try:
        client.create_registered_model(name, tags={"kind": "lora-adapter"})
    except MlflowException as e:
        if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
            raise
    source = client.get_run(run_id).info.artifact_uri.rstrip("/") + "/adapter"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()})
    client.set_registered_model_alias(name, "champion", version.version)
    return version.version
