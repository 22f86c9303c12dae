"""What the orchestrator submits: torch-free entry points that import the heavy code only inside the job.

Submitit pickles the callable by reference, so the login node must be able to import it without torch:
these classes live here, and `jobs.finetune` (torch, transformers, peft) is imported on the compute node.

- `FinetuneTrial()(spec_dict)`: one LoRA fine-tune (jobs/finetune.py). On a time-out (or a preemption that
  SLURM signals with USR2) submitit calls `checkpoint()`, which saves the last finished optimizer step and
  requeues the same call. A SIGTERM (SLURM's notice before `scontrol requeue`, a preemption by requeue, a
  cancellation or a node shutdown, followed by SIGKILL after KillWait) saves it too. The requeued job
  continues from that checkpoint in the same output folder, so the trial keeps its identity (and its job id)
  and ends with the result of an uninterrupted run. One process at a time works in a trial's folder (a
  lock): a job that SLURM gave up for a failed node may still run there while the trial's retry starts.
- `ObjectiveTrial()("pkg.module:function", point, out)`: any Python blackbox for `--objective`; the function
  takes the decoded hyperparameters and returns a float or a dict holding "objective" (or "val_loss").
Both return a result dict with at least status ("ok" | "failed"), val_loss and reason.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

try:  # submitit is on the login node and in every job; keep this module importable without it anyway
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError:  # pragma: no cover
    Checkpointable, DelayedSubmission = object, None


class FinetuneTrial(Checkpointable):
    def __call__(self, spec: dict) -> dict:
        threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("LORA_HPO_THREADS")
        from jobs import finetune  # heavy: only on the compute node

        if threads:
            finetune.torch.set_num_threads(int(threads))
        with _folder_lock(spec.get("out") or "runs/finetune"):
            return self._run(finetune, spec)

    def _run(self, finetune, spec: dict) -> dict:
        if threading.current_thread() is not threading.main_thread():  # e.g. a debug executor's thread
            return finetune.run(spec)
        previous = signal.getsignal(signal.SIGTERM)  # submitit's: logs the signal and carries on

        def on_sigterm(signum, frame):
            _checkpoint_now("SIGTERM")
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return finetune.run(spec)
        finally:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def checkpoint(self, spec: dict):  # submitit, on USR2: save, then requeue the same call
        _checkpoint_now("USR2")
        return DelayedSubmission(self, spec)


@contextlib.contextmanager
def _folder_lock(out: str):
    """Hold <out>/.lock while working there; wait while another process holds it (flock: released when its
    holder dies, and by the NFS lease of a node that is gone)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"jobs.entry: another process works in {out}: waiting for it to end", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _checkpoint_now(why: str) -> bool:
    finetune = sys.modules.get("jobs.finetune")  # never import torch from a signal handler
    saved = bool(finetune and finetune.checkpoint_now())
    note = "checkpoint saved" if saved else "nothing consistent to save now (the last checkpoint stands)"
    print(f"jobs.entry: {why}: {note}", file=sys.stderr, flush=True)
    return saved


class ObjectiveTrial(Checkpointable):
    def __call__(self, target: str, point: dict, out: str | None = None) -> dict:
        t0 = time.time()
        result = {"status": "failed", "val_loss": None, "reason": None, "point": point}
        try:
            value = load_objective(target)(dict(point))
            value = value if isinstance(value, dict) else {"objective": value}
            objective = value.get("objective", value.get("val_loss"))
            if objective is None or not math.isfinite(float(objective)):
                raise ValueError(f"objective returned {objective!r}: expected a finite number")
            result.update({k: v for k, v in value.items() if k != "objective"},
                          status="ok", val_loss=float(objective))
        except Exception as e:  # the objective's failure is this trial's result
            result["reason"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            result["traceback"] = traceback.format_exc()
        result["total_s"] = time.time() - t0
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "result.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result

    def checkpoint(self, target: str, point: dict, out: str | None = None):
        return DelayedSubmission(self, target, point, out)


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
