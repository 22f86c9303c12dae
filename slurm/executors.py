"""Login-node side of job submission: typed resources in, a plain submitit executor out (never imports torch).

    from slurm.executors import Resources
    res = Resources(partition="gpu", gpus_per_node=4, timeout_min=180, setup=["source .venv/bin/activate"])
    res.submitit_parameters("trial-7")       # what submitit's AutoExecutor.update_parameters gets

The executors themselves are built by the backends (slurm/backend.py: make_backend, make_executor); following
jobs (states, results, retries) is slurm/dispatch.py's work. For a dev cluster: `eval "$(slurm/dev-cluster.sh env)"`.

Pinning the code: `snapshot_code(study_folder / "code")` copies the project's packages once, and
a backend built with `code_dir=that folder` starts every job's Python with the snapshot first on its path and
without the working directory in front of it (`python -P`, Python >= 3.11): jobs run the code the study
started with even if the checkout changes (a `git pull` mid-study), and requeued jobs too.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

LOCAL_PARAMETERS = ("name", "timeout_min", "gpus_per_node", "tasks_per_node")
REPO = Path(__file__).resolve().parents[1]
CODE_PACKAGES = ("orchestrator", "jobs", "evaluation", "slurm")  # what jobs import from the project

# sbatch options that Resources sets itself: an extra directive naming one of them would silently fight it.
_OWNED_DIRECTIVES = {
    "partition": "partition", "nodes": "nodes", "ntasks_per_node": "tasks_per_node",
    "cpus_per_task": "cpus_per_task", "gpus_per_node": "gpus_per_node", "gres": "gpus_per_node",
    "mem": "mem_gb", "time": "timeout_min", "account": "account", "qos": "qos", "constraint": "constraint",
    "signal": "signal_delay_s", "job_name": "make_executor(job_name=...)",
}


class ResourcesError(ValueError):
    """A resource value is invalid; the message names the field, the bad value and the fix."""


@dataclass
class Resources:
    """What one evaluation job asks of the scheduler (one SLURM job, possibly several nodes)."""

    # SLURM partition; None uses the cluster's default partition.
    partition: str | None = None
    # Nodes of one job. With several, every node's tasks are ranks of one torch.distributed run (rendezvous at the
    # first node; jobs/model.distributed_env): the trial's strategy decides what spans them (fsdp shards the model).
    nodes: int = 1
    # GPUs per node, requested as --gpus-per-node (GRES); 0 for a CPU-only job.
    gpus_per_node: int = 0
    # Processes per node. None means one task per GPU (or 1 without GPUs): submitit starts every task with
    # srun, each task runs the submitted function as one torch.distributed rank (what torchrun
    # --nproc_per_node=GPUS would do; jobs.finetune.distributed_env reads submitit's environment). Set 1 to
    # run a single process that launches its own workers. With several tasks use job.results() (one per task).
    tasks_per_node: int | None = None
    cpus_per_task: int = 1
    # Memory per node in GB; None takes the partition's default (DefMemPerCPU/DefMemPerNode).
    mem_gb: float | None = None
    # Wall-clock limit (sbatch --time) in minutes.
    timeout_min: int = 60
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    # Any other sbatch directive, e.g. {"mail-type": "FAIL", "exclusive": True}: submitit's
    # slurm_additional_parameters, written as "#SBATCH --KEY=VALUE".
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # Shell lines run by the batch script before the job starts (SLURM only: module load, venv activation).
    setup: list[str] = field(default_factory=list)
    # Seconds before the time limit at which SLURM sends USR2: the job saves its checkpoint and stops, and
    # the orchestrator continues the trial in a fresh job if `retries.on` has "timeout". SLURM may send it up
    # to 60 s earlier than asked (its event loop ticks once a minute). None: 180 s, enough for a 7B adapter
    # and its optimizer state (r=512 on q/v of Llama-2-7b: ~3 GB) on a parallel file system, or a quarter
    # of the limit for short jobs (a 2-minute test job would otherwise be signalled right after it starts).
    signal_delay_s: int | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "cpus_per_task", "timeout_min"):
            _check_int(name, getattr(self, name))
        _check_min("nodes", self.nodes, 1, "ask for at least one node")
        _check_min("gpus_per_node", self.gpus_per_node, 0, "use 0 for a CPU-only job")
        _check_min("cpus_per_task", self.cpus_per_task, 1, "ask for at least one CPU per task")
        _check_min("timeout_min", self.timeout_min, 1, "give the wall-clock limit in whole minutes")
        if self.tasks_per_node is None:
            self.tasks_per_node = max(1, self.gpus_per_node)
        _check_int("tasks_per_node", self.tasks_per_node)
        _check_min("tasks_per_node", self.tasks_per_node, 1, "leave it unset for one task per GPU")
        if self.mem_gb is not None and (isinstance(self.mem_gb, bool) or not isinstance(self.mem_gb, (int, float))
                                        or not self.mem_gb > 0):
            _fail("mem_gb", self.mem_gb, "must be a positive number of GB, or None for the partition's default")
        for name in ("partition", "account", "qos", "constraint"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or any(c.isspace() for c in value)):
                _fail(name, value, "must be a non-empty name without spaces, or None to leave it to the cluster")
        self._check_signal_delay()
        self._check_additional_parameters()
        if not isinstance(self.setup, (list, tuple)) or not all(isinstance(line, str) for line in self.setup):
            _fail("setup", self.setup, 'must be a list of shell lines, e.g. ["module load cuda/12.1"]')
        self.setup = list(self.setup)

    def _check_signal_delay(self) -> None:
        limit_s = self.timeout_min * 60
        if self.signal_delay_s is None:
            self.signal_delay_s = min(180, limit_s // 4)
        _check_int("signal_delay_s", self.signal_delay_s)
        if not 0 <= self.signal_delay_s < limit_s:
            _fail("signal_delay_s", self.signal_delay_s,
                  f"must be >= 0 and below the time limit ({limit_s} s); leave it None for a safe default")

    def _check_additional_parameters(self) -> None:
        if not isinstance(self.additional_parameters, Mapping):
            _fail("additional_parameters", self.additional_parameters, 'must be a dict like {"mail-type": "FAIL"}')
        for key, value in self.additional_parameters.items():
            if not isinstance(key, str) or not key or key.startswith("-"):
                _fail("additional_parameters", key, 'keys are sbatch option names without dashes, e.g. "mail-type"')
            owner = _OWNED_DIRECTIVES.get(key.replace("-", "_"))
            if owner:
                _fail("additional_parameters", key, f"is set by Resources itself: use {owner} instead")
            if not isinstance(value, (str, int, float)):
                _fail(f"additional_parameters[{key!r}]", value, "must be a string, a number or True")
        self.additional_parameters = dict(self.additional_parameters)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Resources":
        """Build from configuration data (YAML, JSON); unknown keys are rejected with the valid ones listed."""
        valid = [f.name for f in dataclasses.fields(cls)]
        if "max_num_timeout" in data:
            raise ResourcesError("resources.max_num_timeout was removed: the orchestrator retries trials itself; "
                                 "write retries: {on: [timeout], max_retries: N} to continue timed-out trials")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ResourcesError(f"unknown resources key(s) {unknown}; valid keys are: {', '.join(valid)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        """The AutoExecutor.update_parameters arguments; slurm_* ones are ignored by local and debug."""
        params: dict[str, Any] = {
            "name": job_name, "timeout_min": self.timeout_min, "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node, "tasks_per_node": self.tasks_per_node,
            "cpus_per_task": self.cpus_per_task, "mem_gb": self.mem_gb,
            "slurm_partition": self.partition, "slurm_account": self.account, "slurm_qos": self.qos,
            "slurm_constraint": self.constraint, "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": dict(self.additional_parameters) or None,
            "slurm_setup": list(self.setup) or None,
        }
        if not self.gpus_per_node:
            # "--gpus-per-node=0" is an error on clusters that declare no GPU GRES: leave it out.
            del params["gpus_per_node"]
        return {k: v for k, v in params.items() if v is not None}


def _fail(name: str, value: Any, fix: str) -> None:
    raise ResourcesError(f"Resources.{name}={value!r} is invalid: {fix}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"must be a whole number (got {type(value).__name__})")


def _check_min(name: str, value: int, minimum: int, fix: str) -> None:
    if value < minimum:
        _fail(name, value, f"must be >= {minimum}: {fix}")


def slurm_available(timeout_s: float = 10.0) -> bool:
    """True when `sbatch` is on PATH and the controller answers `sinfo` (SLURM_CONF must point at it)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    try:
        subprocess.run(["sinfo", "-h", "-o", "%P"], check=True, capture_output=True, timeout=timeout_s)
    except (subprocess.SubprocessError, OSError):
        return False
    return True


