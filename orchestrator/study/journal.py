"""The study journal: the one source of truth that survives the orchestrator's death.

Every decision is appended (and fsynced) to `<study folder>/journal.jsonl` *before* it is acted on, and a
restart (`--resume`) folds the file back into the study's state:

    {"event": "start", "config": {...}, "study_uid": "...", "executor": "local"}
    {"event": "trial", "trial": 3, "point": {...}, "encoded": [...], "out": "..."}
    {"event": "dispatch", "batch": "b1", "keys": ["3", "4"], "attempts": {"3": 0, "4": 0}}   # about to submit
    {"event": "submitted", "batch": "b1", "jobs": {"3": "12345_0", "4": "12345_1"}}          # submitted
    {"event": "retry", "key": "3", "attempt": 0, "kind": "node_fail", "follow": false, "reason": "..."}
    {"event": "prune", "trial": 3, "decision": {"pruner": "asha", "fraction": 0.125, "value": 3.1, ...}}
    {"event": "result", "trial": 3, "status": "ok", "value": 2.41, "reason": null, "summary": {...}}
    {"event": "registered", "name": "...", "version": "1", "trial": 3, "run_id": "..."}
    {"event": "end"}

`dispatch`, `submitted` and `retry` are the runner's events (orchestrator/study/runner.py), the same in every
journal that runs jobs (`evaluate.jsonl`, `confirm.jsonl`): `fold_job` reads them into a `Job`. Only the
process holding the study's lock (orchestrator/study/lock.py) appends. The file rules (a torn last line, damage)
are orchestrator/jsonl.py's; a record that names a trial no `trial` record introduced, or lacks a field its event
needs, is damage too: a one-line JournalError naming the line and the fix, and nothing is appended after it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract import OK
from orchestrator.jsonl import Appender, DamagedFile, read_records

FIX = "restore the journal from a backup, or start the study again under a new --study name"


class JournalError(DamagedFile):
    pass


@dataclass
class Job:
    """The runner's record of one unit of work (a trial, an evaluation, a retrain): its job and past attempts."""
    key: str
    out: str | None = None
    job_id: str | None = None     # the current attempt's job
    attempt: int = 0
    batch: str | None = None      # dispatched in this batch but no job id recorded yet (a crash in between)
    retries: int = 0              # retries that count against the policy's max_retries
    history: list = field(default_factory=list)  # ended attempts: {"attempt", "job_id", "kind", "reason", ...}
    submitted_at: float | None = None
    started_at: float | None = None  # first dispatch
    cost_h: float = 0.0              # resource-hours (GPU-hours; CPU-hours without GPUs) of its ended attempts

    @property
    def hours(self) -> float:
        """Wall-clock hours since the first dispatch (what `retries.max_hours` bounds)."""
        return (time.time() - self.started_at) / 3600 if self.started_at else 0.0


def fold_job(jobs: dict[str, Job], r: dict) -> bool:
    """Apply one of the runner's events (dispatch, submitted, retry) to `jobs`; False for any other event.
    A key no item introduced raises KeyError (the caller says which line)."""
    event = r.get("event")
    if event == "dispatch":
        for key in r["keys"]:
            job = jobs[str(key)]
            job.attempt, job.batch, job.job_id = r.get("attempts", {}).get(key, job.attempt), r["batch"], None
            job.started_at = job.started_at or r.get("time")
    elif event == "submitted":
        ids = r.get("jobs") or ({str(r["trial"]): r["job_id"]} if "trial" in r else {r["key"]: r["job_id"]})
        for key, job_id in ids.items():
            job = jobs[str(key)]
            job.job_id, job.batch, job.submitted_at = job_id, None, r.get("time")
            job.attempt = r.get("attempt", job.attempt)
            job.started_at = job.started_at or r.get("time")
    elif event == "retry":
        job = jobs[str(r["key"] if "key" in r else r["trial"])]  # journals before the runner said "trial"
        if r.get("fresh"):  # asked for again (evaluate --retry-failed): a new evaluation of the same item
            job.job_id, job.retries, job.history = None, 0, []
            return True
        job.retries += 0 if r.get("follow") else 1
        job.cost_h += float(r.get("cost_h") or 0.0)
        job.history.append({k: r.get(k) for k in ("attempt", "job_id", "kind", "reason", "time", "follow")})
    else:
        return False
    return True


@dataclass
class TrialState:
    trial: int
    point: dict
    encoded: object = None
    run_id: str | None = None     # MLflow child run (from the outbox's acknowledgements)
    out: str | None = None
    job: Job = None
    pruned: dict | None = None    # the pruner's decision (orchestrator/search/pruners.py Decision), once taken
    status: str | None = None     # None while running; jobs.contract.STATUSES once done
    value: float | None = None
    reason: str | None = None
    summary: dict = field(default_factory=dict)
    finished_at: float | None = None  # when its result was journaled

    def __post_init__(self):
        self.job = self.job or Job(str(self.trial), self.out)

    @property
    def ok(self) -> bool:
        return self.status == OK


