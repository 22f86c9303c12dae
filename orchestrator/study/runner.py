"""A resumable set of jobs beside a study (downstream evaluations, confirmation retrains): the loop they share.

    items, batches = fold(journal, item_event="evaluation")     # what an earlier run journaled
    jobs = JobSet(dispatcher, journal, policy, task_of=lambda item: Task(...), log=print)
    jobs.run([item for item in items.values() if item.status is None], on_done=record, poll_s=5)

Each item is journaled (its own event, e.g. "evaluation" or "retrain") before its job is submitted; the
dispatcher journals the batch's intent and job ids (slurm/dispatch.py). `run` re-attaches the items whose job
still runs, finds the jobs a crash left unjournaled, submits the rest, follows them with the study's retry
policy, and calls `on_done(item, outcome)` for each settled one (the client journals its result).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from orchestrator.study.journal import Journal
from slurm.dispatch import Dispatcher, Outcome, RetryPolicy, Task


@dataclass
class Item:
    key: str
    data: dict                  # the client's journaled record of the item (spec, trial, seed...)
    job_id: str | None = None
    status: str | None = None   # None while pending or running; the client's status once done
    reason: str | None = None
    result: dict = field(default_factory=dict)
    attempt: int = 0
    retries: int = 0
    batch: str | None = None
    logged: bool = False


def fold(journal: Journal, item_event: str) -> tuple[str | None, dict[str, Item], dict[str, list]]:
    """(executor kind, {key: Item}, {batch: keys}) from a job-set journal."""
    kind, items, batches = None, {}, {}
    for r in journal.records():
        event = r.get("event")
        if event == "start":
            kind = r.get("executor", kind)
        elif event == item_event:
            items[r["key"]] = Item(r["key"], r)
        elif event == "dispatch":
            batches[r["batch"]] = list(r["keys"])
            for key in r["keys"]:
                item = items[key]
                item.batch, item.job_id = r["batch"], None
                item.attempt = r.get("attempts", {}).get(key, item.attempt)
        elif event == "submitted":
            for key, job_id in (r.get("jobs") or {r["key"]: r["job_id"]}).items():
                items[key].job_id, items[key].batch = job_id, None
        elif event == "result":
            item = items[r["key"]]
            item.status, item.reason = r["status"], r.get("reason")
            item.result = {k: v for k, v in r.items() if k not in ("event", "time", "key", "status", "reason")}
        elif event == "retry":
            item = items[r["key"]]
            if r.get("fresh"):  # asked for again (e.g. --retry-failed): a new evaluation of the same item
                item.status, item.reason, item.job_id, item.logged, item.retries = None, None, None, False, 0
            else:
                item.retries += 0 if r.get("follow") else 1
        elif event == "logged":
            items[r["key"]].logged = True
    return kind, items, batches


class JobSet:
    def __init__(self, dispatcher: Dispatcher, journal: Journal, policy: RetryPolicy,
                 task_of: Callable[[Item], Task], log=print, what: str = "job"):
        self.dispatcher, self.journal, self.policy = dispatcher, journal, policy
        self.task_of, self.log, self.what = task_of, log, what

    def run(self, todo: list[Item], items: dict[str, Item], batches: dict[str, list],
            on_done: Callable[[Item, Outcome], None], poll_s: float,
            label: Callable[[Item], str] = lambda item: item.key) -> None:
        """Follow `todo` (items of `items`, every item journaled so far) until each is settled."""
        live = self._start(todo, items, batches, label)
        while live:
            settled = self.dispatcher.poll(live.values())
            for attempt, outcome in settled:
                item = next(i for i in todo if i.key == attempt.task.key)
                del live[item.key]
                failed = outcome.status != "done" or not _ok(outcome.result)
                if failed and self.policy.allows(outcome.retry, item.retries, item.attempt + 1, follow=outcome.follow):
                    self.journal.append("retry", key=item.key, kind=outcome.retry, follow=outcome.follow,
                                        reason=outcome.reason)
                    item.retries += 0 if outcome.follow else 1
                    item.attempt += 1
                    self.log(f"{label(item)}: {outcome.reason}; {self.what} attempt {item.attempt + 1} submitted")
                    live[item.key] = self.dispatcher.submit([self.task_of(item)])[0]
                    continue
                on_done(item, outcome)
            if not settled:
                time.sleep(poll_s)

    def _start(self, todo: list[Item], items: dict[str, Item], batches: dict[str, list], label) -> dict:
        """Re-attach the items whose job runs, find those a crash left unjournaled, submit the rest."""
        live, fresh, found = {}, [], {}
        for batch, keys in batches.items():
            if any(item.batch == batch for item in todo):  # the array's tasks are in the batch's key order
                ids = self.dispatcher.recover(batch, [self.task_of(items[k]) for k in keys])
                if ids:
                    self.journal.append("submitted", batch=batch, jobs=ids)
                found.update(ids)
        for item in todo:
            job_id = item.job_id or found.get(item.key)
            if job_id:
                self.log(f"{label(item)}: re-attached to {self.what} job {job_id}")
                live[item.key] = self.dispatcher.reattach(self.task_of(item), job_id)
            else:
                fresh.append(item)
        for item, attempt in zip(fresh, self.dispatcher.submit([self.task_of(i) for i in fresh])):
            item.job_id = attempt.job_id
            live[item.key] = attempt
            self.log(f"{label(item)}: {self.what} job {attempt.job_id} submitted")
        return live


def _ok(result) -> bool:
    return isinstance(result, dict) and result.get("status") == "ok"


def locked_run(workdir: str, study: str, lock: str, what: str, run: Callable[[], object]):
    """`run()` on an existing study under the lock `<workdir>/<study>/<lock>` (evaluate and confirm: one
    process per study and subcommand); a missing study or a held lock is a one-line ConfigError."""
    from orchestrator.config import ConfigError
    from orchestrator.study.lock import LockError, StudyLock

    folder = Path(workdir) / study
    if not (folder / "journal.jsonl").exists():
        raise ConfigError(f"no study {study!r} under {workdir}: check the name and --workdir")
    try:
        with StudyLock(folder / lock, what=f"{what} of study {study!r}"):
            return run()
    except LockError as e:
        raise ConfigError(str(e)) from None
