"""MLflow, written by one object: every write of the orchestrator (study, evaluate, confirm, register, compare)
goes through a Tracker's methods; nobody else speaks MLflow's operations (jobs never write the store).

    tracker = Tracker(uri, "tiny-nomad", study_folder / "mlflow-outbox.jsonl", uid, log=print)
    tracker.start_parent(config, space)                  # the study's parent run
    tracker.start_child(3, point, encoded, "nomad")      # one child run per trial
    tracker.finish_child(3, result_status, value, summary, reason, out)
    tracker.register("tiny-nomad-adapter", trial_key(3), tags)        # models:/NAME@champion
    tracker.close(wait_s=600)

Experiment = study. One parent run per study (resolved config, search space, algorithm settings, code version,
budget; the best-so-far validation loss as a stepped metric), one child run per evaluation
(`mlflow.parentRunId`), carrying the decoded and encoded point, the training curve followed live from the job's
metrics.jsonl, the final metrics (jobs/contract.py's table: one name per metric), the job id and node, FINISHED
or FAILED with the reason, and the adapter as an artifact. Runs are named by keys ("parent", "trial:3",
"confirm"), never by an implicit "active run". Commands open runs of their own (`confirm`) with `run()`, which
ends them FINISHED, FAILED or KILLED on every path out.

Every write goes through a durable outbox (orchestrator/tracking/outbox.py): the caller only queues, a
background thread writes, and an outage delays the writes without losing or repeating any. Metric names MLflow
would refuse (e.g. `dev.mmlu@5` from an --objective) are written in MLflow's charset, and the run's tag
`lora_hpo.metric_names` records the original names. `reconcile()` (on --resume) makes the store agree with the
journal again whatever happened to it (deleted, restored from an older backup).
"""
from __future__ import annotations

import contextlib
import json
import posixpath
import re
import subprocess
import time
from pathlib import Path
from typing import Iterable

from jobs.contract import ADAPTER_DIR, CURVE, OK, RESULT_FILE, SPEC_FILE, TAGS, mlflow_metrics
from orchestrator.tracking.outbox import Outbox

RUN_STATUS = {"ok": "FINISHED", "failed": "FAILED", "pruned": "KILLED", "infeasible": "KILLED"}
PARENT = "parent"
NAMES_TAG = "lora_hpo.metric_names"


def trial_key(trial: int) -> str:
    return f"trial:{trial}"


def code_version() -> dict:
    """git SHA (and whether the checkout had uncommitted changes) of the code that runs the study."""
    root = Path(__file__).resolve().parents[2]
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


def metric_name(name: str) -> str:
    """`name` in MLflow's charset for metric names (alphanumerics, _ - . / and space; not a path that moves)."""
    safe = re.sub(r"[^\w.\- /]", "_", str(name))[:250] or "_"
    norm = posixpath.normpath(safe)
    if norm != safe or norm in (".", "..") or norm.startswith(("/", "..")):
        safe = safe.replace("/", "_").replace("..", "__")
    return safe


def _run_alive(client, run_id: str) -> bool:
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return getattr(run.info, "lifecycle_stage", "active") != "deleted"


