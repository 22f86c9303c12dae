"""The study loop: ask the searcher, dispatch jobs, follow them, tell results, track, journal.

    python -m orchestrator --algo nomad            # the embedded default (tiny study, local executor)

The loop knows four protocols only: the searcher's ask/tell, the dispatcher's submit/poll
(slurm/dispatch.py: states, results, requeues; no executor kinds here), the tracker (MLflow through a durable
outbox), and the journal. Every decision is journaled before it is acted on; `--resume` folds the journal
back: finished results are replayed into a fresh searcher, jobs still running are re-attached by their job
id (or found by their batch's name when a crash came between submitting and journaling them), never
resubmitted, and the budget is finished. A failed evaluation is a recorded failed trial told to the searcher
as a failure; a trial is retried (a fresh attempt in the same folder, resuming from its checkpoint) only as
`retries:` allows. One process runs a study at a time (orchestrator/study/lock.py, taken by `run_study`).

Trials that fill several free slots at once (TPE's first asks, a NOMAD poll) go out as one job array.
Jobs run the code of `<study folder>/code/`, a copy of the project made when the study started.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from jobs.contract import METRICS_FILE, RESULT_FILE, TrialResult
from jobs.tracking_store import ensure_local_store, network_store_warning
from evaluation.job import HeldoutTrial
from jobs.entry import FinetuneTrial, ObjectiveTrial
from orchestrator.study.checks import check_objective
from orchestrator.config import ConfigError, StudyConfig, space_to_dict
from orchestrator.study.curves import Follower
from orchestrator.study.journal import Journal, StudyState, TrialState
from orchestrator.study.lock import StudyLock
from orchestrator.study.progress import Progress
from orchestrator.search.criteria import Judge, searcher_criteria
from orchestrator.study.pruning import Pruning
from orchestrator.study.end import already_ended, finish
from orchestrator.study.warm import finished_trials, warm_sources
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.tracking.tracker import PARENT, Tracker, trial_key
from slurm.dispatch import Attempt, Dispatcher, Outcome, Task
from slurm.executors import snapshot_code

PLOT_EVERY_S = 60.0  # refresh the parent run's plots at most this often while the study runs


class StudyError(RuntimeError):
    """The study cannot go on (not an evaluation failure): the message says why and what to do."""



@dataclass
class Live:
    trial: TrialState
    attempt: Attempt
    follow: Follower = None  # the trial's metrics.jsonl, read as it grows
    started: float = field(default_factory=time.time)

    def __post_init__(self):
        self.follow = self.follow or Follower(Path(self.trial.out) / METRICS_FILE)


class Study:
    def __init__(self, config: StudyConfig, resume: bool = False, out=None):
        self.config, self.folder, self.out = config, config.folder, out or sys.stdout
        self.journal = Journal(self.folder / "journal.jsonl")
        self.state = self._open(resume)
        self.space = config.space
        kind = (self.state.config or {}).get("executor_resolved") or config.executor
        self.code = self.folder / "code"  # made by _start, before the first submission
        self.dispatcher = Dispatcher(kind, self.folder / "submitit", config.resources, job_name=config.study,
                                     code_dir=self.code, record=self.journal.append)
        self.kind = self.dispatcher.kind
        if self.kind == "local":  # local jobs share this machine: honour cpus_per_task as their thread count
            os.environ.setdefault("LORA_HPO_THREADS", str(config.resources.cpus_per_task))
        self.uid = self.state.study_uid or uuid.uuid4().hex
        self.tracker = Tracker(config.tracking(), config.study, self.folder, self.uid, log=self._warn)
        self.searcher = make_searcher(config.algo, self.space, budget=config.budget, parallel=config.parallel,
                                      seed=config.seed, options=config.searcher_options,
                                      **searcher_criteria(config))
        self.pruning = Pruning(config, self.state)
        self.judge = Judge(config)
        try:
            self.warm = warm_sources(config)
        except ConfigError as e:
            raise StudyError(str(e)) from None
        self.live: dict[int, Live] = {}
        self.progress = Progress(config, self.out)
        self.best: TrialState | None = None
        self.untracked: list = []  # finished trials not yet queued for MLflow
        self.plotted_at = 0.0
        self.busy_s = 0.0  # slot-seconds of finished attempts (for slot_utilization)
        self.t0 = time.time()

    def _open(self, resume: bool) -> StudyState:
        if self.journal.exists() and not resume:
            raise StudyError(f"study {self.config.study!r} already exists in {self.folder}: "
                             "add --resume to continue it, or pick another --study name")
        if resume and not self.journal.exists():
            raise StudyError(f"nothing to resume: no journal at {self.journal.path}; drop --resume to start it")
        return self.journal.load()

    def _warn(self, message: str) -> None:
        print(message, file=self.out, flush=True)

    # ------------------------------------------------------------------------------------------- lifecycle
    def run(self) -> StudyState:
        if self.state.ended:
            return already_ended(self)
        try:
            self._start()
            self._loop()
        except BaseException:
            self.searcher.close()
            self.tracker.close()
            raise  # jobs keep running; --resume re-attaches them
        self.searcher.close()
        finish(self)
        return self.state

    def _start(self) -> None:
        resumed = self.state.config is not None
        if self.kind in ("slurm", "local"):  # a resumed study keeps the snapshot it started with
            snapshot_code(self.code)
        if not resumed:
            if self.config.function:
                try:
                    check_objective(self.config.function, self.code if self.kind != "debug" else None)
                except ValueError as e:
                    raise StudyError(str(e)) from None
            else:
                from jobs.data import DataError, prepare_splits  # torch-free: the splits are made once, here
                try:
                    prepare_splits(self.config.trial_spec(self.space.default_point(), "unused").data)
                except DataError as e:
                    raise StudyError(f"the training data cannot be prepared: {e}") from None
            config = {**self.config.to_dict(), "executor_resolved": self.kind}
            ensure_local_store(self.config.tracking())  # a SQLite store is made whole before anything is written
            warning = network_store_warning(self.config.tracking())
            if warning:
                self._warn(warning)
            self.journal.append("start", config=config, study_uid=self.uid)
            self.state.config, self.state.study_uid = config, self.uid
        self.tracker.start_parent(self.state.config, space_to_dict(self.space))
        if self.kind in ("slurm", "local"):
            self.tracker.tag(PARENT, code_snapshot=str(self.code.resolve()))
        self.tracker.tag(PARENT, searcher_profile=getattr(self.searcher, "profile", None))
        if self.warm:  # before the first ask (and before a resume's replay): told, never run, no budget
            self.searcher.warm_start([self._observation(t, trial_id=None) for t in finished_trials(self.warm)])
            self.tracker.tag(PARENT, warm_start_from=json.dumps(
                [{"study": name, "parent_run_id": state.parent_run_id, "trials": len(state.finished)}
                 for name, state in self.warm]))
        if resumed:
            self._adopt()
        self.tracker.flush()

    def _adopt(self) -> None:
        """After a restart: replay finished trials into the searcher, re-attach (or find) the running ones."""
        finished = sorted(self.state.finished, key=lambda t: t.trial)
        running = sorted(self.state.running, key=lambda t: t.trial)
        history = [self._observation(t) for t in finished]
        self.searcher.replay(history, [Pending(t.point, t.trial) for t in running])
        for t in sorted(self.state.trials.values(), key=lambda t: t.trial):
            self.tracker.start_child(t.trial, t.point, t.encoded, self.config.algo)  # queued once, ever
        for t in finished:
            self._update_best(t)
            self.tracker.finish_child(t.trial, t.status, t.value, t.summary, t.reason, t.out)
        found = self._recover(running)
        fresh = []
        for t in running:
            job_id = t.job_id or found.get(str(t.trial))
            if job_id:
                attempt = self.dispatcher.reattach(self._task(t), job_id)
                self.live[t.trial] = Live(t, attempt)
                if t.pruned:  # pruned before the crash: make sure its job stops
                    self.dispatcher.cancel(attempt)
            else:
                fresh.append(t)
        self._dispatch(fresh)

    def _recover(self, running: list[TrialState]) -> dict[str, str]:
        """Jobs of batches dispatched but never journaled as submitted (a crash in between): found, adopted."""
        found = {}
        for batch, keys in self.state.batches.items():
            waiting = [t for t in running if t.batch == batch]
            if not waiting:
                continue
            tasks = [self._task(self.state.trials[int(k)]) for k in keys]
            ids = self.dispatcher.recover(batch, tasks)
            if ids:
                self.journal.append("submitted", batch=batch, jobs=ids)
            found.update(ids)
        return found

    def _loop(self) -> None:
        while True:
            acted = self._fill_slots()
            self._track()
            if not self.live:
                if self.searcher.finished or self._used() >= self.config.budget:
                    return
                if not acted:
                    raise StudyError(f"searcher {self.config.algo} proposes nothing while no evaluation runs; "
                                     "the study cannot progress (report this as a bug)")
                continue
            acted |= self._poll()
            self.progress.update(self.state, self.live, self.best, self.tracker.outbox.status())
            if not acted:
                time.sleep(self.config.poll_s)

    def _used(self) -> int:
        return len(self.state.trials)

    def _fill_slots(self) -> bool:
        fresh = []
        while len(self.live) + len(fresh) < self.config.parallel and self._used() < self.config.budget:
            suggestion = self.searcher.ask()
            if suggestion is None:
                break
            t = TrialState(suggestion.trial_id, suggestion.point, _plain(suggestion.encoded),
                           out=str((self.folder / "trials" / f"{suggestion.trial_id:04d}").resolve()))
            self.journal.append("trial", trial=t.trial, point=t.point, encoded=t.encoded, out=t.out)
            self.state.trials[t.trial] = t
            self.tracker.start_child(t.trial, t.point, t.encoded, self.config.algo)
            prior, infeasible = self.judge.before(t.point)
            if infeasible:  # known before training: no job, no GPU time; recorded and told like a failure
                self._record(t, TrialResult("infeasible", None, infeasible, prior))
                continue
            fresh.append(t)
        self._dispatch(fresh)
        return bool(fresh)

    # ------------------------------------------------------------------------------------------- jobs
    def _task(self, t: TrialState) -> Task:
        if self.config.function:
            fn, args = ObjectiveTrial(), (self.config.function, t.point, t.out)
        elif self.config.heldout:
            fn, args = HeldoutTrial(), (self.config.trial_spec(t.point, t.out).to_dict(),
                                        {**self.config.heldout, "evaluation": self.config.evaluation})
        else:
            fn, args = FinetuneTrial(), (self.config.trial_spec(t.point, t.out).to_dict(),)
        return Task(str(t.trial), fn, args, attempt=t.attempt, folder=t.out, result_file=str(Path(t.out) / RESULT_FILE))

    def _dispatch(self, trials: list[TrialState]) -> None:
        for t, attempt in zip(trials, self.dispatcher.submit([self._task(t) for t in trials])):
            t.job_id, t.started_at = attempt.job_id, t.started_at or time.time()
            self.live[t.trial] = Live(t, attempt)
            self._tag_job(t)

    def _poll(self) -> bool:
        settled = self.dispatcher.poll([lv.attempt for lv in self.live.values()])
        for lv in self.live.values():
            self._follow_curve(lv)
        by_attempt = {id(lv.attempt): lv for lv in self.live.values()}
        for attempt, outcome in settled:
            self._settle(by_attempt[id(attempt)], outcome)
        return bool(settled)

    def _follow_curve(self, lv: Live) -> None:
        fresh = lv.follow.poll()
        if fresh:
            self.tracker.log_curve(lv.trial.trial, fresh)
        decision = self.pruning.observe(lv.trial, lv.follow.partial) if fresh else None
        if decision is not None:  # journaled before the job is stopped: a restart keeps the decision
            self.journal.append("prune", trial=lv.trial.trial, decision=decision.to_dict())
            lv.trial.pruned = decision.to_dict()
            self.dispatcher.cancel(lv.attempt)
            self.progress.note(f"trial {lv.trial.trial}: pruned at {decision.fraction:.0%} of training "
                               f"({decision.reason})")

    def _settle(self, lv: Live, outcome: Outcome) -> None:
        t, a = lv.trial, lv.attempt
        self.busy_s += time.time() - max(a.submitted, lv.started)
        result = TrialResult.from_dict(outcome.result) if outcome.status == "done" else \
            TrialResult.failed(outcome.reason or "the job failed")
        hours = (time.time() - (t.started_at or a.submitted)) / 3600
        if t.pruned and not result.ok:  # stopped by the pruner (a job that finished first keeps its result)
            result = pruned_result(t, hours)
        elif not result.ok and self.config.retries.allows(outcome.retry, t.retries, t.attempt + 1, hours,
                                                           follow=outcome.follow):
            self._retry(lv, outcome, result.reason)
            return
        self._follow_curve(lv)
        history = t.history + [{"job_id": a.job_id, "states": a.history or [outcome.state]}]
        self.tracker.tag(trial_key(t.trial), slurm_state=outcome.state if self.kind == "slurm" else None,
                         slurm_node=a.node or None, attempts=len(history),
                         attempt_history=json.dumps([{"job_id": h.get("job_id"), "states": h.get("states"),
                                                      "reason": h.get("reason")} for h in history]))
        del self.live[t.trial]
        self._record(t, result)

    def _record(self, t: TrialState, result: TrialResult) -> None:
        """A finished trial: judged (constraints, objectives), journaled, told, queued for MLflow."""
        summary = result.summary()
        if self.judge.active:
            verdict = self.judge.after(result.status, result.value, summary)
            summary.update({f"c.{k.metric}": v for k, v in zip(self.judge.constraints, verdict.constraints or [])},
                           feasible=verdict.feasible)
            if verdict.missing:  # told as a failure: say why, where a person looks
                summary["unjudged"] = f"the trial did not report {', '.join(verdict.missing)}"
        self.journal.append("result", trial=t.trial, status=result.status, value=result.value, reason=result.reason,
                            summary=summary)
        t.status, t.value, t.reason, t.summary = result.status, result.value, result.reason, summary
        t.finished_at = time.time()
        if t.status == "ok":
            self.pruning.completed(t.trial, t.value)
        self._tell(t)
        self._update_best(t)
        self.untracked.append((t, len(self.state.finished), self.best))  # MLflow after the slot is refilled
        self.progress.event(t)

    def _tell(self, t: TrialState) -> None:
        if self.judge.active:  # the searcher takes the objectives (one or two) and the constraint values
            verdict = self.judge.after(t.status, t.value, t.summary)
            self.searcher.tell(t.trial, verdict.told, constraints=verdict.constraints)
        else:
            self.searcher.tell(t.trial, self._told(t))

    def _retry(self, lv: Live, outcome: Outcome, reason: str) -> None:
        """A fresh attempt of the same trial, in the same folder: it resumes from the last checkpoint."""
        t, a = lv.trial, lv.attempt
        self.journal.append("retry", trial=t.trial, attempt=t.attempt, job_id=a.job_id, kind=outcome.retry,
                            follow=outcome.follow, reason=reason)
        t.history.append({"attempt": t.attempt, "job_id": a.job_id, "kind": outcome.retry, "reason": reason,
                          "states": a.history or [outcome.state]})
        t.retries += 0 if outcome.follow else 1
        t.attempt += 1
        self.tracker.tag(trial_key(t.trial), **{f"retry_{t.attempt}": reason})
        self.progress.note(f"trial {t.trial}: {reason}; attempt {t.attempt + 1} submitted")
        [lv.attempt] = self.dispatcher.submit([self._task(t)])
        lv.started = time.time()
        t.job_id = lv.attempt.job_id
        self._tag_job(t)

    def _tag_job(self, t: TrialState) -> None:
        self.tracker.tag(trial_key(t.trial), job_id=t.job_id, executor=self.kind,
                         slurm_job_id=t.job_id if self.kind == "slurm" else None)

    def _track(self, final: bool = False) -> None:
        """Queue finished trials for MLflow; refresh the parent run's plots now and then, and at the end."""
        for t, n, best in self.untracked:
            self.tracker.finish_child(t.trial, t.status, t.value, t.summary, t.reason, t.out)
            if t.status == "ok":
                self.tracker.log_metrics(PARENT, {"trial_val_loss": t.value}, step=n)
            if best is not None:
                self.tracker.log_best(n, best.value, best.trial, best.point)
            self.tracker.log_metrics(PARENT, {"slot_utilization": self.utilization(),
                                              "evaluations_in_flight": len(self.live)}, step=n)
        fresh, self.untracked = bool(self.untracked), []
        if (fresh and time.time() - self.plotted_at >= PLOT_EVERY_S) or final:
            from orchestrator.reports.plots import draw_plots  # matplotlib/plotly: only when drawing
            if draw_plots(self.state, self.folder / "plots"):
                self.tracker.log_plots(self.folder / "plots")
            self.plotted_at = time.time()
        self.tracker.flush()

    def utilization(self) -> float:
        """Busy slot-seconds over parallel x wall time since this process started."""
        now = time.time()
        busy = self.busy_s + sum(now - max(lv.attempt.submitted, lv.started) for lv in self.live.values()
                                 if not lv.attempt.pending)
        return busy / max(1e-9, self.config.parallel * (now - self.t0))

    def _observation(self, t: TrialState, trial_id="same") -> Observation:
        """A finished trial as the searcher learns it (replay, warm start): its told value(s) and constraints."""
        trial_id = t.trial if trial_id == "same" else trial_id
        if self.judge.active and t.status != "pruned":
            verdict = self.judge.after(t.status, t.value, t.summary)
            return Observation(t.point, verdict.told, trial_id, constraints=verdict.constraints)
        return Observation(t.point, self._told(t), trial_id)

    def _told(self, t: TrialState) -> float | None:
        """What the searcher hears of a finished trial: its loss, a failure (None), or for a pruned one what
        orchestrator/study/pruning.py says."""
        if t.status == "pruned":
            return self.pruning.told(t)
        return t.value if t.status == "ok" else None

    def _update_best(self, t: TrialState) -> None:
        """The best feasible trial (with two objectives: of the first one; the champion is picked at the end)."""
        feasible = t.summary.get("feasible", True) if self.judge.active else True
        if t.status == "ok" and feasible and (self.best is None or t.value < self.best.value):
            self.best = t

def pruned_result(t: TrialState, hours: float) -> TrialResult:
    """A pruned trial's record: no objective (it did not finish), the decision and the time it cost."""
    d = t.pruned
    return TrialResult("pruned", None, f"pruned at {d['fraction']:.0%} of training: {d['reason']}",
                       {"pruned_fraction": d["fraction"], "pruned_val_loss": d["value"], "total_s": hours * 3600})


def _plain(x):
    return json.loads(json.dumps(x, default=float)) if x is not None else None


def run_study(config: StudyConfig, resume: bool = False, out=None) -> StudyState:
    """Run (or resume) a study under its lock: one orchestrator per study."""
    os.makedirs(config.folder, exist_ok=True)
    with StudyLock(config.folder / "study.lock", what=f"study {config.study!r}"):
        return Study(config, resume, out).run()
