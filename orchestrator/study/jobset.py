"""What the commands that run jobs beside a study (`evaluate`, `confirm`) share: their journal folded, their
backend, the trial runner, their tracker, and an end that leaves their MLflow runs saying how it went.

    js = JobSet.open(args, name="evaluate", item_event="evaluation", read_result=..., resources=...,
                     task_of=self._task, log=print, what="evaluation")
    with js.finishing("the evaluations"):            # drains MLflow on every path out (bounded)
        js.runner.adopt(...); js.runner.run(on_done, poll_s)

Each command keeps its own files in the study folder: `<name>.jsonl` (journal), `<name>-submitit/` (job logs),
`<name>-outbox.jsonl` (MLflow writes), `<name>.lock` (one process at a time, taken by the caller).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import ConfigError
from orchestrator.study.journal import Journal, StudyState, open_study
from orchestrator.study.runner import ItemSet, Runner, fold_items
from orchestrator.tracking.tracker import Tracker
from slurm.backend import make_backend
from slurm.dispatch import Dispatcher, SchedulerOutage
from slurm.executors import snapshot_code


@dataclass
class JobSet:
    folder: Path
    study: StudyState
    config: object
    journal: Journal
    set: ItemSet
    backend: object
    runner: Runner
    tracker: Tracker
    code: Path

    @classmethod
    def open(cls, args, *, name: str, item_event: str, read_result, task_of, log, what: str,
             resources_of=lambda config: config.resources, code: Path | None = None, start: dict | None = None,
             check=lambda config: None, **hooks) -> "JobSet":
        """`resources_of(config)`: what each job asks for (the study's resources by default); `check(config)`
        refuses a study the command cannot work on (ConfigError) before anything is written."""
        folder = Path(args.workdir) / args.study
        study, config = open_study(args.workdir, args.study, tracking_uri=args.tracking_uri)
        check(config)
        resources = resources_of(config)
        journal = Journal(folder / f"{name}.jsonl")
        items = fold_items(journal, item_event, read_result)
        kind = items.executor or args.executor or study.executor or "auto"  # re-attaching needs the same kind
        code = code or folder / f"{name}-code"
        backend = make_backend(kind, folder / f"{name}-submitit", resources, job_name=f"{args.study}-{name}",
                               code_dir=code)
        backend.prepare()
        if items.executor is None:
            journal.append("start", executor=backend.kind, **(start or {}))
        runner = Runner(Dispatcher(backend, record=journal.append, outage_s=config.retries.outage_hours * 3600),
                        journal, config.retries, task_of, log=log, what=what, **hooks)
        tracker = Tracker(config.tracking(), config.study, folder / f"{name}-outbox.jsonl", study.study_uid or "",
                          log=log)
        return cls(folder, study, config, journal, items, backend, runner, tracker, code)

    def snapshot(self) -> None:
        if self.backend.pins_code:  # jobs import this copy; a rerun keeps it
            snapshot_code(self.code)

    @contextlib.contextmanager
    def finishing(self, what: str):
        """Run the block; whatever way it ends, MLflow gets (a bounded time for) what was queued, so that the
        command's runs say how it ended; a scheduler outage or an MLflow that takes nothing is one line."""
        try:
            yield
        except SchedulerOutage as e:
            self.tracker.close(wait_s=60, idle_s=30)
            raise ConfigError(str(e)) from None
        except KeyboardInterrupt:
            self.tracker.close(wait_s=10, idle_s=5)  # what is queued is kept for the rerun
            raise
        except BaseException:
            self.tracker.close(wait_s=60, idle_s=30)  # the rest waits for a rerun
            raise
        if not self.tracker.close(wait_s=3600, idle_s=600):
            raise ConfigError(f"MLflow took no write for 10 minutes: {what} are journaled; run the same command again "
                              f"when the tracking store is back ({self.tracker.status()})")
