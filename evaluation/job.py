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

The job writes OUT/scores.json (and OUT/records/) and OUT/job_result.json, and returns the same small result
(jobs.contract.EvaluationResult: status "ok" | "failed", reason, scores, protocol, total_s) as a plain dict. A
failure inside the evaluation is returned as data, not raised. On a time-out SLURM signals
USR2 and submitit requeues the same call (an evaluation restarts from the beginning: it has no checkpoint).
"""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from evaluation.spec import EvaluationSpec
from jobs.contract import FAILED, OK, EvaluationResult, TrialResult, failure_reason, write_result

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
            scores = _run(spec)["scores"]
        except Exception as e:  # the evaluation's failure is this job's result
            outcome = EvaluationResult(FAILED, failure_reason(e), details={"traceback": traceback.format_exc()})
        else:
            outcome = EvaluationResult.from_dict({"status": OK, "scores": scores})
        outcome.protocol, outcome.total_s = spec.protocol(), time.time() - t0
        write_result(out, outcome, name="job_result.json")
        return outcome.to_dict()


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


class HeldoutTrial:
    """A trial of a held-out study: the fine-tune (jobs.entry.FinetuneTrial), then its adapter scored on the dev
    subsets of the benchmarks; the objective is 1 - the dev accuracy (weighted by the subsets' sizes), plus
    `weight_val_loss` x the validation loss.

        HeldoutTrial()(finetune_spec_dict, {"tasks": {"mmlu": 300, "drop": 150}, "weight_val_loss": 0.0,
                                            "seed": 0, "evaluation": {...the study's protocol settings...}})

    The dev items are a seeded draw (evaluation.tasks.common.split_dev) that `orchestrator evaluate` leaves
    out of the study's test scores. The result is the fine-tune's with `dev.<task>` scores, `heldout` and
    `value` (the objective) added; a failed fine-tune or evaluation is the trial's failure."""

    def __call__(self, spec: dict, heldout: dict) -> dict:
        from jobs.entry import FinetuneTrial, stop_on_signals

        result = TrialResult.from_dict(FinetuneTrial()(spec))
        if not result.ok:
            return result.to_dict()
        out = Path(spec["out"])
        with stop_on_signals(str(out)):
            try:
                scores = self._dev_scores(spec, heldout, out)
            except Exception as e:  # the evaluation's failure is this trial's failure
                failed = TrialResult(FAILED, None, f"dev evaluation failed: {failure_reason(e)}", result.metrics,
                                     result.details)
                write_result(out, failed)
                return failed.to_dict()
        sizes = heldout["tasks"]
        accuracy = sum(scores[t] * n for t, n in sizes.items()) / sum(sizes.values())
        objective = (1.0 - accuracy) + float(heldout.get("weight_val_loss", 0.0)) * result.value
        scored = TrialResult(OK, objective, None, {**result.metrics, "val_loss": result.value,
                                                   **{f"dev.{t}": scores[t] for t in sizes}, "heldout": objective,
                                                   "dev_accuracy": accuracy}, result.details)
        write_result(out, scored)
        return scored.to_dict()

    @staticmethod
    def _dev_scores(spec: dict, heldout: dict, out: Path) -> dict:
        from evaluation import runner

        settings = {k: v for k, v in (heldout.get("evaluation") or {}).items() if k not in ("tasks", "limit")}
        eval_spec = EvaluationSpec.from_dict({
            **settings, "base": spec.get("base_model"), "adapter": str(out / "adapter"),
            "tasks": ",".join(heldout["tasks"]), "split": "dev", "dev_sizes": dict(heldout["tasks"]),
            "split_seed": int(heldout.get("seed", 0)), "out": str(out / "dev-evaluation")})
        scores = runner.evaluate(eval_spec)["scores"]
        missing = [t for t in heldout["tasks"] if scores.get(t) is None]
        if missing:
            raise ValueError(f"no dev score for {missing}")
        return scores
