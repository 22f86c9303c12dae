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
growing pause (up to 30 s); `status()` says since when and how many writes wait. What MLflow could refuse for
good never blocks the others: every text is made valid UTF-8 before it is queued (a lone surrogate, what
`os.fsdecode` gives for a non-UTF-8 file name, can never be sent), and a batch MLflow rejects (an invalid value,
a name it refuses) is retried item by item, so that only the refused items are skipped, each reported once.

One outbox per study incarnation: its first line names the study's uid (`{"outbox": uid}`). A study started
again in a folder whose journal was lost (a new uid) moves the old file aside (`mlflow-outbox.<old uid>.jsonl`)
instead of writing into the old runs. `forget(keys)` drops what the outbox knows of some runs (their ids, the
marks of their writes and their queued writes): `--resume` does it for runs the store no longer has, and the
tracker queues them again from the journal (orchestrator/tracking/tracker.py reconcile).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from orchestrator.jsonl import Appender, DamagedFile, read_records

PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
             "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_PARAMETER", "NOT_IMPLEMENTED"}
MAX_PAUSE_S = 30.0


class OutboxError(DamagedFile):
    """The outbox file is damaged: one line naming it and the fix."""


def clean(value):
    """`value` with every string made valid UTF-8 (lone surrogates become U+FFFD), recursively."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            try:
                return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            except UnicodeEncodeError:
                return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {clean(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


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
        self._busy = False  # the drain thread is executing the first queued write
        self._said: set[str] = set()
        self._unsynced = 0
        self.down_since: float | None = None
        self.last_error: str | None = None
        self.done_count = 0
        self._client = None
        self._experiment_id: str | None = None
        self._load()

    # ------------------------------------------------------------------------------------------- the file
    def _load(self) -> None:
        self._rotate_if_foreign()
        acked, ops = {}, []
        fix = (f"move {self.path} aside (its queued MLflow writes are lost; --resume re-creates the runs from the "
               "journal)")
        try:
            for r in read_records(self.path, what=f"the MLflow outbox {self.path.name}", fix=fix):
                if "ack" in r:
                    acked[r["ack"]] = r
                    if r.get("run_id") and r.get("key"):
                        self._run_ids[r["key"]] = r["run_id"]
                    if "result" in r:
                        self._results[r["ack"]] = r["result"]
                elif "forget" in r:
                    self._drop(set(r["forget"]), ops)
                elif "forget_marks" in r:
                    for mark in r["forget_marks"]:
                        self._marks.pop(mark, None)
                elif "op" in r:
                    ops.append(r)
                    self._seq = max(self._seq, int(r["seq"]))
                    if r.get("mark"):
                        self._marks[r["mark"]] = r["seq"]
        except (KeyError, TypeError, ValueError) as e:
            raise OutboxError(f"{self.path}: a record is not valid ({type(e).__name__}: {e}): {fix}") from None
        except DamagedFile as e:
            raise OutboxError(str(e)) from None
        self._queue = [op for op in ops if op["seq"] not in acked]
        self._file = Appender(self.path)
        if self.path.stat().st_size == 0:
            self._file.write({"outbox": self.uid})

    def _rotate_if_foreign(self) -> None:
        """An outbox of another incarnation of the study (another uid) is moved aside, never written into."""
        try:
            with open(self.path, "rb") as f:
                first = f.readline()
        except FileNotFoundError:
            return
        try:
            owner = json.loads(first).get("outbox")
        except (ValueError, AttributeError):
            return  # damaged: _load says so
        if owner and owner != self.uid:
            aside = self.path.with_name(f"{self.path.stem}.{owner}{self.path.suffix}")
            os.replace(self.path, aside)
            self.log(f"note: {self.path.name} belonged to an earlier study of this name (uid {owner}): moved to "
                     f"{aside.name}; this study writes its own runs")

    def _drop(self, keys: set, ops: list) -> None:
        for key in keys:
            self._run_ids.pop(key, None)
        for mark, seq in list(self._marks.items()):
            if any(mark.endswith(":" + k) or mark == f"create:{k}" for k in keys):
                del self._marks[mark]
        ops[:] = [op for op in ops if op.get("key") not in keys]

    def _write(self, record: dict, sync: bool) -> None:
        self._file.write(record, sync=sync)

    # ------------------------------------------------------------------------------------------- producer
    def put(self, op: str, mark: str | None = None, **args) -> int:
        """Queue one write (durable at the next flush); returns its sequence number."""
        with self._cv:
            self._seq += 1
            record = {"seq": self._seq, "op": op, **({"mark": mark} if mark else {}), **clean(args)}
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
                self._file.sync()
                self._unsynced = 0

    def forget(self, keys) -> None:
        """Drop what this outbox knows of the runs `keys` (ids, marks, queued writes): they are queued again."""
        keys = set(keys)
        if not keys:
            return
        with self._cv:
            self._write({"forget": sorted(keys)}, sync=True)
            while self._busy:  # the write under way finishes first
                self._cv.wait(0.1)
            self._drop(keys, self._queue)
            self._cv.notify_all()

    def forget_marks(self, marks) -> None:
        """Forget that writes with these marks were queued (their run lost what they wrote): queued again."""
        marks = [m for m in marks if m in self._marks]
        if marks:
            with self._cv:
                self._write({"forget_marks": marks}, sync=True)
                for m in marks:
                    self._marks.pop(m, None)

    def known_runs(self) -> dict[str, str]:
        return dict(self._run_ids)

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
        # MLflow (and pandas under it) imported here, in the caller's thread: two threads importing them at once
        # (the drain's first write, the study's first plot) can meet a partially initialized module
        import mlflow.entities  # noqa: F401
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
                op, self._busy = self._queue[0], True
            try:
                ack = self._execute(op)
            except Exception as e:  # noqa: BLE001 - MLflow's failures are many kinds; sorted below
                if _permanent(e):
                    ack = self._refused(op, e)
                else:
                    with self._cv:
                        self._busy = False
                        self.down_since = self.down_since or time.time()
                        self.last_error = _short(e)
                        self._cv.notify_all()
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
                if op in self._queue:  # forget() may have dropped it meanwhile
                    self._queue.remove(op)
                self._busy = False
                self.down_since, self.last_error = None, None
                self.done_count += 1
                self._cv.notify_all()

    def _refused(self, op: dict, e: BaseException) -> dict:
        """A write MLflow refused for good: a batch is retried item by item (only the refused items are lost,
        each said once); anything else is skipped with its error."""
        if op["op"] == "log_batch" and not isinstance(e, Rejected):
            refused = []
            for item in _items(op):
                try:
                    self._execute(item)
                except Exception as e2:  # noqa: BLE001
                    if not _permanent(e2):
                        raise
                    refused.append(f"{_item_name(item)}: {_short(e2)}")
            for line in refused:
                self._say_once(f"warning: MLflow refused {line} for {op.get('key')} (that value is not logged)")
            return {"error": "; ".join(refused)[:2000]} if refused else {}
        self._say_once(f"warning: MLflow rejected {op['op']} for {op.get('key')}: {_short(e)} (skipped)")
        return {"error": _short(e)}

    def _say_once(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.log(line)

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


def _items(op: dict) -> list[dict]:
    """A log_batch split into one write per metric, param and tag."""
    base = {k: v for k, v in op.items() if k not in ("metrics", "params", "tags")}
    return [{**base, "metrics": [m]} for m in op.get("metrics", [])] + \
        [{**base, "params": {k: v}} for k, v in op.get("params", {}).items()] + \
        [{**base, "tags": {k: v}} for k, v in op.get("tags", {}).items()]


def _item_name(item: dict) -> str:
    if item.get("metrics"):
        return f"metric {item['metrics'][0][0]!r}"
    kind = "param" if item.get("params") else "tag"
    return f"{kind} {next(iter(item.get('params') or item.get('tags')))!r}"


def _permanent(e: BaseException) -> bool:
    return isinstance(e, Rejected) or getattr(e, "error_code", None) in PERMANENT


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def run_ids(path: str | Path) -> dict[str, str]:
    """{run key: MLflow run id} of the runs an outbox file created (read-only; for other commands)."""
    return {r["key"]: r["run_id"] for r in read_records(Path(path)) if "ack" in r and r.get("run_id")}
