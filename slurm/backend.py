"""Executor backends: what SLURM, local processes and the in-process debug executor each do differently.

    backend = make_backend("auto", "runs/s/submitit", Resources(), job_name="s", code_dir="runs/s/code")
    backend.kind                       # "slurm" | "local" | "debug" (auto resolved)
    Dispatcher(backend, record=journal.append)    # slurm/dispatch.py: the one seam clients use

This module is the only place that branches on the executor kind. Each backend is one small class (in the
shape of submitit's per-cluster Job/InfoWatcher) with the same methods:

    submit(tasks, name) -> [job]       submitit jobs (an array on SLURM); raises when the scheduler refuses
    unreachable(error) -> bool         a submission error that means "scheduler unreachable" (retried later)
    refresh(attempts)                  update every attempt's state with one scheduler query
    ended(attempt) -> None | str | Outcome   None: still running; the final state; or an Outcome it settled
                                       itself (SLURM: a requeued job)
    has_result(attempt), result(attempt)      the job's return value, once there
    grace_s(state)                     how long a job over without a result is waited for (NFS)
    cause(attempt, state) -> str       why a job died (state, exit code or signal, OOM, last stderr line)
    retry_kind(state), stop_cause(state)      what a final state means for the retry policy and in words
    settled(attempt, state)            after a failed settlement (SLURM: scancel a copy it may still requeue)
    cancel(attempt), reattach(job_id) -> job | None, recover(name, tasks) -> {key: job_id}
    job_tags(attempt) -> dict          what the trial's MLflow run says about its job
    describe(job_ids) -> {id: (state, reason)}   for `status` (SLURM only; others: {})
    check()                            raise BackendError with one line when the scheduler cannot be used
    pins_code                          jobs import a code snapshot (slurm, local) or run in this process (debug)
    submitted_state                    an attempt's state when submitted (SLURM: PENDING; local, debug: RUNNING)
    prepare()                          process settings its jobs inherit (local: their thread count)
"""
from __future__ import annotations

import shutil
from pathlib import Path

from slurm.executors import Resources, slurm_available
from slurm.states import BackendError  # noqa: F401 (re-exported: callers catch it from here)

KINDS = ("auto", "slurm", "local", "debug")


def resolve_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"executor={kind!r} is invalid: use one of {', '.join(KINDS)}")
    return ("slurm" if slurm_available() else "local") if kind == "auto" else kind


def make_backend(kind: str, folder: str | Path, resources: Resources | None = None, *, job_name: str,
                 code_dir: str | Path | None = None, result_grace_s: float = 10.0):
    """The backend for `kind` ("auto": SLURM when sbatch works and the controller answers, else local)."""
    kind = resolve_kind(kind)
    resources = resources or Resources()
    if kind == "slurm":
        if shutil.which("srun") is None:  # sbatch reports an unreachable controller at submission (check())
            raise BackendError("executor slurm: srun is not on PATH: run on a SLURM login node, or start the "
                               "dev cluster (slurm/dev-cluster.sh start; eval \"$(slurm/dev-cluster.sh env)\")")
        from slurm.cluster import SlurmBackend
        return SlurmBackend(folder, resources, job_name, code_dir, result_grace_s)
    if kind == "local":
        from slurm.local import LocalBackend
        return LocalBackend(folder, resources, job_name, code_dir)
    from slurm.debug import DebugBackend
    return DebugBackend(folder, resources, job_name)


def describe_jobs(kind: str | None, job_ids: list[str]) -> dict:
    """{job id: (state, reason)} of jobs as their scheduler sees them now ({} where it has nothing to say)."""
    if kind != "slurm" or not job_ids:
        return {}
    from slurm.cluster import describe
    return describe(job_ids)


def make_executor(kind: str, folder: str | Path, resources: Resources | None = None, job_name: str = "lora-hpo",
                  code_dir: str | Path | None = None):
    """A plain submitit executor for `kind` with `resources` applied (for scripts and benches that use submitit
    directly; studies go through make_backend and slurm/dispatch.py). debug: submitit's in-process executor."""
    if resolve_kind(kind) == "debug":
        import submitit
        return submitit.AutoExecutor(folder=folder, cluster="debug")
    return make_backend(kind, folder, resources, job_name=job_name, code_dir=code_dir).executor


def submission_preview(kind: str, resources: Resources, folder: str | Path, job_name: str,
                       code_dir: str | Path | None = None) -> tuple[str, str | None]:
    """(what a dry run says about submission, the batch script SLURM would get or None), without a scheduler:
    `kind` is not resolved (auto is not probed)."""
    from slurm.executors import sbatch_preview
    if kind == "local":
        return "executor local: no batch script (jobs run as local processes)", None
    if kind == "debug":
        return "executor debug: no batch script (jobs run in this process)", None
    script = sbatch_preview(resources, folder, job_name, code_dir=code_dir)
    said = "its batch script on SLURM (resources:)" + (" if executor auto finds SLURM (sbatch and sinfo answer)"
                                                       if kind == "auto" else "")
    return said, script
