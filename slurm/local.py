"""Local jobs that say how they ended: submitit's local executor, plus each task's exit status on disk.

    python -m slurm.local FOLDER      # the controller of one local job (started by LocalExecutor, not by hand)

submitit's local controller waits for its task processes but keeps their exit codes to itself, so a job
that dies without a result (os._exit, sys.exit, SIGKILL from the OOM killer) looks like any other. This
controller is submitit's, with one addition: when its tasks have ended it writes `<job id>_exit.json` next to
the job's logs ({"codes": [...]}: a negative code is the signal that killed the task). `LocalJob` reads it
back, and also answers for a job started by an earlier orchestrator process (after `--resume`): alive while
its controller's PID runs with the same start time (so a recycled PID is not mistaken for it).

A small documented subclass of submitit's LocalExecutor / LocalJob / Controller (submitit 1.5): only
`_submit_command` (which module starts the controller) and `wait` (record the codes) differ. `LocalBackend` is
the dispatcher's backend for these jobs (slurm/backend.py lists the methods).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import submitit
from submitit.local import local as _submitit_local

from slurm.executors import LOCAL_PARAMETERS, Resources, pinned_python, submit_tasks
from slurm.states import OOM_MARKS, exit_text, last_stderr_line


def exit_path(folder: str | Path, job_id: str) -> Path:
    return Path(folder) / f"{job_id}_exit.json"


def process_start_time(pid: int) -> str | None:
    """The kernel's start time of a live, non-zombie process (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


class Controller(_submitit_local.Controller):
    def wait(self, freq: int = 24):
        codes = super().wait(freq)
        path = exit_path(self.folder, self.pid)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"codes": list(codes)}))
            os.replace(tmp, path)
        except OSError:  # the job's folder is gone (cleaned up under it): nobody will ask
            pass
        return codes


class LocalJob(_submitit_local.LocalJob):
    def __init__(self, folder, job_id: str, tasks=(0,), process=None, started: str | None = None):
        super().__init__(folder, job_id, tasks, process)
        # a re-attached job has no Popen: remember its controller's start time to recognise it
        self.started = started if process is None else process_start_time(int(job_id))

    def alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        now = process_start_time(int(self.job_id))
        return now is not None and (self.started is None or now == self.started)

    def exit_codes(self) -> list | None:
        """Exit codes of the job's tasks once the controller recorded them (negative: killed by that signal)."""
        try:
            return json.loads(exit_path(self.paths.folder, self.job_id).read_text())["codes"]
        except (OSError, ValueError, KeyError):
            return None

    def get_info(self, mode: str = "force") -> dict:
        if self.paths.result_pickle.exists():
            return {"jobState": "FINISHED"}
        return {"jobState": "RUNNING" if self.alive() else "FINISHED"}


class LocalExecutor(_submitit_local.LocalExecutor):
    job_class = LocalJob
    cluster = "local"

    def _submit_command(self, command: str) -> LocalJob:
        # as submitit's, with this module's controller (same environment contract, submitit.local.local)
        ntasks = self.parameters.get("tasks_per_node", 1)
        gpus = ",".join(str(k) for k in range(self.parameters.get("gpus_per_node", 0)))
        env = dict(os.environ)
        env.update(SUBMITIT_LOCAL_NTASKS=str(ntasks), SUBMITIT_LOCAL_COMMAND=command,
                   SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
                   SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
                   SUBMITIT_LOCAL_NODEID="0", SUBMITIT_LOCAL_JOB_NUM_NODES="1", SUBMITIT_STDERR_TO_STDOUT="",
                   SUBMITIT_EXECUTOR="local", CUDA_VISIBLE_DEVICES=gpus,
                   SUBMITIT_LOCAL_WITH_SHELL="1" if self.parameters.get("setup") else "")
        cmd = [sys.executable, "-m", "slurm.local", str(self.folder)]
        setup = list(self.parameters.get("setup") or ())
        process = subprocess.Popen(" && ".join(setup + [shlex.join(cmd)]) if setup else cmd,
                                   shell=bool(setup), env=env, start_new_session=True)
        return LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


class LocalBackend:
    """Jobs as local processes (each a controller that runs its tasks): alive while the controller runs."""
    kind = "local"
    pins_code = True
    submitted_state = "RUNNING"  # a local process starts at once

    def __init__(self, folder, resources: Resources, job_name: str, code_dir=None):
        self.folder, self.resources, self.job_name = Path(folder), resources, job_name
        python = pinned_python(code_dir, shell=False) if code_dir is not None else None
        self.executor = LocalExecutor(self.folder, max_num_timeout=0, python=python)
        params = resources.submitit_parameters(job_name)
        self.executor.update_parameters(signal_delay_s=resources.signal_delay_s,
                                        **{k: v for k, v in params.items() if k in LOCAL_PARAMETERS})

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        # local jobs share this machine: cpus_per_task is their thread count (jobs/entry.py reads it)
        os.environ.setdefault("LORA_HPO_THREADS", str(self.resources.cpus_per_task))

    def submit(self, tasks, name: str) -> list:
        return submit_tasks(self.executor, tasks, name)

    def unreachable(self, error: BaseException) -> bool:
        return False

    def refresh(self, attempts) -> None:
        for a in attempts:
            a.state, a.ran = ("RUNNING" if a.job.alive() else "FINISHED"), True
            a.started = a.started or a.submitted

    def ended(self, a):
        if a.state == "RUNNING" and not a.job.paths.result_pickle.exists():
            return None
        return "FINISHED"

    def has_result(self, a) -> bool:
        return a.job.paths.result_pickle.exists()

    def result(self, a):
        return a.job.result()

    def grace_s(self, state: str) -> float:
        return 0.0

    def cause(self, a, state: str) -> str:
        codes = a.job.exit_codes() or []
        code = next((c for c in codes if c not in (0, None)), codes[0] if codes else None)
        parts = [f"state {state}", exit_text(code) if code is not None else "no exit status recorded"]
        tail = last_stderr_line(a.job)
        if tail and any(m in tail.lower() for m in OOM_MARKS):
            parts.append("out of memory: lower the batch or run fewer jobs at once (--parallel)")
        if tail:
            parts.append(f"last stderr line: {tail}")
        return "; ".join(parts)

    def retry_kind(self, state: str) -> str | None:
        return None

    def stop_cause(self, state: str) -> str:
        return "cancelled"

    def settled(self, a, state: str) -> None:
        pass

    def cancel(self, a) -> None:
        if a.job.alive():
            try:
                os.kill(int(a.job_id), signal.SIGTERM)  # the controller forwards it to its tasks
            except (ProcessLookupError, PermissionError, ValueError):
                pass

    def reattach(self, job_id: str):
        return LocalJob(folder=self.folder, job_id=job_id)

    def recover(self, name: str, tasks) -> dict[str, str]:
        """The jobs whose submitted pickles hold these tasks' functions and arguments."""
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

    def job_tags(self, a, final_state: str | None = None) -> dict:
        return {"executor": "local", "job_id": a.job_id}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m slurm.local SUBMITIT_FOLDER (started by slurm.local.LocalExecutor)")
    Controller(Path(sys.argv[1])).run()
