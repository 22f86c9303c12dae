"""MLflow, written by one process: the orchestrator (jobs never write the tracking store).

Experiment = study. One parent run per study (resolved config, search space, algorithm settings, code
version, budget; the best-so-far validation loss as a stepped metric), one child run per evaluation
(`mlflow.parentRunId`), carrying the decoded and encoded point, the training curve followed live from the
job's metrics.jsonl, the final metrics, the job id and node, FINISHED or FAILED with the reason, and the
adapter as an artifact. Runs are named by keys ("parent", "trial:3"), never by an implicit "active run".

Every write goes through the study's durable outbox (orchestrator/tracking/outbox.py): the study loop only queues, a
background thread writes, and an outage of the tracking server delays the writes without losing or
repeating any. `Tracker.run_id(key)` gives a run's id once it exists.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Iterable

from jobs.contract import ADAPTER_DIR, RESULT_FILE, SPEC_FILE
from orchestrator.tracking.outbox import Outbox

CURVE_KEYS = {"loss": "train_loss", "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s"}
# result key -> final metric name (distinct from the stepped curve's names, which share no history)
FINAL_KEYS = {"val_loss": "val_loss", "val_loss_before": "val_loss_before", "train_loss": "train_loss_last_epoch",
              "tokens_per_s": "train_tokens_per_s", "train_s": "train_s", "eval_s": "eval_s", "setup_s": "setup_s",
              "total_s": "total_s", "trainable_params": "trainable_params", "steps": "steps", "n_train": "n_train",
              "n_val": "n_val", "pruned_fraction": "pruned_at_fraction", "pruned_val_loss": "val_loss_when_pruned"}
RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "pruned": "KILLED", "infeasible": "KILLED"}
PARENT = "parent"


def trial_key(trial: int) -> str:
    return f"trial:{trial}"


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


def artifact_location(uri: str, study: str) -> str | None:
    """For the local SQLite default, artifacts live beside the database: mlruns/artifacts/<study>."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent.resolve() / "artifacts" / study).as_uri()
    return None


def _text(v) -> str:
    return (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000]


def _ms(seconds: float | None = None) -> int:
    return int((time.time() if seconds is None else seconds) * 1000)


