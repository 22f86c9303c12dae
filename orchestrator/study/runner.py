"""The one trial runner: journaled jobs that are submitted, followed, retried and settled, for every client.

    runner = Runner(dispatcher, journal, study.retries, task_of=lambda job: Task(...), log=print)
    runner.adopt(running_jobs, batches, jobs)      # after a restart: re-attach, find the unjournaled, submit the rest
    runner.submit([job, ...])                      # fresh work (each Job journaled by the client first)
    for job, attempt, outcome in runner.poll():    # settled work only: retries happen inside
        ...                                        # outcome.result: the task's typed result (ok or failed)

The study loop (orchestrator/study/loop.py), `evaluate` and `confirm` are its clients; they know neither
executor kinds nor scheduler states. What every client gets:

- **Intent journaled before submission.** The dispatcher journals each batch's `dispatch` (the keys and their
  attempt numbers) before it submits and `submitted` (the job ids) after; the client journals its own item
  (a trial, an evaluation, a retrain) before it hands the Job over. A crash in between leaves jobs no journal
  names: `adopt` finds them by their batch (slurm/dispatch.py recover) and follows them instead of submitting
  twice; a job whose id is journaled is re-attached.
- **One retry policy.** A failed attempt whose failure kind the policy allows (a refused submission, a node
  failure, a preemption, the time limit; a requeue SLURM itself decided is always followed) gets a fresh
  attempt in the same folder, journaled as `retry` first; it resumes from the folder's checkpoint. A failure
  that is not retried says why not in its reason (no retry left, not in retries.on...).
- **One fold.** `fold_job` (orchestrator/study/journal.py) reads the runner's events back into each `Job`, in
  the study's journal and in the journals of `evaluate` and `confirm` alike; `fold_items` folds a job set.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from orchestrator.study.journal import Job, Journal, fold_job
from slurm.dispatch import Attempt, Dispatcher, Outcome, RetryPolicy, Task


@dataclass
class Live:
    job: Job
    attempt: Attempt
    started: float = field(default_factory=time.time)


class Runner:
    def __init__(self, dispatcher: Dispatcher, journal: Journal, policy: RetryPolicy,
                 task_of: Callable[[Job], Task], log=print, what: str = "job",
                 may_retry: Callable[[Job, Outcome], bool] = lambda job, outcome: True,
                 on_retry: Callable[[Job, Outcome], None] = lambda job, outcome: None,
                 on_submitted: Callable[[Job, Attempt], None] = lambda job, attempt: None):
        self.dispatcher, self.journal, self.policy = dispatcher, journal, policy
        self.task_of, self.log, self.what = task_of, log, what
        self.may_retry, self.on_retry, self.on_submitted = may_retry, on_retry, on_submitted
        self.live: dict[str, Live] = {}
        self.busy_s = 0.0  # slot-seconds of ended attempts (for slot utilization)
        self.resources = dispatcher.backend.resources  # what each attempt's resource-hours are counted in

    # ------------------------------------------------------------------------------------------- start
    def adopt(self, running: list[Job], batches: dict[str, list], jobs: dict[str, Job]) -> None:
        """After a restart: find the jobs a crash left unjournaled, re-attach those with a job id, submit the
        rest (their intent was journaled, their job never submitted or never found)."""
        found = {}
        for batch, keys in batches.items():
            if any(j.batch == batch for j in running):  # an array's tasks are in the batch's key order
                ids = self.dispatcher.recover(batch, [self.task_of(jobs[str(k)]) for k in keys])
                if ids:
                    self.journal.append("submitted", batch=batch, jobs=ids)
                found.update(ids)
        fresh = []
        for j in running:
            job_id = j.job_id or found.get(j.key)
            if job_id:
                j.job_id, j.batch = job_id, None
                attempt = self.dispatcher.reattach(self.task_of(j), job_id)
                self.live[j.key] = Live(j, attempt)
                self.on_submitted(j, attempt)
            else:
                fresh.append(j)
        self.submit(fresh)

    def submit(self, jobs: list[Job]) -> None:
        now = time.time()
        for j, attempt in zip(jobs, self.dispatcher.submit([self.task_of(j) for j in jobs])):
            j.job_id, j.batch = (attempt.job_id if attempt.job_id != "none" else None), None
            j.started_at, j.submitted_at = j.started_at or now, now
            self.live[j.key] = Live(j, attempt)
            self.on_submitted(j, attempt)

    # ------------------------------------------------------------------------------------------- follow
    def poll(self) -> list[tuple[Job, Attempt, Outcome]]:
        """Refresh every live job; retry what the policy allows; return what settled for good."""
        settled = self.dispatcher.poll([lv.attempt for lv in self.live.values()])
        done = []
        for attempt, outcome in settled:
            lv = self.live[attempt.task.key]
            self.busy_s += time.time() - max(attempt.submitted, lv.started)
            j = lv.job
            spent = attempt.hours(self.resources)
            if not outcome.ok and self.may_retry(j, outcome) and self.policy.allows(
                    outcome.retry, j.retries, j.attempt + 1, j.hours, follow=outcome.follow):
                self._retry(lv, outcome, spent)
                continue
            del self.live[j.key]
            j.cost_h += spent
            why_not = None if outcome.ok or outcome.follow else \
                self.policy.why_not(outcome.retry, j.retries, j.attempt + 1, j.hours)
            if why_not:
                outcome.result.reason = f"{outcome.result.reason}; not retried: {why_not}"
            done.append((j, attempt, outcome))
        return done

    def _retry(self, lv: Live, outcome: Outcome, spent: float) -> None:
        """A fresh attempt of the same work, in the same folder: it resumes from the last checkpoint."""
        j, a = lv.job, lv.attempt
        self.journal.append("retry", key=j.key, attempt=j.attempt, job_id=a.job_id, kind=outcome.retry,
                            follow=outcome.follow, reason=outcome.reason, cost_h=spent)
        j.cost_h += spent
        j.history.append({"attempt": j.attempt, "job_id": a.job_id, "kind": outcome.retry, "reason": outcome.reason,
                          "follow": outcome.follow, "states": a.history or [outcome.state], "time": time.time()})
        j.retries += 0 if outcome.follow else 1
        j.attempt += 1
        self.on_retry(j, outcome)
        [lv.attempt] = self.dispatcher.submit([self.task_of(j)])
        lv.started = time.time()
        j.job_id = lv.attempt.job_id if lv.attempt.job_id != "none" else None
        self.on_submitted(j, lv.attempt)

    def cancel(self, key: str) -> None:
        if key in self.live:
            self.dispatcher.cancel(self.live[key].attempt)

    def running_hours(self) -> dict[str, float]:
        """{key: resource-hours} of every live job: its ended attempts and the running one so far."""
        return {k: lv.job.cost_h + lv.attempt.hours(self.resources) for k, lv in self.live.items()}

    def outage(self) -> str | None:
        return self.dispatcher.outage(lv.attempt for lv in self.live.values())

    def busy_until_now(self) -> float:
        """Busy slot-seconds: ended attempts, plus the running ones until now (pending jobs are not busy)."""
        now = time.time()
        return self.busy_s + sum(now - max(lv.attempt.submitted, lv.started) for lv in self.live.values()
                                 if not lv.attempt.pending)

    def run(self, on_done: Callable[[Job, Attempt, Outcome], None], poll_s: float) -> None:
        """Follow every live job until each has settled (the clients that only wait: evaluate, confirm)."""
        while self.live:
            done = self.poll()
            for job, attempt, outcome in done:
                on_done(job, attempt, outcome)
            if not done:
                time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------- job sets
@dataclass
class Item:
    """One unit of a job set (an evaluation, a retrain): the client's journaled record and its Job."""
    key: str
    data: dict                  # the client's journaled record of the item (spec, trial, seed...)
    job: Job = None
    status: str | None = None   # None while pending or running; ok | failed once done
    reason: str | None = None
    result: Any = None          # the typed result (jobs.contract), once done
    logged: bool = False

    def __post_init__(self):
        self.job = self.job or Job(self.key, (self.data.get("spec") or {}).get("out"))