def snapshot_code(dest: str | Path, root: Path = REPO, packages: Iterable[str] = CODE_PACKAGES) -> Path:
    """Copy the project's packages from `root` into `dest`, unless `dest` exists (a resumed study keeps its
    snapshot). Built beside it and renamed into place: a crash leaves no half snapshot."""
    dest = Path(dest)
    if dest.is_dir():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in packages:
        if (root / name).is_dir():
            shutil.copytree(root / name, partial / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    os.replace(partial, dest)
    return dest


def pinned_path(code_dir: str | Path) -> str:
    """The PYTHONPATH of a pinned job: the code snapshot first, then the submitting directory (for user
    objective modules)."""
    return f"{Path(code_dir).resolve()}{os.pathsep}{os.getcwd()}"


def pinned_python(code_dir: str | Path, shell: bool) -> str | None:
    """The command that starts a job's Python with `code_dir` first on its path (pinned_path). `-P` keeps
    `python -m` from putting the working directory (a checkout that may have changed) in front. For a shell
    (the sbatch script) the job's own PYTHONPATH is kept after them. None before Python 3.11, which has no -P."""
    if sys.version_info < (3, 11):
        warnings.warn(f"jobs cannot be pinned to {code_dir} before Python 3.11 (python -P): they import the project "
                      "from the working directory", stacklevel=2)
        return None
    path = pinned_path(code_dir)
    python = shlex.quote(sys.executable)
    if shell:
        return f"env {shlex.quote('PYTHONPATH=' + path)}${{PYTHONPATH:+:$PYTHONPATH}} {python} -P"
    inherited = os.environ.get("PYTHONPATH")
    return f"env {shlex.quote('PYTHONPATH=' + path + (os.pathsep + inherited if inherited else ''))} {python} -P"


def submit_tasks(executor, tasks, name: str) -> list:
    """Submit tasks (each a slurm.dispatch.Task) with a submitit executor under one job name: one job, or one job
    array for several (submitit's batch()). Raises what the scheduler raised."""
    executor.update_parameters(name=name)
    if len(tasks) == 1:
        return [executor.submit(tasks[0].fn, *tasks[0].args)]
    with executor.batch():
        jobs = [executor.submit(t.fn, *t.args) for t in tasks]
    return jobs


def sbatch_preview(resources: Resources, folder: str | Path, job_name: str, code_dir: str | Path | None = None) -> str:
    """The batch script a study's job would be submitted with, without a cluster (for --dry-run): the text
    submitit's own writer (submitit.slurm.slurm._make_sbatch_string) makes from these resources."""
    from submitit.slurm.slurm import _convert_mem, _make_sbatch_string

    python = (pinned_python(code_dir, shell=True) if code_dir else None) or shlex.quote(sys.executable)
    r = resources
    params = {"job_name": job_name, "partition": r.partition, "time": r.timeout_min, "nodes": r.nodes,
              "ntasks_per_node": r.tasks_per_node, "cpus_per_task": r.cpus_per_task,
              "gpus_per_node": r.gpus_per_node or None, "qos": r.qos, "account": r.account,
              "constraint": r.constraint, "mem": _convert_mem(r.mem_gb) if r.mem_gb else None,
              "signal_delay_s": r.signal_delay_s, "setup": list(r.setup) or None,
              "additional_parameters": dict(r.additional_parameters) or None}
    command = " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=str(folder), **{k: v for k, v in params.items()
                                                                       if v is not None})
