"""Local jobs that say how they ended: submitit's local executor, plus each task's exit status on disk.

    python -m slurm.local FOLDER      # the controller of one local job (started by LocalExecutor, not by hand)

submitit's local controller waits for its task processes but keeps their exit codes to itself, so a job
that dies without a result (os._exit, sys.exit, SIGKILL from the OOM killer) looks like any other. This
controller is submitit's, with one addition: when its tasks have ended it writes `<job id>_exit.json` next to
the job's logs ({"codes": [...]}: a negative code is the signal that killed the task). `LocalJob` reads it
back, and also answers for a job started by an earlier orchestrator process (after `--resume`): alive while
its controller's PID runs with the same start time (so a recycled PID is not mistaken for it).

A small documented subclass of submitit's LocalExecutor / LocalJob / Controller (submitit 1.5): only
`_submit_command` (which module starts the controller) and `wait` (record the codes) differ.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from submitit.local import local as _submitit_local


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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m slurm.local SUBMITIT_FOLDER (started by slurm.local.LocalExecutor)")
    Controller(Path(sys.argv[1])).run()
