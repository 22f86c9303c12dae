"""The study journal: the one source of truth that survives the orchestrator's death.

Every decision is appended (and fsynced) to `<study folder>/journal.jsonl` *before* it is acted on, and a
restart (`--resume`) folds the file back into the study's state:

    {"event": "start", "config": {...}, "study_uid": "..."}
    {"event": "trial", "trial": 3, "point": {...}, "encoded": [...], "out": "..."}
    {"event": "dispatch", "batch": "b1", "keys": ["3", "4"], "attempts": {"3": 0, "4": 0}}   # about to submit
    {"event": "submitted", "batch": "b1", "jobs": {"3": "12345_0", "4": "12345_1"}}          # submitted
    {"event": "retry", "trial": 3, "attempt": 0, "kind": "node_fail", "follow": false, "reason": "..."}
    {"event": "prune", "trial": 3, "decision": {"pruner": "asha", "fraction": 0.125, "value": 3.1, ...}}
    {"event": "result", "trial": 3, "status": "ok", "value": 2.41, "reason": null, "summary": {...}}
    {"event": "registered", "name": "...", "version": "1", "trial": 3, "run_id": "..."}
    {"event": "end"}

Only the process holding the study's lock (orchestrator/study/lock.py) appends. A torn last line (a crash or a full
disk mid-write) never happened: readers skip it, and the next append first cuts the file back to its last
complete line (and fsyncs), so the journal never holds a damaged line in the middle. Anything else malformed
is an error, since guessing would risk running an evaluation twice or losing one.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path


class JournalError(RuntimeError):
    pass


@dataclass
class TrialState:
    trial: int
    point: dict
    encoded: object = None
    run_id: str | None = None     # MLflow child run (journals written before the tracking outbox)
    out: str | None = None
    job_id: str | None = None     # the current attempt's job
    attempt: int = 0
    batch: str | None = None      # dispatched in this batch but no job id recorded yet (a crash in between)
    retries: int = 0              # retries that count against the policy's max_retries
    history: list = field(default_factory=list)  # ended attempts: {"attempt", "job_id", "kind", "reason"}
    pruned: dict | None = None    # the pruner's decision (orchestrator/search/pruners.py Decision), once taken
    status: str | None = None     # None while running; "ok" | "failed" | "pruned" when done
    value: float | None = None
    reason: str | None = None
    summary: dict = field(default_factory=dict)
    submitted_at: float | None = None
    started_at: float | None = None  # first dispatch of the trial
    finished_at: float | None = None  # when its result was journaled


@dataclass
class StudyState:
    config: dict | None = None
    study_uid: str | None = None
    parent_run_id: str | None = None
    trials: dict[int, TrialState] = field(default_factory=dict)
    registered: list[dict] = field(default_factory=list)
    ended: bool = False
    started_at: float | None = None
    batches: dict[str, list] = field(default_factory=dict)  # dispatch batch -> its keys, in submission order

    @property
    def finished(self) -> list[TrialState]:
        return [t for t in self.trials.values() if t.status is not None]

    @property
    def running(self) -> list[TrialState]:
        return [t for t in self.trials.values() if t.status is None]


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, event: str, **data) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"event": event, "time": time.time(), **data}, default=str) + "\n").encode()
        with open(self.path, "ab+") as f:
            repair_tail(f)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self):
        """The journal's records in order; a torn last line (a crash mid-write) never happened."""
        yield from read_records(self.path)

    def load(self) -> StudyState:
        state = StudyState()
        for record in self.records():
            _fold(state, record)
        return state


def repair_tail(f) -> None:
    """Cut a file opened in 'ab+' back to its last complete line (a torn write), and make that durable."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    keep, chunk = 0, 65536
    pos = size
    while pos > 0:  # find the last newline, reading backwards
        start = max(0, pos - chunk)
        f.seek(start)
        data = f.read(pos - start)
        cut = data.rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        pos = start
    f.truncate(keep)
    f.flush()
    os.fsync(f.fileno())
    f.seek(0, os.SEEK_END)


def read_records(path: Path):
    """JSON lines of a journal-like file; a torn last line is skipped, a bad line elsewhere is an error."""
    if not path.exists():
        return
    lines = path.read_bytes().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if n >= len(lines) - 1:
                return
            raise JournalError(f"{path}:{n} is not valid JSON: the journal is damaged (a line in the middle was "
                               "overwritten); restore it from a backup or start a new study") from None
        yield record


def _fold(state: StudyState, r: dict) -> None:
    event = r.get("event")
    if event == "start":
        state.config, state.parent_run_id = r["config"], r.get("parent_run_id")
        state.study_uid, state.started_at = r.get("study_uid"), r.get("time")
    elif event == "trial":
        state.trials[r["trial"]] = TrialState(r["trial"], r["point"], r.get("encoded"), r.get("run_id"), r.get("out"))
    elif event == "dispatch":
        state.batches[r["batch"]] = list(r["keys"])
        for key in r["keys"]:
            t = state.trials[int(key)]
            t.attempt, t.batch, t.job_id = r.get("attempts", {}).get(key, t.attempt), r["batch"], None
            t.started_at = t.started_at or r.get("time")
    elif event == "submitted":
        jobs = r.get("jobs") or ({str(r["trial"]): r["job_id"]} if "trial" in r else {})
        for key, job_id in jobs.items():
            t = state.trials[int(key)]
            t.job_id, t.batch, t.submitted_at = job_id, None, r.get("time")
            t.attempt = r.get("attempt", t.attempt)
            t.started_at = t.started_at or r.get("time")
    elif event == "retry":
        t = state.trials[r["trial"]]
        t.retries += 0 if r.get("follow") else 1
        t.history.append({k: r.get(k) for k in ("attempt", "job_id", "kind", "reason", "time", "follow")})
    elif event == "prune":
        state.trials[r["trial"]].pruned = r["decision"]
    elif event == "result":
        t = state.trials[r["trial"]]
        t.status, t.value, t.reason, t.summary = r["status"], r.get("value"), r.get("reason"), r.get("summary", {})
        t.finished_at = r.get("time")
    elif event == "registered":
        state.registered.append(r)
    elif event == "end":
        state.ended = True
