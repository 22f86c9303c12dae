"""Test doubles for the unit tier, named as such: an in-memory stand-in for MLflow's tracking client.

    with fake_mlflow(monkeypatch) as store:      # every tracking_store.client(uri) is this store's client
        ... run a study (executor debug) ...
        store.runs["<run id>"].metrics["val_loss"]

The real MlflowClient against a real store is what the integration tests use; this fake answers only the calls
the orchestrator's outbox makes (orchestrator/tracking/outbox.py), keeps everything in memory and validates
metric names the way MLflow does, so that the unit tier runs studies without a database on disk.
"""
from __future__ import annotations

import contextlib
import itertools
import re
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace


class FakeMlflowError(Exception):
    def __init__(self, message: str, error_code: str = "INVALID_PARAMETER_VALUE"):
        super().__init__(message)
        self.error_code = error_code


@dataclass
class FakeRun:
    run_id: str
    experiment_id: str
    name: str | None
    tags: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)       # name -> last value
    history: dict = field(default_factory=dict)       # name -> [(step, value)]
    artifacts: dict = field(default_factory=dict)     # path -> text or source path
    status: str = "RUNNING"

    @property
    def info(self):
        return SimpleNamespace(run_id=self.run_id, experiment_id=self.experiment_id, status=self.status,
                               artifact_uri=f"fake://{self.run_id}/artifacts")

    @property
    def data(self):
        return SimpleNamespace(tags=dict(self.tags), params=dict(self.params), metrics=dict(self.metrics))


class FakeStore:
    """One in-memory MLflow store (experiments, runs, registered models), shared by every fake client."""

    def __init__(self):
        self.lock = threading.Lock()
        self.experiments: dict[str, str] = {}      # name -> id
        self.runs: dict[str, FakeRun] = {}
        self.models: dict[str, dict] = {}          # name -> {"versions": {n: {...}}, "aliases": {alias: n}}
        self.ids = itertools.count(1)
        self.calls = 0

    def client(self, uri=None) -> "FakeClient":
        return FakeClient(self)


class FakeClient:
    def __init__(self, store: FakeStore):
        self.s = store

    # experiments
    def get_experiment_by_name(self, name):
        exp = self.s.experiments.get(name)
        return SimpleNamespace(experiment_id=exp) if exp else None

    def create_experiment(self, name, artifact_location=None):
        with self.s.lock:
            self.s.experiments[name] = str(next(self.s.ids))
            return self.s.experiments[name]

    # runs
    def create_run(self, experiment_id, run_name=None, tags=None, start_time=None):
        with self.s.lock:
            run = FakeRun(f"run{next(self.s.ids)}", experiment_id, run_name, dict(tags or {}))
            self.s.runs[run.run_id] = run
            return run

    def get_run(self, run_id):
        if run_id not in self.s.runs:
            raise FakeMlflowError(f"Run '{run_id}' not found", "RESOURCE_DOES_NOT_EXIST")
        return self.s.runs[run_id]

    def search_runs(self, experiment_ids, filter_string="", max_results=1000):
        match = re.fullmatch(r"tags\.`?([\w.]+)`? = '(.*)'", filter_string.strip())
        runs = [r for r in self.s.runs.values() if r.experiment_id in experiment_ids]
        if match:
            runs = [r for r in runs if r.tags.get(match.group(1)) == match.group(2)]
        return runs[:max_results]

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        run = self.get_run(run_id)
        for m in metrics:
            if not re.fullmatch(r"[/\w.\- :]*", m.key):
                raise FakeMlflowError(f"Invalid metric name: '{m.key}'")
        with self.s.lock:
            self.s.calls += 1
            for m in metrics:
                run.metrics[m.key] = m.value
                run.history.setdefault(m.key, []).append((m.step, m.value))
            run.params.update({p.key: p.value for p in params})
            run.tags.update({t.key: t.value for t in tags})

    def log_artifact(self, run_id, path, artifact_path=None):
        self.get_run(run_id).artifacts[f"{artifact_path + '/' if artifact_path else ''}{path.rsplit('/', 1)[-1]}"] = path

    def log_artifacts(self, run_id, path, artifact_path=None):
        self.get_run(run_id).artifacts[artifact_path or "."] = path

    def log_text(self, run_id, text, artifact_file):
        self.get_run(run_id).artifacts[artifact_file] = text

    def update_run(self, run_id, status=None):
        self.get_run(run_id).status = status

    def set_terminated(self, run_id, status="FINISHED", end_time=None):
        self.get_run(run_id).status = status

    # registry
    def search_registered_models(self, filter_string):
        name = re.search(r"name = '(.*)'", filter_string).group(1)
        return [SimpleNamespace(name=name)] if name in self.s.models else []

    def create_registered_model(self, name, tags=None):
        self.s.models.setdefault(name, {"versions": {}, "aliases": {}})

    def search_model_versions(self, filter_string):
        name, run_id = re.search(r"name = '(.*)' and run_id = '(.*)'", filter_string).groups()
        if name not in self.s.models:
            return []
        return [SimpleNamespace(version=str(v), run_id=run_id) for v, d in self.s.models[name]["versions"].items()
                if d["run_id"] == run_id]

    def create_model_version(self, name, source, run_id, tags=None):
        versions = self.s.models[name]["versions"]
        version = len(versions) + 1
        versions[version] = {"run_id": run_id, "source": source, "tags": dict(tags or {})}
        return SimpleNamespace(version=str(version))

    def set_model_version_tag(self, name, version, key, value):
        self.s.models[name]["versions"][int(version)]["tags"][key] = value

    def set_registered_model_alias(self, name, alias, version):
        self.s.models[name]["aliases"][alias] = int(version)


