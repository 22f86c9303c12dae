"""The result side of the job contract, and the layout of a trial's output folder (torch-free).

    from jobs.contract import TrialResult, read_result, RESULT_FILE
    result = TrialResult.from_dict(job.result())      # what a job returned (or wrote to OUT/result.json)
    result.ok, result.value, result.reason, result.metrics

A trial's folder (the spec's `out`) holds:

    spec.json        the FinetuneSpec it ran (rerun by hand: python -m jobs.finetune --spec spec.json)
    metrics.jsonl    one JSON record per logged step: {"step", "loss", "lr", ...}, {"step", "val_loss"}, ...
    checkpoints/     the last checkpoints (adapter weights, optimizer, scheduler, step, RNG)
    adapter/         the trained adapter (PEFT format), only after a successful run
    result.json      the result (written last, atomically): status, val_loss, reason, metrics...
    attempts.jsonl   one line per job attempt that started and ended here (job id, why it stopped)
    .lock            held by the one process working in the folder (.lock.N: rank N of a multi-rank job)

Both sides read these names from here: the job writes them (jobs/finetune.py, jobs/entry.py), the login node
reads them (orchestrator) without importing torch. `TrialResult` is one typed view of result.json and of a
job's return value; `read_result` / `write_result` are the only reader and writer of the file.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
ATTEMPTS_FILE = "attempts.jsonl"
LOCK_FILE = ".lock"

OK, FAILED, PRUNED, INFEASIBLE = "ok", "failed", "pruned", "infeasible"
STATUSES = (OK, FAILED, PRUNED, INFEASIBLE)  # a job reports ok or failed; the orchestrator records pruned
# trials, and infeasible ones (a constraint known before training: never submitted)
SUMMARY_MAX_CHARS = 2000   # a text value kept in the journal's summary (the full result stays in the folder)
SUMMARY_MAX_KEYS = 200


# ----------------------------------------------------------------------------------------------- the metrics
@dataclass(frozen=True)
class Metric:
    """One outcome of a trial: the name every reader uses (constraints, objectives, champion rules, plots,
    `compare`, `status`), the result key the job reports it under, and its MLflow name."""
    name: str
    key: str                 # the key in result.json (and in the journal's summary): the raw value
    scale: float = 1.0       # value by `name` = value by `key` x scale (bytes -> GiB, seconds -> hours)
    unit: str = ""
    mlflow: str | None = ""  # the child run's final metric: "" the same as name, None not logged (another row
    #                          logs the same raw value, e.g. train_s for train_hours)
    what: str = ""
    a_priori: bool = False   # known before training (orchestrator/search/criteria.py computes it from the point)

    @property
    def mlflow_name(self) -> str | None:
        return self.name if self.mlflow == "" else self.mlflow


METRICS = (
    Metric("val_loss", "val_loss", unit="nats/token", what="the validation loss (the paper's objective)"),
    Metric("val_loss_before", "val_loss_before", unit="nats/token", what="the base model's validation loss"),
    Metric("train_loss", "train_loss", unit="nats/token", mlflow="train_loss_last_epoch",
           what="the last epoch's mean training loss"),
    Metric("tokens_per_s", "tokens_per_s", unit="tokens/s", mlflow="train_tokens_per_s",
           what="training throughput"),
    Metric("peak_memory_gb", "peak_memory_bytes", scale=2.0 ** -30, unit="GiB",
           what="peak accelerator memory of rank 0 (CPU: peak resident memory)"),
    Metric("trainable_params", "trainable_params", what="LoRA parameters", a_priori=True),
    Metric("peak_memory_gb_estimate", "peak_memory_gb_estimate", unit="GiB", a_priori=True,
           what="GPU memory a rank needs, estimated before training (jobs/memory.py: device_gb)"),
    Metric("adapter_mb", "trainable_params", scale=4e-6, unit="MB", mlflow=None,
           what="the saved adapter's size (fp32: 4 bytes per trainable parameter)", a_priori=True),
    Metric("train_hours", "train_s", scale=1 / 3600, unit="h", mlflow=None,
           what="training time of the successful attempt"),
    Metric("total_hours", "total_s", scale=1 / 3600, unit="h", mlflow=None,
           what="the whole job (setup, training, validation)"),
    Metric("train_s", "train_s", unit="s", what="training time"),
    Metric("eval_s", "eval_s", unit="s", what="validation time"),
    Metric("setup_s", "setup_s", unit="s", what="model and data loading time"),
    Metric("total_s", "total_s", unit="s", what="the job's wall time"),
    Metric("steps", "steps", what="optimizer steps"),
    Metric("epochs_run", "epochs_run", what="epochs the optimizer steps covered (max_steps may pass the epochs)"),
    Metric("embedding_params_trained", "embedding_params_trained",
           what="embedding weights trained with LoRA (trainable_embeddings: as_run), not saved"),
    Metric("n_train", "n_train", what="training examples"),
    Metric("n_val", "n_val", what="validation examples"),
    Metric("pruned_fraction", "pruned_fraction", mlflow="pruned_at_fraction",
           what="the fraction of training at which the pruner stopped the trial"),
    Metric("pruned_val_loss", "pruned_val_loss", mlflow="val_loss_when_pruned",
           what="the intermediate validation loss the pruner judged"),
    Metric("gpu_hours", "gpu_hours", unit="GPU-h",
           what="GPU-hours of all the trial's attempts, from SLURM accounting (CPU-hours for jobs without GPUs)"),
    Metric("heldout", "heldout", what="the held-out objective: 1 - weighted dev accuracy (+ weight x val_loss)"),
    Metric("dev_accuracy", "dev_accuracy", what="the weighted dev-subset accuracy"),
)
BY_NAME = {m.name: m for m in METRICS}
# the job's text outcomes: tags of its run (how it ran: device, precision, strategy, the authors'-run options)
TAGS = ("device", "dtype", "strategy", "quantization", "autocast", "attn_implementation", "tokenizer_class")
PATTERNS = {"dev.": "a task's dev-subset accuracy (dev.mmlu, dev.bbh, dev.drop, dev.humaneval)",
            "constraint.": "a constraint's value c = value - bound (c <= 0: satisfied), per constrained metric"}
# the stepped training curve (metrics.jsonl record key -> MLflow metric); distinct from the final metrics' names
CURVE = {"loss": "train_loss", "lr": "lr", "grad_norm": "grad_norm", "tokens_per_s": "tokens_per_s",
         "val_loss": "val_loss_curve"}


def known_metric(name: str) -> bool:
    return name in BY_NAME or (name.startswith("dev.") and len(name) > 4)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def metrics_of(summary: dict, value: float | None = None) -> dict[str, float]:
    """A finished trial's metrics by name, from its result or journaled summary (raw keys scaled; a value
    reported under the metric's own name, as an --objective function may, wins). `value`: the objective,
    taken as val_loss when the summary has none."""
    s = summary or {}
    out = {}
    for m in METRICS:
        if _number(s.get(m.name)) and m.name != m.key:
            out[m.name] = float(s[m.name])
        elif _number(s.get(m.key)):
            out[m.name] = float(s[m.key]) * m.scale
    if "val_loss" not in out and _number(value):
        out["val_loss"] = float(value)
    for k, v in s.items():
        if _number(v) and k.startswith(tuple(PATTERNS)):
            out[k] = float(v)
        elif _number(v) and k.startswith("c."):  # journals before this vocabulary wrote constraint values so
            out["constraint." + k[2:]] = float(v)
    return out


def mlflow_metrics(summary: dict, value: float | None = None) -> dict[str, float]:
    """The final metrics of a child run: {MLflow name: value} for every metric the summary reports."""
    named = metrics_of(summary, value)
    out = {m.mlflow_name: named[m.name] for m in METRICS if m.mlflow_name and m.name in named}
    out.update({k: v for k, v in named.items() if k.startswith(tuple(PATTERNS))})
    return out


# ----------------------------------------------------------------------------------------------- results
@dataclass
class TrialResult:
    """What one evaluation produced. `value` is the objective (the validation loss of a fine-tune, or the
    held-out objective). The job writes it (result.json, and its return value); the orchestrator reads it."""

    status: str
    value: float | None = None
    reason: str | None = None
    # Scalar outcomes: numbers (by METRICS' keys: train_loss, tokens_per_s, peak_memory_bytes, ...) and short
    # texts (device, dtype...).
    metrics: dict[str, Any] = field(default_factory=dict)
    # Nested data (the spec, library versions, a traceback): in result.json, never in the journal.
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"TrialResult.status={self.status!r} is invalid: use one of {', '.join(STATUSES)}")
        if self.status == OK and not _finite(self.value):
            self.status, self.reason = FAILED, f"objective is {self.value!r}: expected a finite number"
            self.value = None
        if self.status != OK:
            self.value = None
            reason = str(self.reason).strip() if self.reason is not None else ""
            self.reason = reason or "the job reported a failure without a reason"

    @property
    def ok(self) -> bool:
        return self.status == OK

    @classmethod
    def failed(cls, reason: str, **metrics) -> "TrialResult":
        return cls(FAILED, None, reason, metrics)

    @classmethod
    def from_dict(cls, data: Any) -> "TrialResult":
        """From result.json or a job's return value: {"status", "val_loss" (or "value"), "reason", ...}."""
        if isinstance(data, TrialResult):
            return data
        if not isinstance(data, dict):
            return cls.failed(f"job returned {type(data).__name__}, expected a result dict")
        status = data.get("status") if data.get("status") in STATUSES else FAILED
        value = data["value"] if "value" in data else data.get("val_loss")  # "value": an objective other than val_loss
        rest = {k: v for k, v in data.items() if k not in ("status", "value", "reason")
                and not (k == "val_loss" and "value" not in data)}
        return cls(status, float(value) if _finite(value) else None, data.get("reason"),
                   {k: v for k, v in rest.items() if _scalar(v)}, {k: v for k, v in rest.items() if not _scalar(v)})

    def to_dict(self) -> dict:
        own = {"status": self.status, "val_loss": self.metrics.get("val_loss", self.value), "reason": self.reason}
        if "val_loss" in self.metrics:  # the objective is another metric (held-out): both are kept
            own["value"] = self.value
        return {**own, **{k: v for k, v in self.metrics.items() if k != "val_loss"}, **self.details}

    def summary(self) -> dict:
        """The scalar outcomes, bounded in size, for the study journal (a huge return value stays out)."""
        kept = {}
        for k, v in list(self.metrics.items())[:SUMMARY_MAX_KEYS]:
            if isinstance(v, str) and len(v) > SUMMARY_MAX_CHARS:
                v = v[:SUMMARY_MAX_CHARS] + "..."
            kept[str(k)[:200]] = v
        return kept


