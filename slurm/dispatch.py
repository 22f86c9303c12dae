"""One dispatch seam: submit jobs, follow them, settle each into a typed outcome (torch-free).

    d = Dispatcher("slurm", "runs/s/submitit", Resources(gpus_per_node=1), job_name="s", record=journal.append)
    live = d.submit([Task("3", FinetuneTrial(), (spec,), folder=out)])   # one job array for a batch
    while live:
        for attempt, outcome in d.poll(live):      # one sacct + one squeue call for every SLURM job
            live.remove(attempt)                   # outcome.status: "done" (outcome.result) or "failed"
            if outcome.retry and policy.allows(outcome.retry, attempt.task.attempt, ...):
                live += d.submit([attempt.task.next()])

Both the study loop and `orchestrator evaluate` are clients of this module; they know neither executor kinds
nor SLURM states. What it does, and why:

- **Intent before action.** `submit` first records `{"event": "dispatch", "batch", "keys", "attempts"}` through
  the client's `record` (its journal), then submits the batch as one job array named `<job_name>.<batch>`,
  then records `{"event": "submitted", "batch", "jobs": {key: job_id}}` in one line. A crash between the two
  records leaves jobs that no journal names: `recover(batch, tasks)` finds them (SLURM: by the array's name;
  local: by the submitted pickle's arguments) so that the client adopts them instead of submitting twice.
- **States from the scheduler, not from submitit's done().** For SLURM one `sacct -D` (every record of every
  job, requeues included) and one `squeue` per poll. A job is final when sacct says so and squeue no longer
  holds it live; pending jobs carry SLURM's reason (Resources, Priority, BeginTime, ReqNodeNotAvail...).
- **Requeues are followed in a fresh job.** A job that SLURM requeued (scontrol requeue, preemption with
  PreemptMode=REQUEUE, an automatic requeue after NODE_FAIL, REQUEUE_HOLD) is cancelled and reported as
  `Outcome(retry="requeued"|"preempted"|"node_fail", follow=True)`: the client submits the task's next attempt,
  which resumes from the trial folder's checkpoint. So no result is ever collected from an attempt SLURM
  requeued, a requeued copy never runs after its trial was settled, and recovery does not wait out the
  BeginTime hold SLURM puts on requeued jobs (cred_expire + 1 s, 121 s by default).
- **No stall on a missing result.** A final job without a result pickle is settled after a short grace
  (`result_grace_s`, for NFS attribute caches) without blocking the loop; the reason names the state, the exit
  code or signal, and the last line the job wrote to stderr. A job whose task folder holds a complete result
  (`Task.result_file` with status ok) is a success even if SLURM cancelled it afterwards (one truth).
- **Stop records.** A job stopped by SIGTERM/USR2 records why in its folder (jobs.contract.ATTEMPTS_FILE):
  a USR2 stop is the time limit (`retry="timeout"`), a SIGTERM one the cancellation or preemption SLURM says.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from jobs.contract import read_attempts
from slurm.executors import Resources, make_executor
from slurm.states import (FINAL, LIVE, OOM_MARKS, REQUEUE_STATES, RETRY_KINDS, WAITING, DispatchError,  # noqa: F401
                          SlurmInfo, exit_text, last_stderr_line, run, slurm_exit_text, slurm_snapshot)

REQUEUE_CAUSE_WAIT_S = 60.0  # how long a requeued attempt waits for sacct to record why (then: REQUEUED); only
# a lagging slurmdbd makes it wait: the copy is cancelled at once, the next attempt starts at most this much later


@dataclass(frozen=True)
class RetryPolicy:
    """Which failures a trial is retried after, and the bounds of a trial's life.

    `on`: failure kinds retried (each counts against max_retries): submission (sbatch refused), node_fail
    (NODE_FAIL, BOOT_FAIL), preempted (PREEMPTED with PreemptMode=CANCEL, or a preemption requeue), timeout
    (the time limit, only useful when the job checkpoints: it resumes from its last checkpoint). A requeue
    SLURM itself decided (scontrol requeue, preemption by requeue) is always followed. `max_attempts` bounds
    all attempts of a trial whatever the reason, `max_hours` their summed wall time (None: no bound)."""
    max_retries: int = 2
    on: tuple = ("submission", "node_fail", "preempted")
    max_attempts: int = 10
    max_hours: float | None = None

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

    @classmethod
    def from_dict(cls, data: dict | None) -> "RetryPolicy":
        data = dict(data or {})
        if True in data and "on" not in data:  # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean true
            data["on"] = data.pop(True)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ValueError(f"retries: unknown key {unknown[0]!r}: valid keys are {', '.join(valid)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {"max_retries": self.max_retries, "on": list(self.on), "max_attempts": self.max_attempts,
                "max_hours": self.max_hours}

    def allows(self, kind: str | None, retries_used: int, attempts: int, hours: float = 0.0,
               follow: bool = False) -> bool:
        """Whether a trial whose attempt just ended this way gets another attempt. `follow`: SLURM requeued it
        (preemption, scontrol requeue): followed whatever `on` says, bounded by max_attempts and max_hours."""
        if kind is None or attempts >= self.max_attempts or (self.max_hours and hours >= self.max_hours):
            return False
        return follow or (kind in self.on and retries_used < self.max_retries)


@dataclass
class Task:
    """One unit of work: `fn(*args)` in a job. `key` names it in the client's journal; `folder` is where the
    job writes (its stop records); `result_file`, if given, is a result JSON the job writes last."""
    key: str
    fn: Callable
    args: tuple
    attempt: int = 0
    folder: str | None = None
    result_file: str | None = None

    def next(self) -> "Task":
        return dataclasses.replace(self, attempt=self.attempt + 1)


@dataclass
class Attempt:
    """A submitted task: its job, and what the scheduler last said about it."""
    task: Task
    job: Any
    job_id: str
    submitted: float = field(default_factory=time.time)
    state: str = "PENDING"       # the scheduler's state: PENDING, RUNNING, ... (local: RUNNING)
    reason: str = ""             # why a pending job waits (SLURM's reason)
    node: str = ""
    ran: bool = False            # seen RUNNING at least once
    final_since: float | None = None  # first poll that saw it final without a result (grace for NFS)
    history: list = field(default_factory=list)  # sacct -D records: one state per requeue
    exit_code: str = ""          # sacct's ExitCode (code:signal)
    requeued_since: float | None = None  # first poll that saw SLURM requeue it (its cause may lag in sacct)

    @property
    def pending(self) -> bool:
        return self.state in WAITING


@dataclass
class Outcome:
    """How an attempt ended. `status` "done": the job returned `result`; "failed": it did not (`reason`)."""
    status: str
    result: Any = None
    reason: str | None = None
    state: str = ""               # final scheduler state (SLURM) or FINISHED (local, debug)
    retry: str | None = None      # the retry kind this failure is, if any
    follow: bool = False          # SLURM requeued it: the task goes on in a fresh job


class Dispatcher:
    def __init__(self, kind: str, folder: str | Path, resources: Resources | None = None, *, job_name: str,
                 code_dir: str | Path | None = None, record: Callable[..., None] | None = None,
                 result_grace_s: float = 10.0):
        self.folder = Path(folder)
        self.resources = resources or Resources()
        self.job_name = job_name
        self.executor = make_executor(kind, self.folder, self.resources, job_name=job_name, code_dir=code_dir)
        self.kind = self.executor.cluster
        self.record = record or (lambda event, **data: None)
        self.grace_s = 0.0 if self.kind != "slurm" else result_grace_s
        self.polls = 0

    # ------------------------------------------------------------------------------------------- submit
    def submit(self, tasks: list[Task]) -> list[Attempt]:
        """Record the intent, submit (one job array on SLURM), record the job ids. A batch that sbatch refuses
        is submitted one task at a time; a task that cannot be submitted gets a failed stand-in attempt."""
        if not tasks:
            return []
        batch = uuid.uuid4().hex[:10]
        self.record("dispatch", batch=batch, keys=[t.key for t in tasks], attempts={t.key: t.attempt for t in tasks})
        jobs = self._submit_jobs(tasks, batch)
        attempts = [Attempt(t, job, str(job.job_id)) for t, job in zip(tasks, jobs)]
        self.record("submitted", batch=batch, jobs={a.task.key: a.job_id for a in attempts if a.job_id != "none"})
        return attempts

    def _submit_jobs(self, tasks: list[Task], batch: str) -> list:
        self.executor.update_parameters(name=f"{self.job_name}.{batch}")
        if len(tasks) > 1:
            try:
                with self.executor.batch():
                    jobs = [self.executor.submit(t.fn, *t.args) for t in tasks]
                return jobs
            except Exception:  # sbatch refused the array: each task on its own
                pass
        return [self._submit_one(t) for t in tasks]

    def _submit_one(self, task: Task):
        try:
            return self.executor.submit(task.fn, *task.args)
        except Exception as e:  # sbatch refused, controller unreachable...
            return Refused(f"submission failed: {_first_line(e)}")

    def reattach(self, task: Task, job_id: str) -> Attempt:
        """The attempt of a job started by an earlier process (its id from the journal)."""
        if self.kind == "slurm":
            job = submitit.SlurmJob(folder=self.folder, job_id=job_id)
        elif self.kind == "local":
            from slurm.local import LocalJob
            job = LocalJob(folder=self.folder, job_id=job_id)
        else:
            return self.submit([task])[0]  # a debug job ran inside the dead process: run it again
        return Attempt(task, job, job_id)  # requeues of a re-attached job are read from sacct -D's records

    def recover(self, batch: str, tasks: list[Task]) -> dict[str, str]:
        """{key: job_id} of jobs submitted in `batch` that no journal names (a crash between submitting and
        recording). SLURM: the array named `<job_name>.<batch>`; local: the submitted pickles' arguments."""
        if self.kind == "slurm":
            ids = self._slurm_ids_by_name(f"{self.job_name}.{batch}")
            if len(ids) == 1 and len(tasks) == 1 and "_" not in ids[0]:
                return {tasks[0].key: ids[0]}
            found = {}
            for job_id in ids:
                base, _, index = job_id.partition("_")
                if index.isdigit() and int(index) < len(tasks):
                    found[tasks[int(index)].key] = job_id
            return found
        if self.kind == "local":
            return self._local_ids_by_args(tasks)
        return {}

    def _slurm_ids_by_name(self, name: str) -> list[str]:
        ids = set()
        for cmd in (["squeue", "-h", "-r", "--states=all", "-n", name, "-o", "%i"],
                    ["sacct", "-n", "-X", "-P", "-S", "now-7days", "--name", name, "-o", "JobID"]):
            out = run(cmd)
            ids |= {line.strip() for line in (out or "").splitlines() if line.strip() and "[" not in line}
        return sorted(ids)

    def _local_ids_by_args(self, tasks: list[Task]) -> dict[str, str]:
        found = {}
        for pickle in self.folder.glob("*_submitted.pkl"):
            job_id = pickle.name.split("_")[0]
            try:
                submission = submitit.helpers.DelayedSubmission.load(pickle)
            except Exception:  # noqa: BLE001 - half-written or foreign: not ours to adopt
                continue
            for t in tasks:
                if type(submission.function) is type(t.fn) and submission.args == tuple(t.args):
                    found[t.key] = job_id
        return found

    def cancel(self, attempt: Attempt) -> None:
        """Stop the attempt's job (SLURM: scancel, which signals SIGTERM first; local: SIGTERM to the job)."""
        job = attempt.job
        if self.kind == "slurm" and attempt.job_id != "none":
            run(["scancel", attempt.job_id])
        elif self.kind == "local" and hasattr(job, "alive") and job.alive():
            try:
                os.kill(int(attempt.job_id), signal.SIGTERM)  # the controller forwards it to its tasks
            except (ProcessLookupError, PermissionError, ValueError):
                pass

    # ------------------------------------------------------------------------------------------- poll
    def poll(self, attempts: Iterable[Attempt]) -> list[tuple[Attempt, Outcome]]:
        """Refresh every attempt's state (one sacct + one squeue call for all SLURM jobs) and settle the ended
        ones. Never blocks on a missing result."""
        attempts = list(attempts)
        self.polls += 1
        if self.kind == "slurm":
            info = slurm_snapshot([a.job_id for a in attempts if a.job_id != "none"])
            for a in attempts:
                if a.job_id in info:
                    _apply(a, info[a.job_id])
        settled = []
        for a in attempts:
            outcome = self._settle(a)
            if outcome is not None:
                settled.append((a, outcome))
        return settled

    def _settle(self, a: Attempt) -> Outcome | None:
        if isinstance(a.job, Refused):
            return Outcome("failed", reason=a.job.reason, state="SUBMISSION_FAILED", retry="submission")
        if self.kind == "slurm":
            return self._settle_slurm(a)
        if self.kind == "local":
            alive = a.job.alive()
            a.state = "RUNNING" if alive else "FINISHED"
            a.ran = True
            if alive and not a.job.paths.result_pickle.exists():
                return None
            return self._ended(a, "FINISHED")
        return self._ended(a, "FINISHED")  # debug: runs now, in this process

    def _settle_slurm(self, a: Attempt) -> Outcome | None:
        requeued = a.requeued_since is not None or a.state in REQUEUE_STATES or \
            (a.state in WAITING and (a.ran or len(a.history) > 1))
        if requeued:  # SLURM will run it again: go on in a fresh job instead (see the module docstring)
            if a.requeued_since is None:
                a.requeued_since = time.time()
                self.cancel(a)  # at once: SLURM's copy must never run
            # what ended the attempt: the state sacct recorded for the run before the requeue. Accounting may
            # lag squeue's PENDING by a poll or more (a NODE_FAIL not recorded yet): wait for it, a bounded time
            earlier = a.history[:-1]
            before = next((s for s in reversed(earlier) if s in FINAL), None) or \
                next((s for s in reversed(earlier) if s in REQUEUE_STATES), None)
            if before is None:
                if time.time() - a.requeued_since < REQUEUE_CAUSE_WAIT_S:
                    return None
                before = "REQUEUED"
            kind = FINAL.get(before) or "requeued"
            # a node failure counts against the retry policy; a preemption or a requeue asked for is followed
            return Outcome("failed", reason=f"job {a.job_id} was requeued by SLURM (after {before}): continued in "
                           "a fresh job", state=a.state, retry=kind, follow=kind != "node_fail")
        if a.state not in FINAL:
            return None
        return self._ended(a, a.state)

    def _ended(self, a: Attempt, state: str) -> Outcome | None:
        """An attempt whose job is over: its result, the folder's result, or why there is none."""
        task0 = a.job.task(0) if getattr(a.job, "num_tasks", 1) > 1 else a.job
        if self.kind == "debug" or task0.paths.result_pickle.exists():
            try:
                return Outcome("done", result=task0.result(), state=state)
            except (FailedJobError, UncompletedJobError) as e:
                why = f"job {a.job_id} raised: {_last_error_line(e)}"
            except Exception as e:  # noqa: BLE001 - an unreadable result is this attempt's failure
                why = f"job {a.job_id}: {type(e).__name__}: {_first_line(e)}"
            return self._failed(a, state, why)
        folder_result = _read_json(a.task.result_file) if a.task.result_file else None
        if folder_result and folder_result.get("status") == "ok":
            return Outcome("done", result=folder_result, state=state)  # it finished before it was stopped
        now = time.time()
        if a.final_since is None:
            a.final_since = now
        grace = self.grace_s if state in ("COMPLETED", "FAILED") else min(self.grace_s, 2.0)  # killed: none coming
        if now - a.final_since < grace:
            return None  # the result pickle may still be on its way (NFS): look again at the next poll
        return self._failed(a, state, f"job {a.job_id} ended without a result ({self._cause(a, state)})")

    def _failed(self, a: Attempt, state: str, reason: str) -> Outcome:
        stop = self._stop_record(a)
        retry = FINAL.get(state)
        if stop:  # the job said why it stopped: lead with that
            why = "the time limit is near" if stop.get("signal") == "SIGUSR2" else "cancelled, requeued or preempted"
            saved = f"checkpoint of step {stop.get('step')} saved" if stop.get("saved") else "no checkpoint saved"
            reason = f"job {a.job_id} stopped on {stop.get('signal')} ({why}; {saved}); state {state}"
            if stop.get("signal") == "SIGUSR2":
                retry = "timeout"  # SLURM sends USR2 signal_delay_s before the time limit (our sbatch --signal)
        if self.kind == "slurm" and state not in ("COMPLETED", "FAILED", "CANCELLED"):
            run(["scancel", a.job_id])  # a copy SLURM may still requeue must never run after this
        return Outcome("failed", reason=reason, state=state, retry=retry)

    def _stop_record(self, a: Attempt) -> dict | None:
        if not a.task.folder:
            return None
        records = [r for r in read_attempts(a.task.folder) if str(r.get("job_id")) == a.job_id and r.get("signal")]
        return records[-1] if records else None

    def _cause(self, a: Attempt, state: str) -> str:
        parts = [f"state {state}"]
        if self.kind == "local":
            codes = a.job.exit_codes() or []
            code = next((c for c in codes if c not in (0, None)), codes[0] if codes else None)
            parts.append(exit_text(code) if code is not None else "no exit status recorded")
        elif a.exit_code:
            parts.append(slurm_exit_text(a.exit_code))
        tail = last_stderr_line(a.job)
        if state == "OUT_OF_MEMORY" or (tail and any(m in tail.lower() for m in OOM_MARKS)):
            parts.append("out of memory: ask for more memory (resources.mem_gb) or lower the batch")
        if tail:
            parts.append(f"last stderr line: {tail}")
        return "; ".join(parts)


def _apply(a: Attempt, info: SlurmInfo) -> None:
    if a.ran and not info.live and (not info.history or info.history == ["PENDING"]):
        # a job that ran, that squeue does not hold (any more), and that accounting names not at all or as its
        # one PENDING record: sacct lags the start (slurmdbd is behind on a busy controller). Unknown this poll,
        # not PENDING again, which would look like a requeue (a requeued job is live in squeue, and sacct -D
        # keeps the record of the run it ended)
        return
    a.state, a.reason, a.history = info.state, info.reason, info.history or a.history
    a.node = info.node or a.node
    a.exit_code = info.exit_code
    if info.state in LIVE:
        a.ran = True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _last_error_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _read_json(path: str | None) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, TypeError):
        return None
    return data if isinstance(data, dict) else None


class Refused:
    """Stands in for a job that could not be submitted: settled at once as a failed submission."""
    job_id = "none"

    def __init__(self, reason: str):
        self.reason = reason

