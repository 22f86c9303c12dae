"""The debug backend: jobs run in the orchestrator's own process, one at a time, when their turn to settle comes.

    backend = DebugBackend("runs/s/submitit", Resources(timeout_min=5), "s")

For objectives you want to step through (pdb, prints) or tests that must not start processes. A job that
misbehaves is still only a failed trial, as under the local executor: an exception, `sys.exit(...)`, a
`KeyboardInterrupt` the objective raised itself, or running past `resources.timeout_min` (a timer signal
interrupts it; the main thread only). A real Ctrl-C (SIGINT) still interrupts the study.

Jobs do not outlive the process: after a restart, a debug job is run again (reattach returns None).
"""
from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import traceback
from pathlib import Path

from submitit.core.utils import FailedJobError

from slurm.executors import Resources

_ids = itertools.count(1)


class _TimeLimit(BaseException):
    """Raised inside a debug job that ran past its time limit (not an Exception: the job must not catch it)."""


class DebugJob:
    """A function to run in this process; `run()` once, then `result()` returns or raises FailedJobError."""

    def __init__(self, fn, args: tuple, timeout_s: float):
        self.job_id = f"debug-{next(_ids)}"
        self.fn, self.args, self.timeout_s = fn, args, timeout_s
        self.done = False
        self._value = None
        self._error: str | None = None

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = self.job_id  # as submitit's debug jobs: jobs/entry.py then leaves
        try:                                              # the process's signal handlers alone
            with _time_limit(self.timeout_s), _real_interrupts() as interrupted:
                try:
                    self._value = self.fn(*self.args)
                except KeyboardInterrupt:
                    if interrupted():
                        raise  # Ctrl-C: the study's, not this job's
                    self._error = "the job raised KeyboardInterrupt"
        except _TimeLimit:
            self._error = f"the job ran past its time limit ({self.timeout_s / 60:g} min) and was stopped"
        except SystemExit as e:
            self._error = f"the job called sys.exit({e.code!r})"
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - the job's failure is its result
            self._error = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]
        finally:
            os.environ.pop("SUBMITIT_DEBUG_JOB_ID", None)

    def result(self):
        self.run()
        if self._error is not None:
            raise FailedJobError(self._error)
        return self._value


class DebugBackend:
    kind = "debug"
    pins_code = False  # jobs run the orchestrator's own code
    submitted_state = "RUNNING"  # runs in this process when its turn comes: never queued

    def __init__(self, folder, resources: Resources, job_name: str):
        self.folder, self.resources, self.job_name = Path(folder), resources, job_name
        self.executor = None

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def submit(self, tasks, name: str) -> list:
        return [DebugJob(t.fn, tuple(t.args), self.resources.timeout_min * 60.0) for t in tasks]

    def unreachable(self, error: BaseException) -> bool:
        return False

    def refresh(self, attempts) -> None:
        for a in attempts:
            a.state, a.ran = "RUNNING", True

    def ended(self, a):
        a.started = a.started or time.time()
        a.job.run()  # its turn: it runs now, in this process
        a.state = "FINISHED"
        return "FINISHED"

    def has_result(self, a) -> bool:
        return True

    def result(self, a):
        return a.job.result()

    def grace_s(self, state: str) -> float:
        return 0.0

    def cause(self, a, state: str) -> str:
        return f"state {state}"

    def retry_kind(self, state: str) -> str | None:
        return None

    def stop_cause(self, state: str) -> str:
        return "cancelled"

    def settled(self, a, state: str) -> None:
        pass

    def cancel(self, a) -> None:
        a.job.done = True  # not run yet (it runs when it settles): never run
        a.job._error = a.job._error or "cancelled before it ran"

    def reattach(self, job_id: str):
        return None

    def recover(self, name: str, tasks) -> dict[str, str]:
        return {}

    def job_tags(self, a, final_state: str | None = None) -> dict:
        return {"executor": "debug", "job_id": a.job_id}


class _time_limit:
    """SIGALRM after `seconds` raises _TimeLimit in the job (main thread only; elsewhere no limit)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = threading.current_thread() is threading.main_thread() and seconds > 0

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def _fire(self, signum, frame):
        raise _TimeLimit()

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        return False


class _real_interrupts:
    """Tells a KeyboardInterrupt from a real SIGINT apart from one the job raised itself."""

    def __init__(self):
        self.seen = False
        self.active = threading.current_thread() is threading.main_thread()

    def __enter__(self):
        if self.active:
            self.previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._fire)
        return lambda: self.seen

    def _fire(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
        return False
