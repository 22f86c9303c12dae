"""The study loop: ask the searcher, submit jobs, poll them in batches, tell results, track, journal.

    python -m orchestrator --algo nomad            # the embedded default (tiny study, local executor)

The loop knows four protocols only: the searcher's ask/tell, submitit's submit/done/result, the tracker,
and the journal. Every decision is journaled before it is acted on; `--resume` folds the journal back:
finished results are replayed into a fresh searcher, jobs still running are re-attached by their job id
(never resubmitted), and the budget is finished. A failed evaluation is a recorded failed trial told to the
searcher as a failure; only infrastructure faults stop a study, after the configured retries.

Trials that fill several free slots at once (a NOMAD block, TPE's first asks) go out as one
`executor.batch()`: a job array on SLURM. Jobs run the code of `<study folder>/code/`, a copy of the
project's packages made when the study started (slurm/executors.py snapshot_code), not the checkout.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from jobs.entry import FinetuneTrial, ObjectiveTrial
from orchestrator.config import StudyConfig
from orchestrator.journal import Journal, StudyState, TrialState
from orchestrator.progress import Progress
from orchestrator.searchers import Observation, Pending, make_searcher
from orchestrator.tracking import Tracker, register
from slurm.executors import Resources, force_states, make_executor, snapshot_code

RETRY_STATES = {"NODE_FAIL": "node_fail", "PREEMPTED": "preempted", "BOOT_FAIL": "node_fail"}
# SLURM ended these jobs from outside: no result file is coming, so do not wait submitit's 15 s for one.
KILLED_STATES = ("CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


PLOT_EVERY_S = 60.0  # refresh the parent run's plots at most this often while the study runs


class StudyError(RuntimeError):
    """The study cannot go on (not an evaluation failure): the message says why and what to do."""


@dataclass
class Live:
    trial: TrialState
    job: object
    curve_step: int = 0  # last step of the live curve already logged
    val_step: int = -1  # last step of the validation curve already logged
    offset: int = 0  # bytes of metrics.jsonl already read
    started: float = field(default_factory=time.time)


class Study:
    def __init__(self, config: StudyConfig, resume: bool = False, out=sys.stdout):
        self.config, self.folder = config, config.folder
        self.journal = Journal(self.folder / "journal.jsonl")
        self.state = self._open(resume)
        self.space = config.search_space()
        self.tracker = Tracker(config.tracking(), config.study)
        kind = self.state.config.get("executor_resolved") if self.state.config else None
        self.code = self.folder / "code"  # made by _start, before the first submission
        self.executor = make_executor(kind or config.executor, self.folder / "submitit",
                                      Resources.from_dict(config.resources), job_name=config.study,
                                      code_dir=self.code)
        self.kind = self.executor.cluster
        if self.kind == "local":  # local jobs share this machine: honour cpus_per_task as their thread count
            os.environ.setdefault("LORA_HPO_THREADS", str(Resources.from_dict(config.resources).cpus_per_task))
        self.searcher = make_searcher(config.algo, self.space, budget=config.budget, parallel=config.parallel,
                                      seed=config.seed, options=config.searcher_options)
        self.live: dict[int, Live] = {}
        self.progress = Progress(config, out)
        self.best: TrialState | None = None
        self.untracked: list = []  # finished trials not yet recorded in MLflow
        self.plotted_at = 0.0

    def _open(self, resume: bool) -> StudyState:
        if self.journal.exists() and not resume:
            raise StudyError(f"study {self.config.study!r} already exists in {self.folder}: "
                             "add --resume to continue it, or pick another --study name")
        if resume and not self.journal.exists():
            raise StudyError(f"nothing to resume: no journal at {self.journal.path}; drop --resume to start it")
        return self.journal.load()

    # ------------------------------------------------------------------------------------------- lifecycle
    def run(self) -> StudyState:
        self._start()
        try:
            self._loop()
        except BaseException:
            self.searcher.close()
            raise  # jobs keep running; --resume re-attaches them
        self.searcher.close()
        self._finish()
        return self.state

    def _start(self) -> None:
        resumed = self.state.config is not None
        pinned = self.kind in ("slurm", "local")  # debug jobs run in this process, on its code
        if pinned:  # a resumed study keeps the snapshot it started with
            snapshot_code(self.code)
        if not resumed:
            if self.config.objective is None:
                from jobs.data import prepare_splits  # torch-free: the splits are made once, here
                prepare_splits(self.config.trial_spec(self.space.default_point(), "unused").data)
            config = {**self.config.to_dict(), "executor_resolved": self.kind}
            parent = self.tracker.start_parent(config, self.config.space or {"paper": True})
            self.journal.append("start", config=config, parent_run_id=parent)
            self.state.config, self.state.parent_run_id = config, parent
        else:
            self.tracker.start_parent(self.state.config, {}, resume_run_id=self.state.parent_run_id)
        if pinned:
            self.tracker.tag(self.state.parent_run_id, code_snapshot=str(self.code.resolve()))
        if resumed:
            self._adopt()

    def _adopt(self) -> None:
        """After a restart: replay finished trials into the searcher, re-attach the running ones."""
        self.tracker.reconcile(self.state.trials)
        finished = sorted(self.state.finished, key=lambda t: t.trial)
        running = sorted(self.state.running, key=lambda t: t.trial)
        history = [Observation(t.point, t.value if t.status == "ok" else None, t.trial) for t in finished]
        self.searcher.replay(history, [Pending(t.point, t.trial) for t in running])
        for t in finished:
            self._update_best(t)
        for t in running:
            job = self._reattach(t) if t.job_id else None
            self.live[t.trial] = Live(t, job or self._submit(t), curve_step=self.tracker.last_curve_step(t.run_id))

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
            self.progress.update(self.state, self.live, self.best)
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
            t.run_id = self.tracker.start_child(t.trial, t.point, t.encoded, self.config.algo)
            self.journal.append("trial", trial=t.trial, point=t.point, encoded=t.encoded, run_id=t.run_id, out=t.out)
            self.state.trials[t.trial] = t
            fresh.append(t)
        for t, job in zip(fresh, self._submit_all(fresh)):
            self.live[t.trial] = Live(t, job)
        return bool(fresh)

    # ------------------------------------------------------------------------------------------- jobs
    def _call(self, t: TrialState) -> tuple:
        if self.config.objective:
            return ObjectiveTrial(), self.config.objective, t.point, t.out
        return FinetuneTrial(), self.config.trial_spec(t.point, t.out).to_dict()

    def _submit_all(self, trials: list[TrialState]) -> list:
        """Journaled trials out as one batch (a job array on SLURM); one by one if the batch is refused."""
        if len(trials) < 2:
            return [self._submit(t) for t in trials]
        try:
            with self.executor.batch():
                jobs = [self.executor.submit(*self._call(t)) for t in trials]
        except Exception:  # sbatch refused the array: each trial gets its own submission and retry policy
            return [self._submit(t) for t in trials]
        for t, job in zip(trials, jobs):
            self._submitted(t, job)
        return jobs

    def _submit(self, t: TrialState):
        """Submit the trial's job; submission errors are retried per policy, then the trial fails."""
        policy = self.config.retries
        for attempt in range(policy.get("max_retries", 0) + 1):
            try:
                job = self.executor.submit(*self._call(t))
            except Exception as e:  # sbatch refused, controller unreachable...
                if "submission" not in policy.get("on", []) or attempt == policy.get("max_retries", 0):
                    return _FailedSubmission(f"submission failed: {str(e).splitlines()[0][:200]}")
                time.sleep(min(60, 2 ** attempt))
                continue
            self._submitted(t, job)
            return job
        raise AssertionError("unreachable")

    def _submitted(self, t: TrialState, job) -> None:
        t.job_id = str(job.job_id)
        self.journal.append("submitted", trial=t.trial, job_id=t.job_id, attempt=t.attempt)
        self.tracker.tag(t.run_id, slurm_job_id=t.job_id if self.kind == "slurm" else None,
                         job_id=t.job_id, executor=self.kind)

    def _reattach(self, t: TrialState):
        folder = self.folder / "submitit"
        if self.kind == "slurm":
            return submitit.SlurmJob(folder=folder, job_id=t.job_id)
        if self.kind == "local":
            return ReattachedLocalJob(folder=folder, job_id=t.job_id)
        return None  # debug jobs ran inside the dead process: run them again

    def _poll(self) -> bool:
        jobs = [lv.job for lv in self.live.values() if isinstance(lv.job, submitit.Job)]
        if self.kind == "slurm" and jobs:
            force_states(jobs)  # one sacct call for every running job
        acted = False
        for trial_id, lv in list(self.live.items()):
            self._follow_curve(lv)
            if lv.job.done():
                self._collect(lv)
                acted = True
        return acted

    def _follow_curve(self, lv: Live) -> None:
        path = Path(lv.trial.out) / "metrics.jsonl"
        if not path.exists():
            return
        start = lv.offset
        with open(path, "rb") as f:
            f.seek(max(start - 1, 0))
            chunk = f.read()
        if start and chunk[:1] != b"\n":  # rewritten: a requeued job trimmed it to its checkpoint
            start, chunk = 0, path.read_bytes()
        elif start:
            chunk = chunk[1:]
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written is read next time
        lv.offset = start + len(complete)
        records = []
        for line in complete.decode().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # torn by a rewrite under our feet: steps already seen are skipped
                continue
        curve = [r for r in records if "loss" in r and r.get("step", 0) > lv.curve_step]
        val = [r for r in records if "val_loss" in r and r.get("step", 0) > lv.val_step]
        if curve or val:
            self.tracker.log_curve(lv.trial.run_id, curve + val)
            lv.curve_step = max([lv.curve_step] + [r["step"] for r in curve])
            lv.val_step = max([lv.val_step] + [r["step"] for r in val])

    def _collect(self, lv: Live) -> None:
        t = lv.trial
        state = getattr(lv.job, "state", "").split(" ")[0]
        if isinstance(lv.job, submitit.SlurmJob) and state in KILLED_STATES:
            lv.job._results_timeout_s = 2  # submitit's grace for a result file on a slow NFS
        status, value, reason, summary = _outcome(lv.job)
        if isinstance(lv.job, submitit.SlurmJob) and (status == "failed" or state in KILLED_STATES):
            lv.job.cancel(check=False)  # SLURM requeues a job whose node failed: that copy must not run too
        retry_kind = RETRY_STATES.get(state) if status == "failed" else None
        policy = self.config.retries
        if retry_kind in policy.get("on", []) and t.attempt < policy.get("max_retries", 0):
            t.attempt += 1  # same trial, same folder: the recipe resumes from its checkpoint
            self.tracker.tag(t.run_id, **{f"retry_{t.attempt}": reason})
            lv.job = self._submit(t)
            return
        self._follow_curve(lv)
        if self.kind == "slurm":  # sacct's view, already cached by the last batched poll
            info = lv.job.get_info(mode="cache") if hasattr(lv.job, "get_info") else {}
            self.tracker.tag(t.run_id, slurm_node=info.get("NodeList"), slurm_state=info.get("State"))
        self.journal.append("result", trial=t.trial, status=status, value=value, reason=reason, summary=summary)
        t.status, t.value, t.reason, t.summary = status, value, reason, summary
        del self.live[t.trial]
        self.searcher.tell(t.trial, value if status == "ok" else None)
        self._update_best(t)
        # MLflow (artifact uploads can take seconds) waits until the freed slot has been refilled
        self.untracked.append((t, len(self.state.finished), self.best))
        self.progress.event(t)

    def _track(self, final: bool = False) -> None:
        """Record finished trials in MLflow; refresh the parent run's plots now and then, and at the end."""
        for t, n, best in self.untracked:
            self.tracker.finish_child(t.run_id, t.status, t.value, t.summary, t.reason, t.out)
            if t.status == "ok":
                self.tracker.log_trial_value(n, t.value)
            if best is not None:
                self.tracker.log_best(n, best.value, best.trial, best.point)
        fresh, self.untracked = bool(self.untracked), []
        if (fresh and time.time() - self.plotted_at >= PLOT_EVERY_S) or final:
            from orchestrator.plots import log_plots  # matplotlib/plotly: only when drawing
            log_plots(self.tracker.client, self.tracker.parent_id, self.state, self.folder)
            self.plotted_at = time.time()

    def _update_best(self, t: TrialState) -> None:
        if t.status == "ok" and (self.best is None or t.value < self.best.value):
            self.best = t

    # ------------------------------------------------------------------------------------------- the end
    def _finish(self) -> None:
        self._track(final=True)
        registered = None
        if self.best is not None and self.config.objective is None and self.config.register_as != "":
            registered = register_best(self.tracker.client, self.config, self.best)
            self.journal.append("registered", **registered)
        self.tracker.end_parent("FINISHED")
        self.journal.append("end")
        self.progress.summary(self.state, self.best, self.space.default_point(), registered)


