"""The study loop: ask the searcher, run trials, tell results, track, journal.

    python -m orchestrator --algo nomad            # the embedded default (tiny study, local executor)

The loop knows four protocols only: the searcher's ask/tell, the trial runner (orchestrator/study/runner.py:
submit, poll, retry, adopt; no executor kinds or scheduler states here), the tracker (MLflow through a durable
outbox) and the journal. Every decision is journaled before it is acted on; `--resume` folds the journal back:
finished results are replayed into a fresh searcher, jobs still running are re-attached (or found by their
batch when a crash came between submitting and journaling them), never resubmitted, MLflow is made to agree
with the journal again, and the budget is finished. A failed evaluation is a recorded failed trial told to the
searcher as a failure. One process runs a study at a time (orchestrator/study/lock.py, taken by `run_study`).
What only a search has stays here: ask/tell, pruning decisions, the best so far; the end of the study (the
champion, the registry, the summary) is orchestrator/study/end.py's.

Trials that fill several free slots at once (TPE's first asks, a NOMAD poll) go out as one job array.
Jobs run the code of `<study folder>/code/`, a copy of the project made when the study started.
"""
from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from evaluation.job import HeldoutTrial
from jobs.contract import METRICS_FILE, RESULT_FILE, TrialResult
from jobs.entry import FinetuneTrial, ObjectiveTrial
from jobs.tracking_store import ensure_local_store, network_store_warning
from orchestrator.config import ConfigError, StudyConfig, space_to_dict
from orchestrator.search.criteria import Judge, searcher_criteria
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.study import StudyError, end
from orchestrator.study.checks import check_objective
from orchestrator.study.curves import Follower
from orchestrator.study.journal import Job, Journal, StudyState, TrialState
from orchestrator.study.lock import StudyLock
from orchestrator.study.progress import Progress
from orchestrator.study.pruning import Pruning
from orchestrator.study.runner import Runner
from orchestrator.study.spend import Spend
from orchestrator.study.warm import finished_trials, warm_sources
from orchestrator.tracking.tracker import PARENT, Tracker, trial_key
from slurm.backend import BackendError, make_backend
from slurm.dispatch import Attempt, Dispatcher, Outcome, SchedulerOutage, Task
from slurm.executors import snapshot_code

PLOT_EVERY_S = 60.0  # refresh the parent run's plots at most this often while the study runs