@dataclass
class EvaluationResult:
    """What one downstream evaluation job produced (evaluation/job.py writes it as job_result.json and returns
    it): per-task scores in [0, 1] (None: no example scored), the protocol it ran under, its wall time."""

    status: str
    reason: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    protocol: dict[str, str] = field(default_factory=dict)
    total_s: float | None = None
    details: dict[str, Any] = field(default_factory=dict)  # a traceback

    def __post_init__(self):
        if self.status not in (OK, FAILED):
            raise ValueError(f"EvaluationResult.status={self.status!r} is invalid: use ok or failed")
        if self.status != OK:
            self.reason = str(self.reason or "").strip() or "the evaluation reported a failure without a reason"

    @property
    def ok(self) -> bool:
        return self.status == OK

    @classmethod
    def failed(cls, reason: str) -> "EvaluationResult":
        return cls(FAILED, reason)

    @classmethod
    def from_dict(cls, data: Any) -> "EvaluationResult":
        if isinstance(data, EvaluationResult):
            return data
        if not isinstance(data, dict):
            return cls.failed(f"job returned {type(data).__name__}, expected an evaluation result")
        status = data.get("status") if data.get("status") in (OK, FAILED) else FAILED
        scores = data.get("scores") if isinstance(data.get("scores"), dict) else {}
        scores = {str(k): (float(v) if _finite(v) else None) for k, v in scores.items()}
        if status == OK and not scores:
            status, data = FAILED, {**data, "reason": "the evaluation reported no score"}
        details = {k: v for k, v in data.items() if k not in ("status", "reason", "scores", "protocol", "total_s")}
        total = data.get("total_s")
        return cls(status, data.get("reason"), scores, dict(data.get("protocol") or {}),
                   float(total) if _finite(total) else None, details)

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "scores": dict(self.scores),
                "protocol": dict(self.protocol), "total_s": self.total_s, **self.details}


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def read_result(folder: str | Path) -> dict | None:
    """OUT/result.json as written by the job, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_result(folder: str | Path, result: "TrialResult | EvaluationResult | dict",
                 name: str = RESULT_FILE) -> None:
    """Write OUT/result.json (or `name`) atomically (a reader never sees half a file)."""
    data = result if isinstance(result, dict) else result.to_dict()
    path = Path(folder) / name
    tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def finished_ok(folder: str | Path, adapter: bool = True) -> dict | None:
    """The folder's result when it is a complete success (status ok, and the adapter present when `adapter`)."""
    result = read_result(folder)
    if result and result.get("status") == OK and (not adapter or (Path(folder) / ADAPTER_DIR).is_dir()):
        return result
    return None


def record_attempt(folder: str | Path, **record) -> None:
    """Append one line to OUT/attempts.jsonl (job id, how the attempt ended): the folder's own history."""
    path = Path(folder) / ATTEMPTS_FILE
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def read_attempts(folder: str | Path) -> list[dict]:
    """OUT/attempts.jsonl's records, oldest first (a torn last line is skipped)."""
    try:
        lines = (Path(folder) / ATTEMPTS_FILE).read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def failure_reason(e: BaseException, limit: int = 300) -> str:
    """One line saying why: "Type: the first non-empty line of the message" (never a bare "Type: ")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:limit]
