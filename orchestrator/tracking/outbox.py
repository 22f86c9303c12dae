"""MLflow writes through a durable queue: the study never waits on MLflow, and an outage loses nothing.

    box = Outbox(study_folder / "mlflow-outbox.jsonl", uri, experiment="tiny-nomad", uid=study_uid)
    box.start()                                   # a background thread executes the writes in order
    box.put("create_run", key="trial:3", parent="parent", name="trial-003", tags={...}, mark="create:trial:3")
    box.put("log_batch", key="trial:3", metrics=[["val_loss", 2.4, ts, 0]])
    box.flush()                                   # fsync what was put (once per loop tick)
    box.run_id("trial:3")                         # None until the run exists in MLflow
    box.close(wait_s=60)                          # wait for the queue to drain (bounded), stop the thread

Every write is appended (and fsynced at `flush`) to the outbox file before it is tried, with a sequence number;
each one done is acknowledged by a line `{"ack": seq, ...}` (created runs' ids and model versions included).
A restart reads the file back and replays what was not acknowledged. Writes are idempotent, so a write that
was done but not yet acknowledged when the process died is harmless when replayed:

- runs are created once per key: each carries the tag `lora_hpo.run_key` = "<study uid>/<key>", and a create
  first looks for a run with that tag (a create whose answer was lost in an outage is found, not repeated);
- metrics carry their own timestamps, so a replayed batch is the same rows, which MLflow ignores;
- params are re-logged with the same values, tags and artifacts overwrite themselves, run status is a set;
- a model version is created once per (model, run): an existing version for the run is reused.

While MLflow is unreachable (connection refused, timeouts, 5xx, a locked SQLite file) the thread retries with a
growing pause (up to 30 s); `status()` says since when and how many writes wait. A write MLflow rejects for
good (an invalid value) is acknowledged with its error, reported once, and skipped: it can never succeed.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from orchestrator.study.journal import read_records, repair_tail

PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
             "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_PARAMETER", "NOT_IMPLEMENTED"}
MAX_PAUSE_S = 30.0


class Rejected(Exception):
    """A write that can never succeed (its run was never created): skipped, not retried."""


class Outbox:
    def __init__(self, path: str | Path, uri: str, experiment: str, uid: str, artifact_location: str | None = None,
                 log=print):
        self.path = Path(path)
        self.uri, self.experiment, self.uid = uri, experiment, uid
        self.artifact_location = artifact_location
        self.log = log
        self._cv = threading.Condition()
        self._queue: list[dict] = []
        self._run_ids: dict[str, str] = {}
        self._results: dict[int, object] = {}   # seq -> what the write returned (a model version)
        self._marks: dict[str, int] = {}  # mark -> sequence number of the write that carries it
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._stop = False
        self._unsynced = 0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.done_count = 0
        self._client = None
        self._experiment_id: str | None = None
        self._load()

    # ------------------------------------------------------------------------------------------- the file
    def _load(self) -> None:
        acked = {}
        ops = []
        for r in read_records(self.path):
            if "ack" in r:
                acked[r["ack"]] = r
                if r.get("run_id") and r.get("key"):
                    self._run_ids[r["key"]] = r["run_id"]
                if "result" in r:
                    self._results[r["ack"]] = r["result"]
            else:
                ops.append(r)
        for op in ops:
            self._seq = max(self._seq, op["seq"])
            if op.get("mark"):
                self._marks[op["mark"]] = op["seq"]
            if op["seq"] not in acked:
                self._queue.append(op)
        self._file = open(self.path, "ab+")
        repair_tail(self._file)

    def _write(self, record: dict, sync: bool) -> None:
        self._file.write((json.dumps(record, default=str) + "\n").encode())
        self._file.flush()
        if sync:
            os.fsync(self._file.fileno())

    # ------------------------------------------------------------------------------------------- producer
    def put(self, op: str, mark: str | None = None, **args) -> int:
        """Queue one write (durable at the next flush); returns its sequence number."""
        with self._cv:
            self._seq += 1
            record = {"seq": self._seq, "op": op, **({"mark": mark} if mark else {}), **args}
            self._write(record, sync=False)
            self._unsynced += 1
            if mark:
                self._marks[mark] = self._seq
            self._queue.append(record)
            self._cv.notify_all()
            return self._seq

    def flush(self) -> None:
        with self._cv:
            if self._unsynced:
                os.fsync(self._file.fileno())
                self._unsynced = 0

    def has(self, mark: str) -> bool:
        """Whether a write with this mark was ever queued (done or not)."""
        return mark in self._marks

    def seq_of(self, mark: str) -> int | None:
        return self._marks.get(mark)

    def run_id(self, key: str) -> str | None:
        return self._run_ids.get(key)

    def result(self, seq: int):
        return self._results.get(seq)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def status(self) -> str | None:
        """A short line while MLflow is unreachable, else None."""
        if self.down_since is None:
            return None
        return (f"MLflow unreachable since {time.strftime('%H:%M:%S', time.localtime(self.down_since))} "
                f"({self.pending} writes queued; {self.last_error})")

    # ------------------------------------------------------------------------------------------- consumer
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drain, name="mlflow-outbox", daemon=True)
            self._thread.start()

    def wait(self, timeout_s: float, idle_s: float | None = None) -> bool:
        """Wait until every queued write is done (True), or `timeout_s` passed, or (with `idle_s`) no write
        succeeded for that long (False)."""
        self.flush()
        deadline = time.monotonic() + timeout_s
        with self._cv:
            last, last_at = self.done_count, time.monotonic()
            while self._queue:
                now = time.monotonic()
                if self.done_count != last:
                    last, last_at = self.done_count, now
                if now >= deadline or (idle_s is not None and now - last_at >= idle_s):
                    return False
                self._cv.wait(min(1.0, deadline - now))
            return True

    def close(self, wait_s: float = 0.0, idle_s: float | None = None) -> bool:
        drained = self.wait(wait_s, idle_s) if wait_s > 0 else not self._queue
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(10)
        self.flush()
        self._file.close()
        return drained

    def _drain(self) -> None:
        pause = 1.0
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                op = self._queue[0]
            try:
                ack = self._execute(op)
            except Exception as e:  # noqa: BLE001 - MLflow's failures are many kinds; sorted below
                if _permanent(e):
                    self.log(f"warning: MLflow rejected {op['op']} for {op.get('key')}: {_short(e)} (skipped)")
                    ack = {"error": _short(e)}
                else:
                    with self._cv:
                        self.down_since = self.down_since or time.time()
                        self.last_error = _short(e)
                        self._cv.wait(pause)
                        if self._stop:
                            return
                    pause = min(MAX_PAUSE_S, pause * 2)
                    self._client = None  # reconnect: a restarted server, a recreated database
                    continue
            pause = 1.0
            with self._cv:
                self._write({"ack": op["seq"], **(ack or {})}, sync=True)
                if ack and "result" in ack:
                    self._results[op["seq"]] = ack["result"]
                self._queue.pop(0)
                self.down_since, self.last_error = None, None
                self.done_count += 1
                self._cv.notify_all()

    # ------------------------------------------------------------------------------------------- writes
    @property
    def client(self):
        if self._client is None:
            from jobs import tracking_store
            self._client = tracking_store.client(self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=self.artifact_location)
        return self._experiment_id

    def _run(self, key: str) -> str:
        run_id = self._run_ids.get(key)
        if run_id is None:
            raise Rejected(f"the MLflow run {key!r} was never created (its creation failed for good)")
        return run_id

    def _execute(self, op: dict) -> dict | None:
        from mlflow.entities import Metric, Param, RunTag

        kind, c = op["op"], self.client
        if kind == "create_run":
            return self._create_run(op)
        run_id = op.get("run_id") or self._run(op["key"])  # a run another outbox made is named by its id
        if kind == "log_batch":
            c.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op.get("metrics", [])],
                        params=[Param(k, v) for k, v in op.get("params", {}).items()],
                        tags=[RunTag(k, v) for k, v in op.get("tags", {}).items()])
        elif kind == "log_artifact":
            if Path(op["path"]).exists():
                c.log_artifact(run_id, op["path"], op.get("artifact_path"))
        elif kind == "log_artifacts":
            if Path(op["path"]).is_dir():
                c.log_artifacts(run_id, op["path"], op.get("artifact_path"))
        elif kind == "log_text":
            c.log_text(run_id, op["text"], op["file"])
        elif kind == "set_status":
            if op["status"] == "RUNNING":
                c.update_run(run_id, status="RUNNING")
            else:
                c.set_terminated(run_id, status=op["status"], end_time=op.get("end_time"))
        elif kind == "register":
            return {"result": self._register(run_id, op)}
        else:
            raise Rejected(f"unknown outbox write {kind!r}")
        return None

    def _create_run(self, op: dict) -> dict:
        key = op["key"]
        if key in self._run_ids:
            return {"key": key, "run_id": self._run_ids[key]}
        tag = f"{self.uid}/{key}"
        found = self.client.search_runs([self.experiment_id()], f"tags.`lora_hpo.run_key` = '{tag}'",
                                        max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            tags = {**op.get("tags", {}), "lora_hpo.run_key": tag}
            if op.get("parent"):
                tags["mlflow.parentRunId"] = self._run(op["parent"])
            elif op.get("parent_id"):
                tags["mlflow.parentRunId"] = op["parent_id"]
            run_id = self.client.create_run(self.experiment_id(), run_name=op.get("name"), tags=tags,
                                            start_time=op.get("start_time")).info.run_id
        self._run_ids[key] = run_id
        return {"key": key, "run_id": run_id}

    def _register(self, run_id: str, op: dict) -> str:
        c, name = self.client, op["name"]
        if not c.search_registered_models(f"name = '{name}'"):
            c.create_registered_model(name, tags={"kind": "lora-adapter"})
        existing = [v for v in c.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")]
        if existing:
            version = min(existing, key=lambda v: int(v.version)).version  # this run's version, not a new one
            for k, v in op.get("tags", {}).items():  # what was learned since (a confirmation's spread)
                c.set_model_version_tag(name, version, k, v)
        else:
            source = c.get_run(run_id).info.artifact_uri.rstrip("/") + "/" + op.get("artifact_path", "adapter")
            version = c.create_model_version(name, source=source, run_id=run_id, tags=op.get("tags", {})).version
        if op.get("alias"):
            c.set_registered_model_alias(name, op["alias"], version)
        return str(version)


def _permanent(e: BaseException) -> bool:
    return isinstance(e, Rejected) or getattr(e, "error_code", None) in PERMANENT


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def run_ids(path: str | Path) -> dict[str, str]:
    """{run key: MLflow run id} of the runs an outbox file created (read-only; for other commands)."""
    return {r["key"]: r["run_id"] for r in read_records(Path(path)) if "ack" in r and r.get("run_id")}
