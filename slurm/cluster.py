"""The SLURM backend: jobs followed through accounting, with the requeue and accounting-lag rules (torch-free).

    backend = SlurmBackend("runs/s/submitit", Resources(gpus_per_node=4), "s", code_dir="runs/s/code")

What SLURM says and what it means for a trial, the subtlest part of dispatching:

- **States from the scheduler, not from submitit's done().** One `sacct -D` (every record of every job,
  requeues included) and one `squeue` per poll (slurm/states.py). A job is final when sacct says so and squeue
  no longer holds it live; pending jobs carry SLURM's reason (Resources, Priority, BeginTime, ReqNodeNotAvail...).
- **Requeues are followed in a fresh job.** A job that SLURM requeued (scontrol requeue, preemption with
  PreemptMode=REQUEUE, an automatic requeue after NODE_FAIL, REQUEUE_HOLD) is cancelled and settled as
  `Outcome(retry="requeued"|"preempted"|"node_fail", follow=True)`: the client submits the task's next
  attempt, which resumes from the trial folder's checkpoint. So no result is ever collected from an attempt
  SLURM requeued, a requeued copy never runs after its trial was settled, and recovery does not wait out the
  BeginTime hold SLURM puts on requeued jobs (cred_expire + 1 s, 121 s by default). What ended the attempt is
  the state accounting recorded before the requeue; slurmdbd may lag, so it is waited for up to
  REQUEUE_CAUSE_WAIT_S (the copy is cancelled at once either way).
- **Accounting lags the controller.** A job that ran, that squeue does not hold live, and that sacct names not
  at all or by its one PENDING record, has not been recorded by slurmdbd yet: its state is unknown this poll,
  not PENDING (which would look like a requeue). A poll on which sacct or squeue did not answer changes no state.
- **A final job's result may lag too** (NFS): waited for `result_grace_s` after COMPLETED or FAILED, briefly
  after a kill; then the cause is read from sacct's exit code and the job's stderr.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import submitit
from submitit.core.utils import JobPaths

from slurm.dispatch import Attempt, Outcome
from slurm.executors import Resources, pinned_python, slurm_available, submit_tasks
from slurm.states import (FINAL, LIVE, OOM_MARKS, REQUEUE_STATES, WAITING, BackendError, SlurmInfo, last_stderr_line,
                          run, slurm_exit_text, slurm_snapshot)

REQUEUE_CAUSE_WAIT_S = 60.0  # how long a requeued attempt waits for sacct to record why (then: REQUEUED)
# What sbatch says when it cannot reach the controller (a scheduler outage, not a refused request)
UNREACHABLE = re.compile(r"unable to contact slurm controller|connect(ion)? (failure|refused|timed out)|"
                         r"socket timed out|slurm_load_(jobs|partitions) error|zero bytes were transmitted|"
                         r"communication connection failure|slurm controller is not responding", re.IGNORECASE)
STOP_CAUSES = {"TIMEOUT": "the time limit was reached", "DEADLINE": "the deadline was reached",
               "PREEMPTED": "preempted", "CANCELLED": "cancelled", "NODE_FAIL": "its node failed"}


class SlurmBackend:
    kind = "slurm"
    pins_code = True
    submitted_state = "PENDING"  # queued until the scheduler starts it

    def __init__(self, folder, resources: Resources, job_name: str, code_dir=None, result_grace_s: float = 10.0):
        self.folder, self.resources, self.job_name = Path(folder), resources, job_name
        self._grace_s = result_grace_s
        python = pinned_python(code_dir, shell=True) if code_dir is not None else None
        # max_num_timeout=0: submitit never requeues a job itself; the orchestrator decides
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm", slurm_max_num_timeout=0,
                                              **({"slurm_python": python} if python else {}))
        self.executor.update_parameters(**resources.submitit_parameters(job_name))

    # ------------------------------------------------------------------------------------------- submit
    def check(self) -> None:
        if not slurm_available():
            raise BackendError("executor slurm: the SLURM controller does not answer (sinfo failed): check "
                               "SLURM_CONF and that slurmctld runs, or use --executor local")

    def submit(self, tasks, name: str) -> list:
        return submit_tasks(self.executor, tasks, name)

    def unreachable(self, error: BaseException) -> bool:
        return bool(UNREACHABLE.search(str(error)))

    def prepare(self) -> None:
        pass

    # ------------------------------------------------------------------------------------------- states
    def refresh(self, attempts: list[Attempt]) -> None:
        info = slurm_snapshot([a.job_id for a in attempts])
        for a in attempts:
            if a.job_id in info:
                _apply(a, info[a.job_id])

    def ended(self, a: Attempt):
        requeued = a.requeued_since is not None or a.state in REQUEUE_STATES or \
            (a.state in WAITING and (a.ran or len(a.history) > 1))
        if requeued:  # SLURM will run it again: go on in a fresh job instead (see the module docstring)
            return self._requeued(a)
        return a.state if a.state in FINAL else None

    def _requeued(self, a: Attempt) -> Outcome | None:
        if a.requeued_since is None:
            a.requeued_since = time.time()
            self.cancel(a)  # at once: SLURM's copy must never run
        earlier = a.history[:-1]  # what ended the attempt: the state sacct recorded for the run before the requeue
        before = next((s for s in reversed(earlier) if s in FINAL), None) or \
            next((s for s in reversed(earlier) if s in REQUEUE_STATES), None)
        if before is None:
            if time.time() - a.requeued_since < REQUEUE_CAUSE_WAIT_S:
                return None
            before = "REQUEUED"
        kind = FINAL.get(before) or "requeued"
        # a node failure counts against the retry policy; a preemption or a requeue asked for is followed
        reason = f"job {a.job_id} was requeued by SLURM (after {before}): continued in a fresh job"
        return Outcome(a.task.result_type.failed(reason), a.state, retry=kind, follow=kind != "node_fail")

    # ------------------------------------------------------------------------------------------- results
    def has_result(self, a: Attempt) -> bool:
        return _task0(a.job).paths.result_pickle.exists()

    def result(self, a: Attempt):
        return _task0(a.job).result()

    def grace_s(self, state: str) -> float:
        return self._grace_s if state in ("COMPLETED", "FAILED") else min(self._grace_s, 2.0)  # killed: none coming

    def cause(self, a: Attempt, state: str) -> str:
        parts = [f"state {state}"] + ([slurm_exit_text(a.exit_code)] if a.exit_code else [])
        tail = last_stderr_line(a.job)
        if state == "OUT_OF_MEMORY" or (tail and any(m in tail.lower() for m in OOM_MARKS)):
            parts.append("out of memory: ask for more memory (resources.mem_gb) or lower the batch")
        if tail:
            parts.append(f"last stderr line: {tail}")
        return "; ".join(parts)

    def retry_kind(self, state: str) -> str | None:
        return FINAL.get(state)

    def stop_cause(self, state: str) -> str:
        return STOP_CAUSES.get(state, "cancelled, requeued or preempted")

    def settled(self, a: Attempt, state: str) -> None:
        if state not in ("COMPLETED", "FAILED", "CANCELLED"):
            run(["scancel", a.job_id])  # a copy SLURM may still requeue must never run after this

    # ------------------------------------------------------------------------------------------- jobs
    def cancel(self, a: Attempt) -> None:
        run(["scancel", a.job_id])

    def reattach(self, job_id: str):
        return submitit.SlurmJob(folder=self.folder, job_id=job_id)  # its requeues are read from sacct -D

    def recover(self, name: str, tasks) -> dict[str, str]:
        """The array named `name`: task i of the batch is array index i. A job whose submitit pickle is missing
        (the crash came after sbatch, before submitit renamed the pickle to ``<id>_submitted.pkl``) cannot run: it
        would wait 60 s for the pickle and fail, a failed trial for a crash of the login node. It is cancelled and
        left out, so that its task is submitted again."""
        found = self._named(name, tasks)
        for key, job_id in list(found.items()):
            if not JobPaths(self.folder, job_id=job_id).submitted_pickle.exists():
                run(["scancel", job_id])
                del found[key]
        return found

    def _named(self, name: str, tasks) -> dict[str, str]:
        ids = set()
        for cmd in (["squeue", "-h", "-r", "--states=all", "-n", name, "-o", "%i"],
                    ["sacct", "-n", "-X", "-P", "-S", "now-7days", "--name", name, "-o", "JobID"]):
            out = run(cmd)
            ids |= {line.strip() for line in (out or "").splitlines() if line.strip() and "[" not in line}
        ids = sorted(ids)
        if len(ids) == 1 and len(tasks) == 1 and "_" not in ids[0]:
            return {tasks[0].key: ids[0]}
        found = {}
        for job_id in ids:
            _, _, index = job_id.partition("_")
            if index.isdigit() and int(index) < len(tasks):
                found[tasks[int(index)].key] = job_id
        return found

    def job_tags(self, a: Attempt, final_state: str | None = None) -> dict:
        return {"executor": "slurm", "job_id": a.job_id, "slurm_job_id": a.job_id,
                "slurm_node": a.node or None, "slurm_state": final_state}


def describe(job_ids: list[str]) -> dict:
    """{job id: (state, pending reason, start time or None)} from one sacct + one squeue call ({} if SLURM is
    not reachable)."""
    from slurm.states import DispatchError
    try:
        return {k: (v.state, v.reason, v.start) for k, v in slurm_snapshot(job_ids).items()}
    except DispatchError:
        return {}


def _task0(job):
    return job.task(0) if getattr(job, "num_tasks", 1) > 1 else job


def _apply(a: Attempt, info: SlurmInfo) -> None:
    if a.ran and not info.live and (not info.history or info.history == ["PENDING"]):
        # a job that ran, that squeue does not hold (any more), and that accounting names not at all or as its
        # one PENDING record: sacct lags the start (slurmdbd is behind on a busy controller). Unknown this poll,
        # not PENDING again, which would look like a requeue (a requeued job is live in squeue, and sacct -D
        # keeps the record of the run it ended)
        return
    a.state, a.reason, a.history = info.state, info.reason, info.history or a.history
    a.node = info.node or a.node
    a.exit_code = info.exit_code
    a.elapsed_s = info.elapsed_s if info.elapsed_s is not None else a.elapsed_s
    a.gpus, a.cpus = (info.gpus if info.gpus is not None else a.gpus), (info.cpus or a.cpus)
    if info.state in LIVE:
        a.ran = True
        a.started = a.started or info.start