@dataclass
class StudyState:
    config: dict | None = None
    study_uid: str | None = None
    executor: str | None = None   # the executor kind the study resolved to at its start
    parent_run_id: str | None = None
    trials: dict[int, TrialState] = field(default_factory=dict)
    registered: list[dict] = field(default_factory=list)
    ended: bool = False
    started_at: float | None = None
    batches: dict[str, list] = field(default_factory=dict)  # dispatch batch -> its keys, in submission order
    jobs: dict[str, Job] = field(default_factory=dict)      # trial key ("3") -> its Job (the trial's .job)

    @property
    def finished(self) -> list[TrialState]:
        return [t for t in self.trials.values() if t.status is not None]

    @property
    def running(self) -> list[TrialState]:
        return [t for t in self.trials.values() if t.status is None]

    def add(self, t: TrialState) -> TrialState:
        self.trials[t.trial] = t
        self.jobs[t.job.key] = t.job
        return t


class Journal:
    def __init__(self, path: str | Path, fix: str = FIX):
        self.path = Path(path)
        self.fix = fix
        self._file: Appender | None = None

    def exists(self) -> bool:
        return self.path.exists() and self.path.stat().st_size > 0

    def append(self, event: str, **data) -> None:
        if self._file is None:  # the first append cuts a torn last line off (jsonl.py)
            self._file = Appender(self.path)
        self._file.write({"event": event, "time": time.time(), **data})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def records(self):
        """The journal's records in order; a torn last line never happened, damage raises JournalError."""
        try:
            yield from read_records(self.path, what=f"the journal {self.path.name}", fix=self.fix)
        except DamagedFile as e:
            raise JournalError(str(e)) from None

    def fold(self, apply) -> None:
        """apply(record) for every record; a record apply cannot use is damage, named by its line."""
        for n, record in enumerate(self.records(), 1):
            try:
                apply(record)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise JournalError(f"{self.path}: record {n} ({record.get('event')!r}) is not valid ({_why(e)}): "
                                   f"the journal is damaged; {self.fix}") from None

    def load(self) -> StudyState:
        state = StudyState()
        self.fold(lambda r: _fold(state, r))
        return state


def _why(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"it lacks {e.args[0]!r} or names an unknown trial or job {e.args[0]!r}"
    return f"{type(e).__name__}: {e}"


def _fold(state: StudyState, r: dict) -> None:
    event = r["event"]
    if fold_job(state.jobs, r):
        if event == "dispatch":
            state.batches[r["batch"]] = list(r["keys"])
    elif event == "start":
        state.config, state.parent_run_id = dict(r["config"]), r.get("parent_run_id")
        state.study_uid, state.started_at = r.get("study_uid"), r.get("time")
        state.executor = r.get("executor") or state.config.get("executor_resolved")
    elif event == "trial":
        trial = r["trial"]
        if not isinstance(trial, int) or not isinstance(r["point"], dict):
            raise ValueError("a trial record needs an integer trial and a point mapping")
        state.add(TrialState(trial, r["point"], r.get("encoded"), r.get("run_id"), r.get("out")))
    elif event == "prune":
        state.trials[r["trial"]].pruned = dict(r["decision"])
    elif event == "result":
        t = state.trials[r["trial"]]
        t.status, t.value, t.reason, t.summary = r["status"], r.get("value"), r.get("reason"), r.get("summary") or {}
        t.finished_at = r.get("time")
    elif event == "registered":
        state.registered.append(r)
    elif event == "end":
        state.ended = True


def load_study(folder: str | Path) -> StudyState:
    """A study's state from its journal, with the MLflow run ids its outbox created (parent and trials)."""
    from orchestrator.tracking.outbox import run_ids
    from orchestrator.tracking.tracker import PARENT, trial_key

    folder = Path(folder)
    state = Journal(folder / "journal.jsonl").load()
    ids = run_ids(folder / "mlflow-outbox.jsonl")
    state.parent_run_id = ids.get(PARENT, state.parent_run_id)
    for t in state.trials.values():
        t.run_id = ids.get(trial_key(t.trial), t.run_id)
    return state


def open_study(workdir: str, name: str, **changes):
    """(state, typed config) of an existing study, for the commands that read one (status, register, compare,
    evaluate, confirm); `changes` (e.g. tracking_uri from a flag; None: unchanged) apply to the config. A study
    that does not exist, or never started, is a one-line ConfigError."""
    from orchestrator.config import ConfigError, StudyConfig

    folder = Path(workdir) / name
    if not (folder / "journal.jsonl").exists():
        raise ConfigError(f"no study {name!r} under {workdir}: check the name and --workdir")
    state = load_study(folder)
    if state.config is None:
        raise ConfigError(f"study {name!r} never started (its journal has no start record): run it first")
    return state, StudyConfig.from_journal(state.config, workdir=str(workdir), **changes)
