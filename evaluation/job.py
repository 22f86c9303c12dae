"""What `python -m orchestrator evaluate` submits: a torch-free trampoline that runs one evaluation in the job.

    from evaluation.job import EvaluationJob
    from evaluation.spec import EvaluationSpec
    executor.submit(EvaluationJob(), EvaluationSpec(base="tiny", adapter="runs/s/trials/0003/adapter",
                                                    tasks="mmlu,humaneval", limit=2,
                                                    out="runs/s/evaluations/0003-ab12").to_dict())

Submitit pickles the callable by reference: this module imports neither torch nor the evaluator, which are
imported inside the job (evaluation.runner, or evaluation.harness for lm-eval). The spec (evaluation/spec.py,
validated before anything runs) is written to OUT/spec.json first, so any evaluation can be rerun by hand:

    python -m evaluation --config OUT/spec.json

The job writes OUT/scores.json (and OUT/records/) and returns a small dict: status "ok" | "failed", reason,
scores, protocol. A failure inside the evaluation is returned as data, not raised. On a time-out SLURM signals
USR2 and submitit requeues the same call (an evaluation restarts from the beginning: it has no checkpoint).
"""
from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from evaluation.spec import EvaluationSpec

try:  # keep this module importable without submitit (it is on the login node and in every job anyway)
    from submitit.helpers import Checkpointable
except ImportError:  # pragma: no cover
    Checkpointable = object


def as_spec(spec: EvaluationSpec | dict) -> EvaluationSpec:
    """The spec of a job. Compatibility: a dict with the former `greedy` flag (orchestrator evaluate before its
    `evaluation:` section) maps greedy=true to decoding greedy and greedy=false to the default protocol."""
    if isinstance(spec, EvaluationSpec):
        return spec
    spec = dict(spec)
    if spec.pop("greedy", None):
        spec.setdefault("decoding", "greedy")
    return EvaluationSpec.from_dict(spec)


class EvaluationJob(Checkpointable):
    def __call__(self, spec: EvaluationSpec | dict) -> dict:
        spec = as_spec(spec)  # an invalid spec raises here, before any output exists
        if not spec.out:
            raise ValueError("evaluation spec has no out: give the output folder")
        out = Path(spec.out)
        out.mkdir(parents=True, exist_ok=True)
        spec.to_json(out / "spec.json")
        t0 = time.time()
        try:
            result = _run(spec)
        except Exception as e:  # the evaluation's failure is this job's result
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            outcome = {"status": "failed", "reason": reason, "scores": {}, "traceback": traceback.format_exc()}
        else:
            outcome = {"status": "ok", "reason": None, "scores": result["scores"]}
        outcome["protocol"] = spec.protocol()
        outcome["total_s"] = time.time() - t0
        (out / "job_result.json").write_text(json.dumps(outcome, indent=2, default=str) + "\n")
        return outcome


def _run(spec: EvaluationSpec) -> dict:
    threads = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("LORA_HPO_THREADS")
    if threads:
        import torch  # heavy: only inside the job
        torch.set_num_threads(int(threads))
    if spec.harness == "lm-eval":
        from evaluation import harness
        return harness.evaluate(spec.base, spec.adapter, spec.tasks, limit=spec.limit, out=spec.out,
                                batch_size=spec.batch_size, device=spec.device, dtype=spec.dtype,
                                include_path=spec.include_path, tracking_uri=spec.tracking_uri,
                                protocol=spec.protocol())
    from evaluation import runner
    return runner.evaluate(spec)
