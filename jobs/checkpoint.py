"""Checkpoints of a LoRA run: adapter weights, optimizer, scheduler, step and RNG states, in OUT/checkpoints/.

    from jobs import checkpoint
    checkpoint.save(out, step, model, optimizer, scheduler, keep=1)
    step = checkpoint.load(out, model, optimizer, scheduler)       # 0 when there is none
    with checkpoint.saving(save_now):                             # what checkpoint.now() calls meanwhile
        ...training...

`now()` is for signal handlers (jobs/entry.py: a job about to be requeued, preempted, cancelled or timed out):
it saves the last finished optimizer step through the function the training loop registered, or returns None
when nothing consistent can be saved (outside the loop, on a rank other than 0, during an update). A
checkpoint file appears whole or not at all (written beside, renamed into place).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from jobs.contract import CHECKPOINT_DIR

_save_now = None  # the training loop's "save the last finished step" function, while it runs


def now() -> int | None:
    """Save the last finished optimizer step now; the step saved, or None."""
    return _save_now() if _save_now else None


@contextlib.contextmanager
def saving(save_now):
    """Register `save_now` for now() while the body runs (unregistered whatever way the body ends)."""
    global _save_now
    _save_now = save_now
    try:
        yield
    finally:
        _save_now = None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def save(out: Path, step: int, model, optimizer, scheduler, keep: int = 1, rng: dict | None = None) -> None:
    state = {
        "step": step,
        "adapter": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng or rng_state(),
    }
    folder = Path(out) / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    tmp = folder / f".step-{step:07d}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, folder / f"step-{step:07d}.pt")
    for old in sorted(folder.glob("step-*.pt"))[:-keep]:
        old.unlink()


def load(out: Path, model, optimizer, scheduler) -> int:
    """Restore the newest checkpoint; returns the step to continue from (0 when there is none)."""
    found = sorted((Path(out) / CHECKPOINT_DIR).glob("step-*.pt"))
    if not found:
        return 0
    state = torch.load(found[-1], map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["adapter"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def trim_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint we resume from, so the curve has no doubled steps."""
    if path.exists():
        keep = []
        for line in path.read_text().splitlines():
            try:
                if line and json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:  # a line torn by the kill that ended the previous attempt
                continue
        path.write_text("".join(line + "\n" for line in keep))
