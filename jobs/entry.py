"""What the orchestrator submits: torch-free entry points that import the heavy code only inside the job.

Submitit pickles the callable by reference, so the login node must be able to import it without torch:
these classes live here, and `jobs.finetune` (torch, transformers, peft) is imported on the compute node.

- `FinetuneTrial()(spec_dict)`: one LoRA fine-tune (jobs/finetune.py). On preemption or time-out submitit
  calls `checkpoint()`, which requeues the same call; the recipe then continues from its last checkpoint in
  the same output folder, so the trial keeps its identity and ends with the result of an uninterrupted run.
- `ObjectiveTrial()("pkg.module:function", point, out)`: any Python blackbox for `--objective`; the function
  takes the decoded hyperparameters and returns a float or a dict holding "objective" (or "val_loss").
Both return a result dict with at least status ("ok" | "failed"), val_loss and reason.
"""
from __future__ import annotations

import importlib
import json
import math
import os
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
        return finetune.run(spec)

    def checkpoint(self, spec: dict):  # submitit: requeue the same call; the recipe resumes from disk
        return DelayedSubmission(self, spec)


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