@dataclass
class ItemSet:
    executor: str | None = None
    items: dict[str, Item] = field(default_factory=dict)
    batches: dict[str, list] = field(default_factory=dict)
    start: dict = field(default_factory=dict)   # the first start record
    registered: list = field(default_factory=list)

    @property
    def jobs(self) -> dict[str, Job]:
        return {k: i.job for k, i in self.items.items()}


def fold_items(journal: Journal, item_event: str, read_result: Callable[[dict], Any]) -> ItemSet:
    """A job set's journal folded: its executor, items (with their jobs and results) and dispatch batches."""
    s = ItemSet()

    def apply(r: dict) -> None:
        event = r["event"]
        if event == "start":
            s.executor = s.executor or r.get("executor")
            s.start = s.start or dict(r)
        elif event == item_event:
            s.items[r["key"]] = Item(r["key"], r)
        elif fold_job({k: i.job for k, i in s.items.items()}, r):
            if event == "dispatch":
                s.batches[r["batch"]] = list(r["keys"])
            elif event == "retry" and r.get("fresh"):
                item = s.items[r["key"]]
                item.status, item.reason, item.result, item.logged = None, None, None, False
        elif event == "result":
            item = s.items[r["key"]]
            item.result = read_result(r)
            item.status, item.reason = item.result.status, item.result.reason
        elif event == "logged":
            s.items[r["key"]].logged = True
        elif event == "registered":
            s.registered.append(r)

    journal.fold(apply)
    return s
