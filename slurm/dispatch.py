"""One dispatch seam: submit jobs, follow them, settle each into a typed outcome (torch-free).

    d = Dispatcher(make_backend("slurm", "runs/s/submitit", Resources(gpus_per_node=1), job_name="s"),
                   record=journal.append)
    live = d.submit([Task("3", FinetuneTrial(), (spec,), folder=out)])   # one job array for a batch
    while live:
        for attempt, outcome in d.poll(live):      # one sacct + one squeue call for every SLURM job
            live.remove(attempt)                   # outcome.result: a TrialResult (or the task's result type)
            if outcome.retry and policy.allows(outcome.retry, ...):
                live += d.submit([attempt.task.next()])

The clients (the study runner, orchestrator/study/runner.py) know neither executor kinds nor SLURM states:
what differs between SLURM, local processes and the in-process debug executor is a backend's (slurm/backend.py,
slurm/cluster.py, slurm/local.py, slurm/debug.py). What this module does for all of them, and why:

- **Intent before action.** `submit` first records `{"event": "dispatch", "batch", "keys", "attempts"}` through
  the client's `record` (its journal), then submits the batch (one job array on SLURM) named
  `<job_name>.<batch>`, then records `{"event": "submitted", "batch", "jobs": {key: job_id}}` in one line. A
  crash between the two records leaves jobs that no journal names: `recover(batch, tasks)` finds them so that
  the client adopts them instead of submitting twice.
- **A scheduler outage costs nothing.** A submission that fails because the scheduler cannot be reached (the
  backend says which errors are that) is not a failed trial: the attempt waits, and is submitted again with
  a growing pause (up to 5 minutes) until it goes through or `outage_s` passes (then SchedulerOutage: the
  client stops, resumable). `outage()` says since when, for the progress line. A submission the scheduler
  refuses (an invalid request) is a failed attempt (`retry="submission"`).
- **No stall on a missing result.** An attempt whose job is over without a result is settled after the
  backend's grace (NFS attribute caches on SLURM), with the backend's cause (state, exit code or signal, the
  last line on stderr). A task folder holding a complete result (`Task.result_file` with status ok) is a
  success even if the scheduler cancelled the job afterwards (one truth).
- **Stop records.** A job stopped by SIGTERM/USR2 records why in its folder (jobs.contract.ATTEMPTS_FILE): a
  USR2 stop is the time limit (`retry="timeout"`), a SIGTERM one a cancellation or preemption.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from submitit.core.utils import FailedJobError, UncompletedJobError

from jobs.contract import TrialResult, read_attempts
from slurm.states import RETRY_KINDS, WAITING

OUTAGE_S = 6 * 3600.0      # how long submissions are retried while the scheduler cannot be reached
MAX_SUBMIT_PAUSE_S = 300.0


class SchedulerOutage(RuntimeError):
    """The scheduler could not be reached for longer than the dispatcher's outage_s: the client stops
    (resumable); the message says since when and what to do."""


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures a trial is retried after, and the bounds of a trial's life.

    `on`: failure kinds retried (each counts against max_retries): submission (sbatch refused), node_fail
    (NODE_FAIL, BOOT_FAIL), preempted (PREEMPTED with PreemptMode=CANCEL, or a preemption requeue), timeout
    (the time limit, only useful when the job checkpoints: it resumes from its last checkpoint). A requeue
    SLURM itself decided (scontrol requeue, preemption by requeue) is always followed. `max_attempts` bounds
    all attempts of a trial whatever the reason, `max_hours` their summed wall time (None: no bound).
    `outage_hours`: how long submissions wait for a scheduler that cannot be reached (no trial fails, no
    budget is spent meanwhile); past it the client stops, resumable."""
    max_retries: int = 2
    on: tuple = ("submission", "node_fail", "preempted")
    max_attempts: int = 10
    max_hours: float | None = None
    outage_hours: float = OUTAGE_S / 3600

    def __post_init__(self):
        object.__setattr__(self, "on", tuple(self.on))
        for name, minimum in (("max_retries", 0), ("max_attempts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"retries.{name}={value!r} is invalid: an integer >= {minimum}")
        unknown = [k for k in self.on if k not in RETRY_KINDS]
        if unknown:
            raise ValueError(f"retries.on={list(self.on)!r} is invalid: use kinds from {', '.join(RETRY_KINDS)}")
        if self.max_hours is not None and (isinstance(self.max_hours, bool) or not isinstance(
                self.max_hours, (int, float)) or not self.max_hours > 0):
            raise ValueError(f"retries.max_hours={self.max_hours!r} is invalid: a number of hours > 0, or null")
        if isinstance(self.outage_hours, bool) or not isinstance(self.outage_hours, (int, float)) or \
                not 0 <= self.outage_hours < 1e6:
            raise ValueError(f"retries.outage_hours={self.outage_hours!r} is invalid: a number of hours >= 0")

    @classmethod
    def from_dict(cls, data: dict | None) -> "RetryPolicy":
        data = dict(data or {})
        if True in data and "on" not in data:  # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean true
            data["on"] = data.pop(True)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(map(str, data)) - set(valid))
        if unknown:
            raise ValueError(f"retries: unknown key {unknown[0]!r}: valid keys are {', '.join(valid)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"max_retries": self.max_retries, "on": list(self.on), "max_attempts": self.max_attempts,
                "max_hours": self.max_hours, "outage_hours": self.outage_hours}

    def allows(self, kind: str | None, retries_used: int, attempts: int, hours: float = 0.0,
               follow: bool = False) -> bool:
        """Whether a trial whose attempt just ended this way gets another attempt. `follow`: SLURM requeued it
        (preemption, scontrol requeue): followed whatever `on` says, bounded by max_attempts and max_hours."""
        if kind is None or attempts >= self.max_attempts or (self.max_hours and hours >= self.max_hours):
            return False
        return follow or (kind in self.on and retries_used < self.max_retries)

    def why_not(self, kind: str | None, retries_used: int, attempts: int, hours: float = 0.0) -> str | None:
        """Why a retryable failure was not retried (for the trial's reason), or None."""
        if kind is None:
            return None
        if attempts >= self.max_attempts:
            return f"no attempt left (retries.max_attempts={self.max_attempts})"
        if self.max_hours and hours >= self.max_hours:
            return f"the trial ran out of time (retries.max_hours={self.max_hours})"
        if kind not in self.on:
            return f"'{kind}' is not in retries.on"
        if retries_used >= self.max_retries:
            return f"no retry left (retries.max_retries={self.max_retries})"
        return None


@dataclass
class Task:
    """One unit of work: `fn(*args)` in a job. `key` names it in the client's journal; `folder` is where the
    job writes (its stop records); `result_file`, if given, is a result JSON the job writes last;
    `result_type` reads what the job returns (TrialResult, or jobs.contract.EvaluationResult)."""
    key: str
    fn: Callable
    args: tuple
    attempt: int = 0
    folder: str | None = None
    result_file: str | None = None
    result_type: Any = TrialResult

    def next(self) -> "Task":
        return dataclasses.replace(self, attempt=self.attempt + 1)


@dataclass
class Attempt:
    """A submitted task: its job, and what the scheduler last said about it (the backend keeps these fields)."""
    task: Task
    job: Any
    job_id: str
    submitted: float = field(default_factory=time.time)
    state: str = "PENDING"       # the scheduler's state: PENDING, RUNNING, ... (local: RUNNING)
    reason: str = ""             # why a pending job waits (SLURM's reason)
    node: str = ""
    ran: bool = False            # seen running at least once
    final_since: float | None = None  # first poll that saw it final without a result (grace for NFS)
    history: list = field(default_factory=list)  # the scheduler's records: one state per requeue (SLURM)
    exit_code: str = ""          # sacct's ExitCode (code:signal)
    requeued_since: float | None = None  # first poll that saw SLURM requeue it (its cause may lag in sacct)
    started: float | None = None       # first poll that saw it running (local, debug); SLURM: its Start
    elapsed_s: float | None = None     # the scheduler's own count (SLURM accounting), when it has one
    gpus: int | None = None            # allocated, as the scheduler says (None: from the resources asked for)
    cpus: int | None = None
    ended_at: float | None = None      # when it was settled

    def hours(self, resources, now: float | None = None) -> float:
        """Resource-hours this attempt used so far: elapsed x GPUs allocated (x CPUs where it has no GPU): the
        scheduler's figures where it gave them, else the wall time since it was seen running x what was asked."""
        asked_gpus = resources.gpus_per_node * resources.nodes
        gpus = self.gpus if self.gpus is not None else asked_gpus
        units = gpus if gpus else (self.cpus or resources.cpus_per_task * resources.tasks_per_node * resources.nodes)
        if self.elapsed_s is not None:
            return self.elapsed_s / 3600 * units
        if self.started is None:
            return 0.0
        return max(0.0, (self.ended_at or now or time.time()) - self.started) / 3600 * units

    @property
    def pending(self) -> bool:
        return self.state in WAITING or isinstance(self.job, Deferred)


@dataclass
class Outcome:
    """How an attempt ended: `result` (the task's result type: ok with its value, or failed with a reason),
    the scheduler's final state, the retry kind this failure is (if any), and whether SLURM requeued it
    (`follow`: the task goes on in a fresh job)."""
    result: Any
    state: str = ""
    retry: str | None = None
    follow: bool = False

    @property
    def ok(self) -> bool:
        return self.result.ok

    @property
    def reason(self) -> str | None:
        return self.result.reason


class Refused:
    """Stands in for a job the scheduler refused: settled at once as a failed submission."""
    job_id = "none"

    def __init__(self, reason: str):
        self.reason = reason


class Deferred:
    """Stands in for a job not submitted yet because the scheduler could not be reached: submitted again at
    `retry_at` (the pause doubles each time, up to MAX_SUBMIT_PAUSE_S)."""
    job_id = "none"

    def __init__(self, reason: str, since: float, pause_s: float):
        self.reason, self.since, self.pause_s = reason, since, pause_s
        self.retry_at = time.time() + pause_s


class Dispatcher:
    def __init__(self, backend, *, record: Callable[..., None] | None = None, outage_s: float = OUTAGE_S):
        self.backend = backend
        self.kind = backend.kind
        self.record = record or (lambda event, **data: None)
        self.outage_s = outage_s
        self.polls = 0

    # ------------------------------------------------------------------------------------------- submit
    def submit(self, tasks: list[Task]) -> list[Attempt]:
        """Record the intent, submit (one job array on SLURM), record the job ids. A batch that sbatch refuses
        is submitted one task at a time; a task that cannot be submitted gets a stand-in attempt (Refused:
        failed at once; Deferred: the scheduler is unreachable, submitted again later)."""
        if not tasks:
            return []
        batch = uuid.uuid4().hex[:10]
        self.record("dispatch", batch=batch, keys=[t.key for t in tasks], attempts={t.key: t.attempt for t in tasks})
        jobs = self._submit_jobs(tasks, batch)
        state = self.backend.submitted_state
        attempts = [Attempt(t, job, str(job.job_id), state=state) for t, job in zip(tasks, jobs)]
        self._record_ids(batch, attempts)
        return attempts

    def _record_ids(self, batch: str, attempts: list[Attempt]) -> None:
        ids = {a.task.key: a.job_id for a in attempts if a.job_id != "none"}
        if ids:
            self.record("submitted", batch=batch, jobs=ids)

    def _submit_jobs(self, tasks: list[Task], batch: str, since: float | None = None, pause_s: float = 0.0) -> list:
        name = f"{self.backend.job_name}.{batch}"
        if len(tasks) > 1:
            try:
                return self.backend.submit(tasks, name)
            except Exception:  # noqa: BLE001 - sbatch refused the array: each task on its own
                pass
        return [self._submit_one(t, name, since, pause_s) for t in tasks]

    def _submit_one(self, task: Task, name: str, since: float | None, pause_s: float):
        try:
            return self.backend.submit([task], name)[0]
        except Exception as e:  # noqa: BLE001 - sbatch refused, controller unreachable...
            said = _first_line(e)
            if self.backend.unreachable(e):
                now = time.time()
                return Deferred(said, since or now, min(MAX_SUBMIT_PAUSE_S, max(2.0, pause_s * 2)))
            return Refused(f"submission failed: {said}")

    def _resubmit(self, a: Attempt) -> None:
        """A deferred attempt's turn: submit it again (its intent is journaled already)."""
        d = a.job
        if time.time() - d.since > self.outage_s:
            raise SchedulerOutage(
                f"the scheduler could not be reached for {(time.time() - d.since) / 3600:.1f} h ({d.reason}); "
                "nothing was lost: when it is back, continue with --resume")
        batch = uuid.uuid4().hex[:10]
        self.record("dispatch", batch=batch, keys=[a.task.key], attempts={a.task.key: a.task.attempt})
        [job] = self._submit_jobs([a.task], batch, since=d.since, pause_s=d.pause_s)
        a.job, a.job_id, a.submitted, a.state = job, str(job.job_id), time.time(), self.backend.submitted_state
        self._record_ids(batch, [a])

    def outage(self, attempts: Iterable[Attempt]) -> str | None:
        """A short line while submissions wait for an unreachable scheduler, else None."""
        waiting = [a.job for a in attempts if isinstance(a.job, Deferred)]
        if not waiting:
            return None
        since = min(d.since for d in waiting)
        return (f"scheduler unreachable since {time.strftime('%H:%M:%S', time.localtime(since))}: "
                f"{len(waiting)} submission(s) wait ({waiting[0].reason})")

    def reattach(self, task: Task, job_id: str) -> Attempt:
        """The attempt of a job started by an earlier process (its id from the journal)."""
        job = self.backend.reattach(job_id)
        if job is None:  # the backend's jobs do not outlive their process (debug): run it again
            return self.submit([task])[0]
        return Attempt(task, job, job_id)

    def recover(self, batch: str, tasks: list[Task]) -> dict[str, str]:
        """{key: job_id} of jobs submitted in `batch` that no journal names (a crash between submitting and
        recording)."""
        return self.backend.recover(f"{self.backend.job_name}.{batch}", tasks)

    def cancel(self, attempt: Attempt) -> None:
        """Stop the attempt's job (SLURM: scancel, which signals SIGTERM first; local: SIGTERM to the job)."""
        if not isinstance(attempt.job, (Refused, Deferred)):
            self.backend.cancel(attempt)

    # ------------------------------------------------------------------------------------------- poll
    def poll(self, attempts: Iterable[Attempt]) -> list[tuple[Attempt, Outcome]]:
        """Refresh every attempt's state (one scheduler query for all) and settle the ended ones. Never blocks
        on a missing result. Raises SchedulerOutage when an unreachable scheduler outlasted outage_s."""
        attempts = list(attempts)
        self.polls += 1
        for a in attempts:
            if isinstance(a.job, Deferred) and time.time() >= a.job.retry_at:
                self._resubmit(a)
        self.backend.refresh([a for a in attempts if not isinstance(a.job, (Refused, Deferred))])
        settled = []
        for a in attempts:
            outcome = self._settle(a)
            if outcome is not None:
                a.ended_at = time.time()
                settled.append((a, outcome))
        return settled

    def _settle(self, a: Attempt) -> Outcome | None:
        if isinstance(a.job, Refused):
            return Outcome(a.task.result_type.failed(a.job.reason), "SUBMISSION_FAILED", retry="submission")
        if isinstance(a.job, Deferred):
            return None
        ended = self.backend.ended(a)
        if ended is None or isinstance(ended, Outcome):
            return ended
        return self._ended(a, ended)

    def _ended(self, a: Attempt, state: str) -> Outcome | None:
        """An attempt whose job is over: its result, the folder's result, or why there is none."""
        read = a.task.result_type
        if self.backend.has_result(a):
            try:
                return Outcome(read.from_dict(self.backend.result(a)), state)
            except (FailedJobError, UncompletedJobError) as e:
                why = f"job {a.job_id} raised: {_last_error_line(e)}"
            except Exception as e:  # noqa: BLE001 - an unreadable result is this attempt's failure
                why = f"job {a.job_id}: {_unreadable(e)}"
            return self._failed(a, state, why)
        folder_result = _read_json(a.task.result_file) if a.task.result_file else None
        if folder_result and read.from_dict(folder_result).ok:
            return Outcome(read.from_dict(folder_result), state)  # it finished before it was stopped
        now = time.time()
        if a.final_since is None:
            a.final_since = now
        if now - a.final_since < self.backend.grace_s(state):
            return None  # the result may still be on its way (NFS): look again at the next poll
        return self._failed(a, state, f"job {a.job_id} ended without a result ({self.backend.cause(a, state)})")

    def _failed(self, a: Attempt, state: str, reason: str) -> Outcome:
        stop = self._stop_record(a)
        retry = self.backend.retry_kind(state)
        if stop:  # the job said why it stopped: lead with that
            timeout = stop.get("signal") == "SIGUSR2"  # sent signal_delay_s before the time limit (sbatch --signal)
            why = "the time limit is near" if timeout else self.backend.stop_cause(state)
            saved = f"checkpoint of step {stop.get('step')} saved" if stop.get("saved") else "no checkpoint saved"
            reason = f"job {a.job_id} stopped on {stop.get('signal')} ({why}; {saved}); state {state}"
            retry = "timeout" if timeout else retry
        self.backend.settled(a, state)
        return Outcome(a.task.result_type.failed(reason), state, retry=retry)

    def _stop_record(self, a: Attempt) -> dict | None:
        if not a.task.folder:
            return None
        records = [r for r in read_attempts(a.task.folder) if str(r.get("job_id")) == a.job_id and r.get("signal")]
        return records[-1] if records else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _last_error_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _unreadable(e: BaseException) -> str:
    """Why a job's result could not be read back (an unpicklable return value is the common case)."""
    text = _first_line(e)
    if "job.stderr" in text or "pickle" in text.lower() or isinstance(e, (AttributeError, ImportError, EOFError)):
        return f"its result could not be read back ({type(e).__name__}: {text}); return plain data (numbers, " \
               "strings, lists, dicts) from the objective"
    return f"{type(e).__name__}: {text}"


def _read_json(path: str | None) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None