class Study:
    def __init__(self, config: StudyConfig, resume: bool = False, out=None):
        self.config, self.folder, self.out = config, config.folder, out or sys.stdout
        self.journal = Journal(self.folder / "journal.jsonl")
        self.state = self._open(resume)
        self.space = config.space
        try:
            self.searcher = make_searcher(config.algo, self.space, budget=config.budget, parallel=config.parallel,
                                          seed=config.seed, options=config.searcher_options,
                                          **searcher_criteria(config))
            self.warm = warm_sources(config)
            backend = make_backend(self.state.executor or config.executor, self.folder / "submitit",
                                   config.resources, job_name=config.study, code_dir=self.folder / "code")
        except ConfigError as e:
            raise StudyError(str(e)) from None
        except ValueError as e:  # the searcher's own options (NOMAD checks its parameters itself)
            raise StudyError(f"config key 'searcher_options': {str(e).splitlines()[0]}") from None
        except BackendError as e:
            raise StudyError(str(e)) from None
        self.backend = backend
        backend.prepare()
        self.uid = self.state.study_uid or uuid.uuid4().hex
        self.tracker = Tracker(config.tracking(), config.study, self.folder / "mlflow-outbox.jsonl", self.uid,
                               log=self._warn)
        self.runner = Runner(Dispatcher(backend, record=self.journal.append,
                                        outage_s=config.retries.outage_hours * 3600),
                             self.journal, config.retries, self._task, log=self._warn, what="trial",
                             may_retry=lambda job, outcome: not self.state.trials[int(job.key)].pruned,
                             on_retry=self._retried, on_submitted=self._submitted)
        self.spend = Spend(config.gpu_hours, config.resources)
        self.pruning = Pruning(config, self.state)
        self.judge = Judge(config)
        self.follow: dict[int, Follower] = {}
        self.progress = Progress(config, self.out)
        self.best: TrialState | None = None
        self.untracked: list = []  # finished trials not yet queued for MLflow
        self.plotted_at = time.time()  # the first plots after PLOT_EVERY_S, or at the end
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
        self.recreated = self._reconcile() if self.state.config is not None else {}
        if self.state.ended:
            self.searcher.close()
            return end.already_ended(self.config, self.state, self.journal, self.tracker, self.judge, self._warn,
                                     reregister=bool(self.recreated.get("registered") or self.recreated.get("runs")))
        try:
            self._start()
            self._loop()
        except BaseException:
            self.searcher.close()
            self.tracker.close()
            raise  # jobs keep running; --resume re-attaches them
        self.searcher.close()
        self._track(final=True)
        end.finish(self.config, self.state, self.journal, self.tracker, self.judge, self.progress, self.best)
        return self.state

    def _start(self) -> None:
        resumed = self.state.config is not None
        if self.backend.pins_code:  # a resumed study keeps the snapshot it started with
            snapshot_code(self.folder / "code")
        if not resumed:
            self._check_before_start()
            ensure_local_store(self.config.tracking())  # a SQLite store is made whole before anything is written
            warning = network_store_warning(self.config.tracking())
            if warning:
                self._warn(warning)
            config = self.config.to_dict()
            self.journal.append("start", config=config, study_uid=self.uid, executor=self.backend.kind)
            self.state.config, self.state.study_uid, self.state.executor = config, self.uid, self.backend.kind
        self.tracker.start_parent(self.state.config, space_to_dict(self.space))
        self.tracker.tag(PARENT, code_snapshot=str((self.folder / "code").resolve()) if self.backend.pins_code else None,
                         searcher_profile=getattr(self.searcher, "profile", None), executor=self.backend.kind)
        if self.warm:  # before the first ask (and before a resume's replay): told, never run, no budget
            self.searcher.warm_start([self._observation(t, trial_id=None) for t in finished_trials(self.warm)])
            self.tracker.tag(PARENT, warm_start_from=json.dumps(
                [{"study": name, "parent_run_id": state.parent_run_id, "trials": len(state.finished)}
                 for name, state in self.warm]))
        if resumed:
            self._adopt()
        self.tracker.flush()

    def _check_before_start(self) -> None:
        """What must hold before the journal begins: the objective imports, the data can be prepared."""
        try:
            self.backend.check()
        except BackendError as e:
            raise StudyError(str(e)) from None
        if self.config.function:
            try:
                check_objective(self.config.function, self.folder / "code" if self.backend.pins_code else None)
            except ValueError as e:
                raise StudyError(str(e)) from None
        else:
            from jobs.data import DataError, prepare_splits  # torch-free: the splits are made once, here
            try:
                prepare_splits(self.config.trial_spec(self.space.default_point(), "unused").data)
            except DataError as e:
                raise StudyError(f"the training data cannot be prepared: {e}") from None
            from jobs.tiny import tiny_model_built
            if self.config.trial.base_model == "tiny" and not tiny_model_built():
                self._warn("note: the tiny base model is built on first use (by the first jobs, about a minute or "
                           "two on 2 CPU cores), then cached in ~/.cache/lora-hpo ($LORA_HPO_CACHE)")

    def _reconcile(self) -> dict:
        """A resumed study: MLflow made to agree with the journal (runs and registrations the store lost are
        queued again from the journal and the trial folders; orchestrator/tracking/tracker.py reconcile)."""
        keys = [PARENT] + [trial_key(t) for t in self.state.trials]
        registered = [(r["name"], trial_key(r["trial"])) for r in self.state.registered if "trial" in r]
        said = self.tracker.reconcile(keys, registered)
        if said.get("unchecked"):
            self._warn(f"note: MLflow could not be checked against the journal ({said['unchecked']}): it is checked "
                       "at the next --resume")
        elif said["runs"] or said["registered"]:
            self._warn(f"note: MLflow lacked {len(said['runs'])} run(s) and {len(said['registered'])} registration(s) "
                       "of this study (a store deleted or restored from a backup): re-created from the journal")
        return said

    def _adopt(self) -> None:
        """After a restart: replay finished trials into the searcher, re-attach (or find) the running ones."""
        finished = sorted(self.state.finished, key=lambda t: t.trial)
        running = sorted(self.state.running, key=lambda t: t.trial)
        self.searcher.replay([self._observation(t) for t in finished], [Pending(t.point, t.trial) for t in running])
        for t in sorted(self.state.trials.values(), key=lambda t: t.trial):
            self.tracker.start_child(t.trial, t.point, t.encoded, self.config.algo)  # queued once, ever
        lost = set(self.recreated.get("runs", ()))
        for t in finished:
            self._update_best(t)
            if trial_key(t.trial) in lost and t.out:  # its run was re-created: its curve again, from the folder
                self.tracker.log_curve(t.trial, Follower(Path(t.out) / METRICS_FILE).poll())
            self.tracker.finish_child(t.trial, t.status, t.value, t.summary, t.reason, t.out)
        self.runner.adopt([t.job for t in running], self.state.batches, self.state.jobs)
        for t in running:
            if t.pruned:  # pruned before the crash: make sure its job stops
                self.runner.cancel(t.job.key)

    def _loop(self) -> None:
        while True:
            acted = self._fill_slots()
            self._track()
            notes = [self.spend.text(self.state, self.runner.running_hours())] if self.config.gpu_hours else []
            notes += [x for x in (self.tracker.status(), self.runner.outage()) if x]
            self.progress.update(self.state, self.runner.live, self.best, " | ".join(notes) or None)  # after refills
            if not self.runner.live:
                if self.searcher.finished or len(self.state.trials) >= self.config.budget:
                    return
                if not self.spend.fits_another(self.state, {}):
                    self.progress.note(f"the budget is spent ({self.spend.text(self.state, {})}): one more trial "
                                       "would pass it")
                    return
                if not acted:
                    raise StudyError(f"searcher {self.config.algo} proposes nothing while no evaluation runs; "
                                     "the study cannot progress (report this as a bug)")
                continue
            try:
                acted |= self._poll()
            except SchedulerOutage as e:
                raise StudyError(str(e)) from None
            if not acted:
                time.sleep(self.config.poll_s)

    def _fill_slots(self) -> bool:
        fresh = []
        while len(self.runner.live) + len(fresh) < self.config.parallel and len(self.state.trials) < self.config.budget:
            running = {**self.runner.running_hours(), **{t.job.key: 0.0 for t in fresh}}
            if not self.spend.fits_another(self.state, running):
                break
            suggestion = self.searcher.ask()
            if suggestion is None:
                break
            t = TrialState(suggestion.trial_id, suggestion.point, _plain(suggestion.encoded),
                           out=str((self.folder / "trials" / f"{suggestion.trial_id:04d}").resolve()))
            self.journal.append("trial", trial=t.trial, point=t.point, encoded=t.encoded, out=t.out)
            self.state.add(t)
            self.tracker.start_child(t.trial, t.point, t.encoded, self.config.algo)
            prior, infeasible = self.judge.before(t.point)
            if infeasible:  # known before training: no job, no GPU time; recorded and told like a failure
                self._record(t, TrialResult("infeasible", None, infeasible, prior))
                continue
            fresh.append(t)
        self.runner.submit([t.job for t in fresh])
        return bool(fresh)

    # ------------------------------------------------------------------------------------------- jobs
    def _task(self, job: Job) -> Task:
        t = self.state.trials[int(job.key)]
        if self.config.function:
            fn, args = ObjectiveTrial(), (self.config.function, t.point, t.out)
        elif self.config.heldout:
            fn, args = HeldoutTrial(), (self.config.trial_spec(t.point, t.out).to_dict(),
                                        {**self.config.heldout.to_dict(),
                                         "evaluation": self.config.evaluation_settings()})
        else:
            fn, args = FinetuneTrial(), (self.config.trial_spec(t.point, t.out).to_dict(),)
        return Task(job.key, fn, args, attempt=job.attempt, folder=t.out, result_file=str(Path(t.out) / RESULT_FILE))

    def _submitted(self, job: Job, attempt: Attempt) -> None:
        self.tracker.tag(trial_key(int(job.key)), **self.backend.job_tags(attempt))

    def _retried(self, job: Job, outcome: Outcome) -> None:
        self.tracker.tag(trial_key(int(job.key)), **{f"retry_{job.attempt}": outcome.reason})
        self.progress.note(f"trial {job.key}: {outcome.reason}; attempt {job.attempt + 1} submitted")

    def _poll(self) -> bool:
        settled = self.runner.poll()
        for key, lv in list(self.runner.live.items()):
            self._follow_curve(self.state.trials[int(key)])
        for job, attempt, outcome in settled:
            self._settle(self.state.trials[int(job.key)], attempt, outcome)
        return bool(settled)

    def _follow_curve(self, t: TrialState) -> None:
        follow = self.follow.setdefault(t.trial, Follower(Path(t.out) / METRICS_FILE))
        fresh = follow.poll()
        if fresh:
            self.tracker.log_curve(t.trial, fresh)
        decision = self.pruning.observe(t, follow.partial) if fresh else None
        if decision is not None:  # journaled before the job is stopped: a restart keeps the decision
            self.journal.append("prune", trial=t.trial, decision=decision.to_dict())
            t.pruned = decision.to_dict()
            self.runner.cancel(t.job.key)
            self.progress.note(f"trial {t.trial}: pruned at {decision.fraction:.0%} of training ({decision.reason})")

    def _settle(self, t: TrialState, attempt: Attempt, outcome: Outcome) -> None:
        result = outcome.result
        if t.pruned and not result.ok:  # stopped by the pruner (a job that finished first keeps its result)
            result = pruned_result(t, t.job.hours)
        result.metrics["gpu_hours"] = t.job.cost_h  # every attempt's (orchestrator/study/spend.py)
        self._follow_curve(t)
        history = t.job.history + [{"job_id": attempt.job_id, "states": attempt.history or [outcome.state]}]
        self.tracker.tag(trial_key(t.trial), attempts=len(history), **self.backend.job_tags(attempt, outcome.state),
                         attempt_history=json.dumps([{"job_id": h.get("job_id"), "states": h.get("states"),
                                                      "reason": h.get("reason")} for h in history]))
        self.follow.pop(t.trial, None)
        self._record(t, result)

    def _record(self, t: TrialState, result: TrialResult) -> None:
        """A finished trial: judged (constraints, objectives), journaled, told, queued for MLflow."""
        summary = result.summary()
        if self.judge.active:
            verdict = self.judge.after(result.status, result.value, summary)
            summary.update({f"constraint.{k.metric}": v
                            for k, v in zip(self.judge.constraints, verdict.constraints or [])}, feasible=verdict.feasible)
            if verdict.missing:  # told as a failure: say why, where a person looks
                summary["unjudged"] = f"the trial did not report {', '.join(verdict.missing)}"
        self.journal.append("result", trial=t.trial, status=result.status, value=result.value, reason=result.reason,
                            summary=summary)
        t.status, t.value, t.reason, t.summary = result.status, result.value, result.reason, summary
        t.finished_at = time.time()
        if t.ok:
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

    def _track(self, final: bool = False) -> None:
        """Queue finished trials for MLflow; refresh the parent run's plots now and then, and at the end."""
        for t, n, best in self.untracked:
            self.tracker.finish_child(t.trial, t.status, t.value, t.summary, t.reason, t.out)
            if t.ok:
                self.tracker.log_metrics(PARENT, {"trial_val_loss": t.value}, step=n)
            if best is not None:
                self.tracker.log_best(n, best.value, best.trial, best.point)
            self.tracker.log_metrics(PARENT, {"slot_utilization": self.utilization(),
                                              "evaluations_in_flight": len(self.runner.live),
                                              "gpu_hours_spent": self.spend.spent(self.state,
                                                                                  self.runner.running_hours())},
                                  step=n)
        fresh, self.untracked = bool(self.untracked), []
        if (fresh and time.time() - self.plotted_at >= PLOT_EVERY_S) or final:
            from orchestrator.reports.plots import draw_plots  # matplotlib/plotly: only when drawing
            if draw_plots(self.state, self.folder / "plots"):
                self.tracker.log_plots(self.folder / "plots")
            self.plotted_at = time.time()
        self.tracker.flush()

    def utilization(self) -> float:
        """Busy slot-seconds over parallel x wall time since this process started."""
        return self.runner.busy_until_now() / max(1e-9, self.config.parallel * (time.time() - self.t0))

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
        return t.value if t.ok else None

    def _update_best(self, t: TrialState) -> None:
        """The best feasible trial so far (with two objectives: of the first one; the champion is picked at the
        end by orchestrator/search/champion.py)."""
        feasible = t.summary.get("feasible", True) if self.judge.active else True
        if t.ok and feasible and (self.best is None or t.value < self.best.value):
            self.best = t