class Tracker:
    def __init__(self, uri: str, study: str, folder: str | Path, uid: str, log=print):
        self.uri, self.study = uri, study
        self.outbox = Outbox(Path(folder) / "mlflow-outbox.jsonl", uri, study, uid,
                             artifact_location=artifact_location(uri, study), log=log)
        self.outbox.start()

    def run_id(self, key: str) -> str | None:
        return self.outbox.run_id(key)

    def flush(self) -> None:
        self.outbox.flush()

    def close(self, wait_s: float = 0.0, idle_s: float | None = None) -> bool:
        return self.outbox.close(wait_s, idle_s)

    # ------------------------------------------------------------------------------------------- parent
    def start_parent(self, config: dict, space: dict) -> None:
        box = self.outbox
        if box.has("create:parent"):
            box.put("set_status", key=PARENT, status="RUNNING")
            box.put("log_batch", key=PARENT, tags={"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return
        tags = {"study": config["study"], "algo": config["algo"], "role": "study", **code_version()}
        box.put("create_run", mark="create:parent", key=PARENT, name=config["study"], tags=tags,
                start_time=_ms())
        flat = {"algo": config["algo"], "budget": config["budget"], "parallel": config["parallel"],
                "seed": config["seed"], "executor": config["executor"], "preset": config["preset"],
                "objective": config["objective"] or "finetune"}
        params = {**{k: _text(v) for k, v in flat.items()},
                  **{f"opt.{k}": _text(v) for k, v in config["searcher_options"].items()},
                  **{f"trial.{k}": _text(v) for k, v in config["trial"].items()}}
        items = list(params.items())
        for i in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
            box.put("log_batch", key=PARENT, params=dict(items[i:i + 90]))
        box.put("log_text", key=PARENT, text=json.dumps(config, indent=2, default=str), file="study_config.json")
        box.put("log_text", key=PARENT, text=json.dumps(space, indent=2, default=str), file="search_space.json")

    def log_best(self, step: int, value: float, trial: int, point: dict) -> None:
        self.outbox.put("log_batch", key=PARENT, metrics=[["best_val_loss", value, _ms(), step]],
                        tags={"best_trial": str(trial), "best_point": json.dumps(point)})

    def log_metrics(self, key: str, metrics: dict, step: int = 0, at: float | None = None) -> None:
        rows = [[k, float(v), _ms(at), step] for k, v in metrics.items() if v is not None]
        if rows:
            self.outbox.put("log_batch", key=key, metrics=rows)

    def tag(self, key: str, **tags) -> None:
        tags = {k: str(v)[:5000] for k, v in tags.items() if v is not None}
        if tags:
            self.outbox.put("log_batch", key=key, tags=tags)

    def log_plots(self, folder: str | Path) -> None:
        self.log_artifacts_of(folder, "plots")

    def log_artifacts_of(self, folder: str | Path, artifact_path: str) -> None:
        """The files of `folder` under `artifact_path` of the parent run (overwritten by a later call)."""
        self.outbox.put("log_artifacts", key=PARENT, path=str(folder), artifact_path=artifact_path)

    def end_parent(self, status: str = "FINISHED") -> None:
        self.outbox.put("set_status", key=PARENT, status=status, end_time=_ms())

    def register(self, name: str, trial: int, tags: dict) -> int:
        """Queue the registration of the trial's adapter as `name`@champion (once: a registration queued before
        is not queued again); returns the write's sequence number, whose result is the model version."""
        mark = f"register:{name}:{trial}"
        if self.outbox.has(mark):
            return self.outbox.seq_of(mark)
        return self.outbox.put("register", mark=mark, key=trial_key(trial), name=name,
                               alias="champion", artifact_path=ADAPTER_DIR,
                               tags={k: str(v) for k, v in tags.items()})

    # ------------------------------------------------------------------------------------------- children
    def start_child(self, trial: int, point: dict, encoded, algo: str) -> None:
        key = trial_key(trial)
        if self.outbox.has(f"create:{key}"):
            return  # a resumed study: the run exists (or its creation waits in the outbox)
        tags = {"trial": str(trial), "algo": algo, "role": "trial"}
        self.outbox.put("create_run", mark=f"create:{key}", key=key, parent=PARENT, name=f"trial-{trial:03d}",
                        tags=tags, start_time=_ms())
        self.outbox.put("log_batch", key=key, params={**{k: _text(v) for k, v in point.items()},
                                                      "encoded": _text(encoded)})

    def log_curve(self, trial: int, records: Iterable[dict]) -> None:
        now = time.time()
        metrics = []
        for r in records:
            ts = _ms(r.get("time", now))
            if "val_loss" in r:
                metrics.append(["val_loss_curve", float(r["val_loss"]), ts, r["step"]])
            metrics += [[name, float(r[key]), ts, r["step"]] for key, name in CURVE_KEYS.items() if key in r]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.outbox.put("log_batch", key=trial_key(trial), metrics=metrics[i:i + 900])

    def finish_child(self, trial: int, status: str, value: float | None, summary: dict, reason: str | None,
                     out: str | None) -> None:
        key, now = trial_key(trial), _ms()
        if self.outbox.has(f"finish:{key}"):
            return
        metrics = [[name, float(summary[k]), now, 0] for k, name in FINAL_KEYS.items()
                   if isinstance(summary.get(k), (int, float)) and not isinstance(summary.get(k), bool)]
        tags = {"status": status, **({"failure_reason": reason[:5000]} if reason else {})}
        if status == "ok" and value is not None and not any(m[0] == "val_loss" for m in metrics):
            metrics.append(["val_loss", float(value), now, 0])
        if isinstance(summary.get("peak_memory_bytes"), (int, float)):
            metrics.append(["peak_memory_gb", summary["peak_memory_bytes"] / 2**30, now, 0])
        # the held-out objective and its dev scores; constraint values (c <= 0: satisfied)
        metrics += [[k.replace("c.", "constraint.", 1) if k.startswith("c.") else k, float(v), now, 0]
                    for k, v in summary.items() if (k.startswith(("dev.", "c.")) or k in ("heldout", "dev_accuracy"))
                    and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if "feasible" in summary:
            tags["feasible"] = str(bool(summary["feasible"])).lower()
        self.outbox.put("log_batch", key=key, metrics=metrics, tags=tags)
        folder = Path(out) if out else None
        if folder and folder.is_dir():
            for name in (RESULT_FILE, SPEC_FILE):
                if (folder / name).exists():
                    self.outbox.put("log_artifact", key=key, path=str(folder / name))
            if status == "ok" and (folder / ADAPTER_DIR).is_dir():
                self.outbox.put("log_artifacts", key=key, path=str(folder / ADAPTER_DIR), artifact_path=ADAPTER_DIR)
        self.outbox.put("set_status", mark=f"finish:{key}", key=key, status=RUN_STATUS[status], end_time=now)


def load_study(folder: str | Path):
    """A study's state from its journal, with the MLflow run ids its outbox created (parent and trials)."""
    from orchestrator.study.journal import Journal
    from orchestrator.tracking.outbox import run_ids

    folder = Path(folder)
    state = Journal(folder / "journal.jsonl").load()
    ids = run_ids(folder / "mlflow-outbox.jsonl")
    state.parent_run_id = ids.get(PARENT, state.parent_run_id)
    for t in state.trials.values():
        t.run_id = ids.get(trial_key(t.trial), t.run_id)
    return state
