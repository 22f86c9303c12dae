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

STATUSES = ("ok", "failed", "pruned", "infeasible")  # a job reports ok or failed; the orchestrator records
# pruned trials, and infeasible ones (a constraint known before training: never submitted)
SUMMARY_MAX_CHARS = 2000   # a text value kept in the journal's summary (the full result stays in the folder)
SUMMARY_MAX_KEYS = 200


@dataclass
class TrialResult:
    """What one evaluation produced. `value` is the objective (the validation loss of a fine-tune)."""

    status: str
    value: float | None = None
    reason: str | None = None
    # Scalar outcomes: numbers (train_loss, tokens_per_s, peak_memory_bytes, trainable_params, *_s timings...)
    # and short texts (device, dtype...). Nested data (the spec, library versions) stays in result.json.
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"TrialResult.status={self.status!r} is invalid: use one of {', '.join(STATUSES)}")
        if self.status == "ok" and not _finite(self.value):
            self.status, self.reason = "failed", f"objective is {self.value!r}: expected a finite number"
            self.value = None
        if self.status != "ok":
            self.value = None
            self.reason = self.reason or "the job reported a failure without a reason"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, reason: str, **metrics) -> "TrialResult":
        return cls("failed", None, reason, metrics)

    @classmethod
    def from_dict(cls, data: Any) -> "TrialResult":
        """From result.json or a job's return value: {"status", "val_loss" (or "value"), "reason", ...}."""
        if not isinstance(data, dict):
            return cls.failed(f"job returned {type(data).__name__}, expected a result dict")
        status = data.get("status") if data.get("status") in STATUSES else "failed"
        value = data["value"] if "value" in data else data.get("val_loss")  # "value": an objective other than val_loss
        metrics = {k: v for k, v in data.items() if k not in ("status", "value", "reason") and _scalar(v)
                   and not (k == "val_loss" and "value" not in data)}
        return cls(status, float(value) if _finite(value) else None, data.get("reason"), metrics)

    def to_dict(self) -> dict:
        return {"status": self.status, "val_loss": self.value, "reason": self.reason, **self.metrics}

    def summary(self) -> dict:
        """The scalar outcomes, bounded in size, for the study journal (a huge return value stays out)."""
        kept = {}
        for k, v in list(self.metrics.items())[:SUMMARY_MAX_KEYS]:
            if isinstance(v, str) and len(v) > SUMMARY_MAX_CHARS:
                v = v[:SUMMARY_MAX_CHARS] + "..."
            kept[str(k)[:200]] = v
        return kept


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


def write_result(folder: str | Path, result: dict) -> None:
    """Write OUT/result.json atomically (a reader never sees half a file)."""
    path = Path(folder) / RESULT_FILE
    tmp = path.with_name(f".{RESULT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def finished_ok(folder: str | Path, adapter: bool = True) -> dict | None:
    """The folder's result when it is a complete success (status ok, and the adapter present when `adapter`)."""
    result = read_result(folder)
    if result and result.get("status") == "ok" and (not adapter or (Path(folder) / ADAPTER_DIR).is_dir()):
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