def pruned_result(t: TrialState, hours: float) -> TrialResult:
    """A pruned trial's record: no objective (it did not finish), the decision and the time it cost."""
    d = t.pruned
    return TrialResult("pruned", None, f"pruned at {d['fraction']:.0%} of training: {d['reason']}",
                       {"pruned_fraction": d["fraction"], "pruned_val_loss": d["value"], "total_s": hours * 3600})


def _plain(x):
    return json.loads(json.dumps(x, default=float)) if x is not None else None


def run_study(config: StudyConfig, resume: bool = False, out=None, created: bool | None = None) -> StudyState:
    """Run (or resume) a study under its lock: one orchestrator per study.

    A study that stops before its journal begins (bad input found late: the objective does not import, the data
    cannot be prepared) leaves nothing behind, if this process created its folder (`created`; None: find out by
    creating it): what it made is removed while it still holds the lock, so that nothing another process owns
    is ever deleted (a second start that lost the race for the lock removes nothing)."""
    if created is None:
        try:
            config.folder.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
    config.folder.mkdir(parents=True, exist_ok=True)
    lock = StudyLock(config.folder / "study.lock", what=f"study {config.study!r}").acquire()
    cleared = False
    try:
        return Study(config, resume, out).run()
    except BaseException:
        if created and not (config.folder / "journal.jsonl").exists():
            _clear_unstarted(config.folder, keep=lock.path)
            cleared = True
        raise
    finally:
        lock.release()
        if cleared:
            try:
                config.folder.rmdir()  # empty, unless another start made its lock meanwhile: then it stays
            except OSError:
                pass


def _clear_unstarted(folder: Path, keep: Path) -> None:
    import shutil
    for entry in folder.iterdir():
        if entry == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
