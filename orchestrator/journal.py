"""The study journal: the one source of truth that survives the orchestrator's death.

Every decision is appended (and fsynced) to `<study folder>/journal.jsonl` *before* it is acted on, and a
restart (`--resume`) folds the file back into the study's state:

    {"event": "start", "config": {...}, "parent_run_id": "..."}
    {"event": "trial", "trial": 3, "point": {...}, "encoded": [...], "run_id": "...", "out": "..."}
    {"event": "submitted", "trial": 3, "job_id": "12345", "attempt": 0}
    {"event": "result", "trial": 3, "status": "ok", "value": 2.41, "reason": null, "summary": {...}}
    {"event": "registered", "name": "...", "version": "1", "trial": 3}
    {"event": "end"}

A torn last line (a crash mid-write) is ignored; anything else malformed is an error, since guessing
would risk running an evaluation twice or losing one.
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
    run_id: str | None = None
    out: str | None = None
    job_id: str | None = None
    attempt: int = 0
    status: str | None = None  # None while running; "ok" | "failed" when done
    value: float | None = None
    reason: str | None = None
    summary: dict = field(default_factory=dict)
    submitted_at: float | None = None


@dataclass
class StudyState:
    config: dict | None = None
    parent_run_id: str | None = None
    trials: dict[int, TrialState] = field(default_factory=dict)
    registered: list[dict] = field(default_factory=list)
    ended: bool = False

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
        line = json.dumps({"event": event, "time": time.time(), **data}, default=str)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self):
        """The journal's records in order; a torn last line (a crash mid-write) never happened."""
        if not self.path.exists():
            return
        lines = self.path.read_text().split("\n")
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if n >= len(lines) - 1:
                    return
                raise JournalError(f"{self.path}:{n} is not valid JSON: the journal is damaged") from None
            yield record

    def load(self) -> StudyState:
        state = StudyState()
        for record in self.records():
            _fold(state, record)
        return state


def _fold(state: StudyState, r: dict) -> None:
    event = r.get("event")
    if event == "start":
        state.config, state.parent_run_id = r["config"], r.get("parent_run_id")
    elif event == "trial":
        state.trials[r["trial"]] = TrialState(r["trial"], r["point"], r.get("encoded"), r.get("run_id"), r.get("out"))
    elif event == "submitted":
        t = state.trials[r["trial"]]
        t.job_id, t.attempt, t.submitted_at = r["job_id"], r.get("attempt", 0), r.get("time")
    elif event == "result":
        t = state.trials[r["trial"]]
        t.status, t.value, t.reason, t.summary = r["status"], r.get("value"), r.get("reason"), r.get("summary", {})
    elif event == "registered":
        state.registered.append(r)
    elif event == "end":
        state.ended = True