@contextlib.contextmanager
def fake_mlflow(monkeypatch):
    """Every MLflow client the orchestrator makes (jobs.tracking_store.client) is a FakeStore's, for the block."""
    store = FakeStore()
    monkeypatch.setattr("jobs.tracking_store.client", store.client)
    monkeypatch.setattr("jobs.tracking_store.check_store", lambda uri=None, *a, **k: uri)
    monkeypatch.setattr("jobs.tracking_store.ensure_local_store", lambda uri: None)
    yield store


class ScriptedBackend:
    """A stand-in executor backend (slurm/backend.py's methods) whose jobs end as a script says, at once: each
    task key maps to a list of final states, one per attempt ("COMPLETED" returns `value`, anything else ends
    without a result, e.g. "NODE_FAIL", "PREEMPTED", "TIMEOUT"). For the runner's unit tests."""
    kind = "scripted"
    pins_code = False
    submitted_state = "PENDING"
    job_name = "scripted"

    def __init__(self, script: dict, value: float = 1.0, retry_kinds: dict | None = None):
        from slurm.executors import Resources
        self.resources = Resources()
        self.script, self.value = {k: list(v) for k, v in script.items()}, value
        self.retry_kinds = retry_kinds or {"NODE_FAIL": "node_fail", "PREEMPTED": "preempted", "TIMEOUT": "timeout"}
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.ids = itertools.count(100)

    def submit(self, tasks, name):
        jobs = []
        for t in tasks:
            self.submitted.append(t.key)
            jobs.append(SimpleNamespace(job_id=str(next(self.ids)), key=t.key,
                                        state=self.script[t.key].pop(0) if self.script.get(t.key) else "COMPLETED"))
        return jobs

    def unreachable(self, error):
        return "unreachable" in str(error)

    def refresh(self, attempts):
        for a in attempts:
            a.state, a.ran = a.job.state, True

    def ended(self, a):
        return a.job.state

    def has_result(self, a):
        return a.job.state == "COMPLETED"

    def result(self, a):
        return {"status": "ok", "val_loss": self.value}

    def grace_s(self, state):
        return 0.0

    def cause(self, a, state):
        return f"state {state}"

    def retry_kind(self, state):
        return self.retry_kinds.get(state)

    def stop_cause(self, state):
        return "stopped"

    def settled(self, a, state):
        pass

    def cancel(self, a):
        self.cancelled.append(a.job_id)

    def reattach(self, job_id):
        return SimpleNamespace(job_id=job_id, key=None, state="COMPLETED")

    def recover(self, name, tasks):
        return {}

    def job_tags(self, a, final_state=None):
        return {"executor": "scripted", "job_id": a.job_id}