def _version_of(client, name: str, run_id: str) -> bool:
    try:
        return bool(client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except Exception as e:  # noqa: BLE001
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _text(v) -> str:
    return (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000]


def _ms(seconds: float | None = None) -> int:
    return int((time.time() if seconds is None else seconds) * 1000)


class Tracker:
    def __init__(self, uri: str, experiment: str, outbox: str | Path, uid: str, log=print):
        self.uri, self.study = uri, experiment
        self.outbox = Outbox(outbox, uri, experiment, uid, artifact_location=artifact_location(uri, experiment),
                             log=log)
        self.outbox.start()
        self._renamed: dict[str, dict] = {}  # run key -> {MLflow name: original name}
        self._tagged: dict[str, int] = {}    # run key -> how many of those its tag holds already

    # ------------------------------------------------------------------------------------------- the queue
    def run_id(self, key: str) -> str | None:
        return self.outbox.run_id(key)

    def flush(self) -> None:
        self.outbox.flush()

    def close(self, wait_s: float = 0.0, idle_s: float | None = None) -> bool:
        return self.outbox.close(wait_s, idle_s)

    def wait(self, wait_s: float, idle_s: float | None = None) -> bool:
        """Wait until every queued write is done (True), or `wait_s` passed or none succeeded for `idle_s`."""
        return self.outbox.wait(wait_s, idle_s)

    @property
    def pending(self) -> int:
        return self.outbox.pending

    def status(self) -> str | None:
        """A short line while MLflow is unreachable, else None."""
        return self.outbox.status()

    def result_of(self, seq: int):
        return self.outbox.result(seq)

    # ------------------------------------------------------------------------------------------- any run
    def open_run(self, key: str, name: str, tags: dict, parent: str | None = None, parent_id: str | None = None,
                 params: dict | None = None) -> None:
        """Create the run `key` once (a resumed command finds it); `parent`: a key, `parent_id`: a run id."""
        if self.outbox.has(f"create:{key}"):
            return
        self.outbox.put("create_run", mark=f"create:{key}", key=key, name=name, tags=tags, start_time=_ms(),
                        **({"parent": parent} if parent else {}), **({"parent_id": parent_id} if parent_id else {}))
        if params:
            items = list({k: _text(v) for k, v in params.items()}.items())
            for i in range(0, len(items), 90):  # MLflow takes at most 100 params per batch
                self.outbox.put("log_batch", key=key, params=dict(items[i:i + 90]))

    def end_run(self, key: str, status: str) -> None:
        self.outbox.put("set_status", key=key, status=status, end_time=_ms())

    def reopen_run(self, key: str, **tags) -> None:
        self.outbox.put("set_status", key=key, status="RUNNING")
        self.tag(key, **tags)

    @contextlib.contextmanager
    def run(self, key: str, name: str, tags: dict, **kw):
        """A command's own run, ended on every path: FINISHED, FAILED on an error, KILLED on Ctrl-C."""
        if self.outbox.has(f"create:{key}"):
            self.reopen_run(key, resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.open_run(key, name, tags, **kw)
        try:
            yield key
        except KeyboardInterrupt:
            self.end_run(key, "KILLED")
            raise
        except BaseException:
            self.end_run(key, "FAILED")
            raise
        self.end_run(key, "FINISHED")

    def tag(self, key: str, run_id: str | None = None, **tags) -> None:
        tags = {k: str(v)[:5000] for k, v in tags.items() if v is not None}
        if tags:
            self.outbox.put("log_batch", key=key, tags=tags, **({"run_id": run_id} if run_id else {}))

    def log_metrics(self, key: str, metrics: dict, step: int = 0, at: float | None = None,
                    run_id: str | None = None) -> None:
        rows = [[self._name(key, k), float(v), _ms(at), step] for k, v in metrics.items() if v is not None]
        self._tag_renamed(key, run_id)
        for i in range(0, len(rows), 900):  # MLflow takes at most 1000 metrics per batch
            self.outbox.put("log_batch", key=key, metrics=rows[i:i + 900], **({"run_id": run_id} if run_id else {}))

    def log_text(self, key: str, text: str, file: str, run_id: str | None = None) -> None:
        self.outbox.put("log_text", key=key, text=text, file=file, **({"run_id": run_id} if run_id else {}))

    def log_dict(self, key: str, data, file: str, run_id: str | None = None) -> None:
        self.log_text(key, json.dumps(data, indent=2, default=str), file, run_id)

    def log_artifacts_of(self, folder: str | Path, artifact_path: str, key: str = PARENT,
                         run_id: str | None = None) -> None:
        """The files of `folder` under `artifact_path` of the run `key` (or `run_id`; overwritten by a later
        call)."""
        self.outbox.put("log_artifacts", key=key, path=str(folder), artifact_path=artifact_path,
                        **({"run_id": run_id} if run_id else {}))

    def _name(self, key: str, name: str) -> str:
        safe = metric_name(name)
        if safe != name:
            self._renamed.setdefault(key, {})[safe] = name
        return safe

    def _tag_renamed(self, key: str, run_id: str | None = None) -> None:
        renamed = self._renamed.get(key, {})
        if len(renamed) > self._tagged.get(key, 0):
            self.tag(key, run_id=run_id, **{NAMES_TAG: json.dumps(renamed, sort_keys=True)})
            self._tagged[key] = len(renamed)

    # ------------------------------------------------------------------------------------------- the study
    def start_parent(self, config: dict, space: dict) -> None:
        if self.outbox.has(f"create:{PARENT}"):
            self.reopen_run(PARENT, resumed_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            return
        tags = {"study": config["study"], "algo": config["algo"], "role": "study", **code_version()}
        flat = {"algo": config["algo"], "budget": config["budget"], "parallel": config["parallel"],
                "seed": config["seed"], "executor": config["executor"], "preset": config["preset"],
                "objective": config["objective"] or "finetune"}
        params = {**flat, **{f"opt.{k}": v for k, v in (config.get("searcher_options") or {}).items()},
                  **{f"trial.{k}": v for k, v in (config.get("trial") or {}).items()}}
        self.open_run(PARENT, config["study"], tags, params=params)
        self.log_text(PARENT, json.dumps(config, indent=2, default=str), "study_config.json")
        self.log_text(PARENT, json.dumps(space, indent=2, default=str), "search_space.json")

    def log_best(self, step: int, value: float, trial: int, point: dict) -> None:
        self.outbox.put("log_batch", key=PARENT, metrics=[["best_val_loss", value, _ms(), step]],
                        tags={"best_trial": str(trial), "best_point": json.dumps(point)})

    def log_plots(self, folder: str | Path) -> None:
        self.log_artifacts_of(folder, "plots")

    def end_parent(self, status: str = "FINISHED") -> None:
        self.end_run(PARENT, status)

    def start_child(self, trial: int, point: dict, encoded, algo: str) -> None:
        self.open_run(trial_key(trial), f"trial-{trial:03d}", {"trial": str(trial), "algo": algo, "role": "trial"},
                      parent=PARENT, params={**point, "encoded": encoded})

    def log_curve(self, trial: int, records: Iterable[dict]) -> None:
        now = time.time()
        metrics = []
        for r in records:
            ts = _ms(r.get("time", now))
            metrics += [[name, float(r[key]), ts, r["step"]] for key, name in CURVE.items() if key in r]
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.outbox.put("log_batch", key=trial_key(trial), metrics=metrics[i:i + 900])

    def finish_child(self, trial: int, status: str, value: float | None, summary: dict, reason: str | None,
                     out: str | None) -> None:
        self.finish_run(trial_key(trial), status, value, summary, reason, out)

    def finish_run(self, key: str, status: str, value: float | None, summary: dict, reason: str | None,
                   out: str | None) -> None:
        """A trial-like run's end, once: its final metrics (jobs/contract.py's table), status and reason, its
        result, spec and adapter as artifacts, FINISHED / FAILED / KILLED."""
        if self.outbox.has(f"finish:{key}"):
            return
        final = mlflow_metrics(summary, value if status == OK else None)
        if status != OK:
            final.pop("val_loss", None)
        tags = {"status": status, **({"failure_reason": reason[:5000]} if reason else {}),
                **{k: summary[k] for k in TAGS if isinstance(summary.get(k), str)}}
        if "feasible" in summary:
            tags["feasible"] = str(bool(summary["feasible"])).lower()
        self.log_metrics(key, final)
        self.tag(key, **tags)
        folder = Path(out) if out else None
        if folder and folder.is_dir():
            for name in (RESULT_FILE, SPEC_FILE):
                if (folder / name).exists():
                    self.outbox.put("log_artifact", key=key, path=str(folder / name))
            if status == OK and (folder / ADAPTER_DIR).is_dir():
                self.outbox.put("log_artifacts", key=key, path=str(folder / ADAPTER_DIR), artifact_path=ADAPTER_DIR)
        self.outbox.put("set_status", mark=f"finish:{key}", key=key, status=RUN_STATUS[status], end_time=_ms())

    # ------------------------------------------------------------------------------------------- reconcile
    def reconcile(self, keys: list[str], registered: list[tuple[str, str]] = ()) -> dict:
        """Make the store agree with the journal again (on --resume, whatever happened to the store: deleted,
        recreated, restored from an older backup): the runs `keys` this outbox made that the store no longer
        has (or has deleted), and the registrations (name, run key) whose model version is gone, are forgotten,
        so that the caller's usual calls queue them again from the journal. Returns {"runs": [...], "registered":
        [...]} of what will be re-created; {"unchecked": reason} when the store could not be read (checked at the
        next resume; nothing is forgotten)."""
        known = {k: self.outbox.run_id(k) for k in keys if self.outbox.run_id(k)}
        try:
            client = self.outbox.client
            lost = [k for k, run_id in known.items() if not _run_alive(client, run_id)]
            gone = [(name, key) for name, key in registered if key not in lost and known.get(key)
                    and not _version_of(client, name, known[key])]
        except Exception as e:  # noqa: BLE001 - an unreachable store: the outbox retries its writes anyway
            return {"unchecked": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if lost or gone:
            self.outbox.forget(lost)
            self.outbox.forget_marks([f"register:{name}:{key}" for name, key in gone])
        return {"runs": lost, "registered": [name for name, _ in gone]}

    # ------------------------------------------------------------------------------------------- the registry
    def register(self, name: str, key: str, tags: dict, run_id: str | None = None, mark: str | None = None) -> int:
        """Queue the registration of the run `key`'s adapter (or the run `run_id`'s) as `name`@champion, once:
        a registration queued before is not queued again. Returns the write's sequence number, whose result is
        the model version (result_of)."""
        mark = mark or f"register:{name}:{key}"
        if self.outbox.has(mark):
            return self.outbox.seq_of(mark)
        return self.outbox.put("register", mark=mark, key=key, name=name, alias="champion",
                               artifact_path=ADAPTER_DIR, tags={k: str(v) for k, v in tags.items()},
                               **({"run_id": run_id} if run_id else {}))

    # ------------------------------------------------------------------------------------------- evaluations
    def log_scores(self, run_id: str, result: dict, tags: dict) -> None:
        """A downstream evaluation's scores into the trial's run (evaluation/tracking.py score_writes)."""
        from evaluation.tracking import score_writes
        metrics, all_tags, files = score_writes(result, tags)
        key = f"run:{run_id}"
        self.log_metrics(key, metrics, run_id=run_id)
        self.tag(key, run_id=run_id, **all_tags)
        for file, data in files.items():
            self.log_dict(key, data, file, run_id=run_id)

    def log_poster(self, parent_run_id: str, table: dict) -> None:
        """The poster's table into the study's parent run (eval/poster_table.md and .json, flat metrics)."""
        from evaluation.tracking import markdown, poster_metrics
        key = f"run:{parent_run_id}"
        self.log_metrics(key, poster_metrics(table), run_id=parent_run_id)
        self.log_text(key, markdown(table), "eval/poster_table.md", run_id=parent_run_id)
        self.log_dict(key, table, "eval/poster_table.json", run_id=parent_run_id)