def register_best(client, config: StudyConfig, best: TrialState) -> dict:
    name = config.register_as or f"{config.study}-adapter"
    tags = {"study": config.study, "algo": config.algo, "val_loss": best.value, "trial": best.trial,
            "base_model": config.trial.get("base_model", ""), **{f"hp.{k}": v for k, v in best.point.items()}}
    version = register(client, name, best.run_id, tags)
    return {"name": name, "version": version, "trial": best.trial, "uri": f"models:/{name}@champion"}


def job_result(job) -> tuple[object, str | None]:
    """(rank 0's result, None), or (None, why the job did not return one): cancelled, timed out, node
    failure or out of memory (seen by SLURM), or an exception inside the job."""
    try:
        return job.results()[0], None  # a multi-GPU job has one task per GPU
    except UncompletedJobError as e:
        state = re.search(r"has not produced any output \(state: ([^)\n]*)\)", str(e))
        why = f"state: {state.group(1)}" if state else _first_line(e)
        return None, f"job {job.job_id} did not complete ({why})"
    except FailedJobError as e:
        return None, f"job {job.job_id} raised: {_last_error_line(e)}"
    except Exception as e:
        return None, f"job {getattr(job, 'job_id', '?')}: {type(e).__name__}: {_first_line(e)}"


def _outcome(job) -> tuple[str, float | None, str | None, dict]:
    """(status, value, reason, summary) of a finished job, whatever way it ended."""
    result, why = job_result(job)
    if why:
        return "failed", None, why, {}
    if not isinstance(result, dict):
        return "failed", None, f"job returned {type(result).__name__}, expected a result dict", {}
    summary = {k: v for k, v in result.items() if k not in ("spec", "traceback") and not isinstance(v, (dict, list))}
    if result.get("status") == "ok":
        return "ok", float(result["val_loss"]), None, summary
    return "failed", None, result.get("reason") or "the job reported a failure", summary


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _last_error_line(e: BaseException) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip() and not line.startswith(" ")]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _plain(x):
    return json.loads(json.dumps(x, default=float)) if x is not None else None


class _FailedSubmission:
    """Stands in for a job that could not be submitted: done at once, its result a failure."""
    job_id, state = "none", "SUBMISSION_FAILED"

    def __init__(self, reason: str):
        self.reason = reason

    def done(self) -> bool:
        return True

    def results(self):
        return [{"status": "failed", "reason": self.reason, "val_loss": None}]


class ReattachedLocalJob(submitit.local.local.LocalJob):
    """A local job started by a previous orchestrator process: alive while its PID runs (zombies excluded)."""

    def get_info(self, mode: str = "force") -> dict:
        if self.paths.result_pickle.exists():
            return {"jobState": "FINISHED"}
        try:
            stat = Path(f"/proc/{int(self.job_id)}/stat").read_text()
            alive = stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, ValueError, IndexError):
            alive = False
        return {"jobState": "RUNNING" if alive else "INTERRUPTED"}


def run_study(config: StudyConfig, resume: bool = False, out=sys.stdout) -> StudyState:
    os.makedirs(config.folder, exist_ok=True)
    return Study(config, resume, out).run()
