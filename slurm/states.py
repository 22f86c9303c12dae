"""What SLURM says about jobs, read with one `sacct -D` and one `squeue` call for any number of them (torch-free).

    from slurm.states import slurm_snapshot
    info = slurm_snapshot(["1234", "1235_0"])     # {job id: SlurmInfo(state, history, exit_code, node, reason)}

`history` holds every accounting record of the job (sacct -D: one per requeue, oldest first); `state` is the
current one, from squeue while the controller holds the job live (squeue is current, sacct lags it by a second
or two), else from sacct. Pending jobs carry SLURM's reason (Resources, Priority, BeginTime, ReqNodeNotAvail...).
The tables below say what each state means for a trial (slurm/dispatch.py acts on them).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

# SLURM job states (sacct/squeue, 22.05) -> what they mean for a trial
LIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
WAITING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
REQUEUE_STATES = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "SPECIAL_EXIT"}
FINAL = {  # final state -> the retry kind it is (None: not retried)
    "COMPLETED": None, "FAILED": None, "CANCELLED": None, "OUT_OF_MEMORY": None, "REVOKED": None,
    "TIMEOUT": "timeout", "DEADLINE": "timeout", "NODE_FAIL": "node_fail", "BOOT_FAIL": "node_fail",
    "PREEMPTED": "preempted",
}
RETRY_KINDS = ("submission", "node_fail", "preempted", "timeout")  # what `retries.on` may list
OOM_MARKS = ("exceeded job memory limit", "exceeded memory limit", "oom-kill", "out of memory")  # slurmstepd, kernel


class DispatchError(RuntimeError):
    """The scheduler cannot be used (not a job's failure): the message says what to do."""


class BackendError(RuntimeError):
    """The executor cannot be used at all (not a job's failure): one line that says what to do."""


@dataclass
class SlurmInfo:
    state: str
    history: list
    exit_code: str = ""
    node: str = ""
    reason: str = ""
    live: bool = False
    start: float | None = None  # when the current run started (sacct Start), seconds since the epoch
    elapsed_s: float | None = None  # sacct ElapsedRaw of the current record
    gpus: int | None = None         # allocated (sacct AllocTRES gres/gpu), None: not known yet
    cpus: int | None = None         # allocated (AllocTRES cpu)


def slurm_snapshot(job_ids: list[str]) -> dict[str, SlurmInfo]:
    """{job_id: SlurmInfo} from one `sacct -D` and one `squeue` call. A job sacct does not know yet (accounting
    lags 1-2 s) is PENDING. squeue wins for live jobs (it is the controller's current view). A job that neither
    command that answered names is left out when a command did not answer (timed out, or failed on a busy
    controller): its state is unknown this poll, not PENDING (a running job read as PENDING looks requeued)."""
    info: dict[str, SlurmInfo] = {}
    if not job_ids:
        return info
    ids = ",".join(job_ids)
    out = run(["sacct", "-n", "-P", "-X", "-D", "-j", ids, "-o",
               "JobID,State,ExitCode,NodeList,Start,ElapsedRaw,AllocTRES"])
    answered = out is not None
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job_id, state = parts[0], parts[1].split(" ")[0]
        entry = info.setdefault(job_id, SlurmInfo(state, []))
        entry.history.append(state)
        entry.state, entry.exit_code, entry.node = state, parts[2], parts[3]
        entry.start = _epoch(parts[4]) if len(parts) > 4 else None
        if len(parts) > 6:
            entry.elapsed_s = float(parts[5]) if parts[5].strip().isdigit() else entry.elapsed_s
            entry.gpus, entry.cpus = tres(parts[6], "gres/gpu"), tres(parts[6], "cpu")
    out = run(["squeue", "-h", "-r", "--states=all", "-j", ids, "-o", "%i|%T|%r|%N"])
    answered = answered and out is not None
    for line in (out or "").splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job_id, state, reason, node = parts[0], parts[1], parts[2], parts[3]
        entry = info.setdefault(job_id, SlurmInfo(state, [state]))
        if state in LIVE or state in WAITING:
            entry.state, entry.live = state, True
            entry.reason = "" if reason in ("None", "(null)") else reason
            entry.node = node or entry.node
    if answered:
        for job_id in job_ids:
            info.setdefault(job_id, SlurmInfo("PENDING", [], reason="not in accounting yet"))
    return info


def tres(text: str, name: str) -> int | None:
    """The count of `name` in a TRES string ("billing=4,cpu=4,gres/gpu=2,mem=8G,node=1"); None if absent."""
    for part in text.split(","):
        key, _, value = part.partition("=")
        if key == name and value.isdigit():
            return int(value)
    return None


def _epoch(text: str) -> float | None:
    try:
        return time.mktime(time.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S"))
    except ValueError:  # Unknown, None: not started
        return None


def run(cmd: list[str], timeout_s: float = 60.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        raise DispatchError(f"{cmd[0]} is not on PATH: run on a SLURM login node (or start the dev cluster)")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None  # the controller is slow: the next poll asks again
    return proc.stdout if proc.returncode == 0 else (proc.stdout or None)


# ----------------------------------------------------------------------------------------------- texts
def exit_text(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        oom = " (the kernel's OOM killer sends SIGKILL)" if -code == 9 else ""
        return f"killed by {name}{oom}"
    return f"exit code {code}"


def slurm_exit_text(exit_code: str) -> str:
    code, _, sig = exit_code.partition(":")
    if sig and sig != "0":
        return exit_text(-int(sig)) if sig.isdigit() else f"signal {sig}"
    return f"exit code {code}"


def last_stderr_line(job) -> str | None:
    """The last meaningful line the job wrote to stderr (its traceback's last line, usually)."""
    try:
        path = (job.task(0) if getattr(job, "num_tasks", 1) > 1 else job).paths.stderr
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().decode(errors="replace").splitlines()
    except (OSError, AttributeError):
        return None
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith(("submitit INFO", "submitit WARNING", "srun: ")):
            return text[:300]
    return None


