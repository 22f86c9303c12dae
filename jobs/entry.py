"""What the orchestrator submits: torch-free entry points that import the heavy code only inside the job.

Submitit pickles the callable by reference, so the login node must be able to import it without torch:
these classes live here, and `jobs.finetune` (torch, transformers, peft) is imported on the compute node.

- `FinetuneTrial()(spec_dict)`: one LoRA fine-tune (jobs/finetune.py).
- `ObjectiveTrial()("pkg.module:function", point, out)`: any Python blackbox for `--objective`; the function
  takes the decoded hyperparameters and returns a float or a dict holding "objective" (or "val_loss").
Both return a result dict (jobs.contract.TrialResult.to_dict: status "ok" | "failed", val_loss, reason, ...).

Signals: a job told to stop stops. SIGTERM (scancel, `scontrol requeue`, a preemption, a node shutdown; SLURM
sends SIGKILL KillWait seconds later) and USR2 (sent `signal_delay_s` before the time limit) make the job save a
checkpoint of its last finished optimizer step, append why it stopped to OUT/attempts.jsonl ({"job_id",
"signal", "step", "saved"}), and exit at once (code 128 + signal): no training goes on into KillWait, no
result file is written by a stopped attempt, and the orchestrator (slurm/dispatch.py) continues the trial in a
fresh job that resumes from that checkpoint when its retry policy says so. submitit's own requeue-on-USR2 is not
used (the orchestrator owns every retry). One process at a time works in a trial's folder (a lock): a job that
SLURM gave up for a failed node may still run there while the trial's next attempt starts.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path

from jobs.contract import FAILED, LOCK_FILE, OK, TrialResult, failure_reason, record_attempt, write_result

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class FinetuneTrial:
    def __call__(self, spec: dict) -> dict:
        quiet_third_parties()
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("LORA_HPO_THREADS")
        from jobs import finetune  # heavy: only on the compute node

        if threads:
            finetune.torch.set_num_threads(int(threads))
        out = spec.get("out") or "runs/finetune"
        with _folder_lock(out), stop_on_signals(out, save=finetune.checkpoint_now):
            return finetune.run(spec)


class ObjectiveTrial:
    def __call__(self, target: str, point: dict, out: str | None = None) -> dict:
        with stop_on_signals(out):
            return run_objective(target, point, out)


def run_objective(target: str, point: dict, out: str | None = None) -> dict:
    t0 = time.time()
    try:
        value = load_objective(target)(dict(point))
        value = value if isinstance(value, dict) else {"objective": value}
        objective = value.get("objective", value.get("val_loss"))
        if isinstance(objective, bool) or not isinstance(objective, (int, float)) or not math.isfinite(objective):
            raise ValueError(f"objective returned {objective!r}: expected a finite number")
        extra = {k: v for k, v in value.items() if k not in ("objective", "val_loss", "status", "reason")}
        result = TrialResult(OK, float(objective), None, {k: v for k, v in extra.items() if _plain(v)},
                             {k: v for k, v in extra.items() if not _plain(v)})
    except Exception as e:  # the objective's failure is this trial's result
        result = TrialResult(FAILED, None, failure_reason(e), details={"traceback": traceback.format_exc()})
    result.metrics["total_s"] = time.time() - t0
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        write_result(out, result)
    return result.to_dict()


def _plain(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def job_id() -> str:
    """This job's id as submitit names it (123, or 123_4 for an array task; the local pid), or '?'."""
    try:
        import submitit
        return str(submitit.JobEnvironment().job_id)
    except Exception:  # noqa: BLE001 - not inside a submitit job (by hand, torchrun)
        return os.environ.get("SLURM_JOB_ID", "?")


@contextlib.contextmanager
def stop_on_signals(folder: str | None, save=None):
    """While the body runs in the main thread: on SIGTERM or USR2 save (rank 0; every rank its slice under fsdp),
    record (rank 0), and exit."""
    if threading.current_thread() is not threading.main_thread() or "SUBMITIT_DEBUG_JOB_ID" in os.environ:
        yield  # in the orchestrator's own process (debug executor): its signals are not the job's
        return
    me = job_id()
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        record_attempt(folder, job_id=me, event="start", host=socket.gethostname(), pid=os.getpid(), time=time.time(),
                       rank=task_rank(), node=os.environ.get("SLURM_NODEID"))  # every rank: where each one ran

    stopping = []  # the first signal's name once a stop is under way

    def stop(signum, frame):
        name = signal.Signals(signum).name
        if stopping:  # a second signal (SLURM signals the batch step and the job step; scancel then preemption)
            print(f"jobs.entry: {name} while stopping on {stopping[0]}: the save goes on", file=sys.stderr, flush=True)
            return  # raising here would abort the first signal's checkpoint half-way
        stopping.append(name)
        step = save() if save else None  # the step saved, or None (not rank 0, nothing consistent, no training)
        rank = task_rank()
        note = f"checkpoint of step {step} saved" if step is not None else "nothing new to save"
        print(f"jobs.entry: {name}: {note}; stopping", file=sys.stderr, flush=True)
        if folder and rank == 0:
            record_attempt(folder, job_id=me, event="stop", signal=name, step=step, saved=step is not None,
                           time=time.time())
        raise SystemExit(128 + signum)  # not an Exception: no result is written, no finally retrains

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def task_rank() -> int:
    """This process's rank among the job's tasks (torchrun, a SLURM job's srun tasks, the local executor's)."""
    for name in ("RANK", "SLURM_PROCID", "SUBMITIT_LOCAL_GLOBALID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


@contextlib.contextmanager
def _folder_lock(out: str):
    """Hold <out>/.lock while working there; wait while another process holds it (flock: released when its
    holder dies, and by the NFS lease of a node that is gone). Each rank of a multi-rank job holds its own
    (.lock, .lock.1, ...): a rank waits for the same rank of an attempt that still runs, never for its peers."""
    Path(out).mkdir(parents=True, exist_ok=True)
    rank = task_rank()
    with open(Path(out) / (LOCK_FILE + (f".{rank}" if rank else "")), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"jobs.entry: another process works in {out}: waiting for it to end", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def quiet_third_parties() -> None:
    """Library chatter that says nothing about this run (kept out of the job's log)."""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def load_objective(target: str):
    """Resolve "package.module:function" to the callable, with a message that says how to fix a bad one."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"objective {target!r} must look like package.module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"objective {target!r} cannot be loaded ({e}): check the module path and name") from None
    if not callable(fn):
        raise ValueError(f"objective {target!r} is not callable")
    return fn
