"""What `python -m orchestrator evaluate` submits: a torch-free trampoline that runs one evaluation in the job.

    from evaluation.job import EvaluationJob
    executor.submit(EvaluationJob(), {"base": "tiny", "adapter": "runs/s/trials/0003/adapter",
                                      "tasks": "mmlu,humaneval", "limit": 2, "out": "runs/s/evaluations/0003-ab12"})

Submitit pickles the callable by reference: this module imports neither torch nor the evaluator, which are
imported inside the job (evaluation.runner, or evaluation.harness for lm-eval). The spec is written to
OUT/spec.json first, so any evaluation can be rerun by hand:

    python -m evaluation --base BASE --adapter ADAPTER --tasks TASKS --limit N --out OUT

The job writes OUT/scores.json (and OUT/records/) and returns a small dict: status "ok" | "failed", reason,
scores. A failure inside the evaluation is returned as data, not raised. On a time-out SLURM signals USR2
and submitit requeues the same call (an evaluation restarts from the beginning: it has no checkpoint).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

try:  # keep this module importable without submitit (it is on the login node and in every job anyway)
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object

SPEC_KEYS = ("base", "adapter", "tasks", "limit", "data_dir", "out", "harness", "batch_size", "seed", "greedy",
             "device", "dtype", "tracking_uri", "include_path")


class EvaluationJob(Checkpointable):
    def __call__(self, spec: dict) -> dict:
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"evaluation spec has unknown key(s) {unknown}; valid keys: {', '.join(SPEC_KEYS)}")
        out = Path(spec["out"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(spec, indent=2) + "\n")
        if spec.get("tracking_uri"):  # an adapter given as runs:/ or models:/ is read from that store
            os.environ.setdefault("MLFLOW_TRACKING_URI", spec["tracking_uri"])
        t0 = time.time()
        try:
            result = _run(spec)
        except Exception as e:  # the evaluation's failure is this job's result
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            outcome = {"status": "failed", "reason": reason, "scores": {}, "traceback": traceback.format_exc()}
        else:
            outcome = {"status": "ok", "reason": None, "scores": result["scores"]}
        outcome["total_s"] = time.time() - t0
        (out / "job_result.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        return outcome


def _run(spec: dict) -> dict:
    threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("LORA_HPO_THREADS")
    if threads:
        import torch  # heavy: only inside the job
        torch.set_num_threads(int(threads))
    common = dict(limit=spec.get("limit"), out=spec["out"], batch_size=spec.get("batch_size") or 8,
                  device=spec.get("device"), dtype=spec.get("dtype") or "auto")
    if spec.get("harness", "instructeval") == "lm-eval":
        from evaluation import harness
        return harness.evaluate(spec.get("base"), spec.get("adapter"), spec["tasks"],
                                include_path=spec.get("include_path"), **common)
    from evaluation import runner
    return runner.evaluate(spec.get("base"), spec.get("adapter"), spec["tasks"], data_dir=spec.get("data_dir"),
                           seed=spec.get("seed", 0), greedy=bool(spec.get("greedy")), **common)
