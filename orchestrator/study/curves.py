"""Following a running trial's metrics.jsonl (jobs/finetune.py writes it as it trains): new records only.

    follow = Follower(Path(trial_out) / "metrics.jsonl")
    fresh = follow.poll()          # records not seen before: {"step", "loss", ...}, {"step", "val_loss", ...}
    follow.partial                 # [(fraction of training, intermediate val_loss), ...] for the pruner

A line being written is read at the next poll. A file rewritten under us (an attempt that resumes from a
checkpoint trims the records past it) is read again from its start, and the steps already seen are skipped,
so every curve point reaches MLflow once (and a replayed one would be the same row, which MLflow ignores).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


def read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """JSON records appended to `path` since byte `offset`, and the new offset."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(max(offset - 1, 0))
        chunk = f.read()
    if offset and chunk[:1] != b"\n":  # rewritten: a resumed attempt trimmed it to its checkpoint
        offset, chunk = 0, path.read_bytes()
    elif offset:
        chunk = chunk[1:]
    complete = chunk[:chunk.rfind(b"\n") + 1]
    records = []
    for line in complete.decode(errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:  # torn by a rewrite under our feet: steps already seen are skipped
            continue
    return records, offset + len(complete)


@dataclass
class Follower:
    path: Path
    offset: int = 0       # bytes already read
    curve_step: int = 0   # last training step already returned
    val_step: int = -1    # last validation step already returned
    partial: list = field(default_factory=list)  # (fraction, val_loss) of intermediate validation passes

    def poll(self) -> list[dict]:
        records, self.offset = read_new_records(self.path, self.offset)
        curve = [r for r in records if "loss" in r and r.get("step", 0) > self.curve_step]
        val = [r for r in records if "val_loss" in r and r.get("step", 0) > self.val_step]
        for r in val:
            if isinstance(r.get("fraction"), (int, float)) and r["fraction"] < 1:
                self.partial.append((float(r["fraction"]), float(r["val_loss"])))
        self.curve_step = max([self.curve_step] + [r["step"] for r in curve])
        self.val_step = max([self.val_step] + [r["step"] for r in val])
        return curve + val
