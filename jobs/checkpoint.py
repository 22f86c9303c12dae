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

Sharded models (strategy fsdp: the LoRA weights and their AdamW state are DTensors, each rank holding a slice)
write `step-NNNNNNN.shards/rank-R-of-W.pt`, each rank its own slice, without talking to the other ranks: a
stop signal reaches the ranks at different points of a step, so a collective save (torch.distributed.checkpoint,
or a gather to rank 0) in a signal handler would wait on ranks that are elsewhere. A step counts once all W
files are there; `load` takes the newest complete one of either layout, puts the slices back together (FSDP2
cuts dimension 0 in rank order) and hands the full state to torch's set_model_state_dict /
set_optimizer_state_dict, so a checkpoint resumes under any world size or strategy.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
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


def writes(rank: int, model) -> bool:
    """Whether this rank writes checkpoints: rank 0, or every rank of a sharded model."""
    return rank == 0 or _is_sharded(model)


def save(out: Path, step: int, model, optimizer, scheduler, keep: int = 1, rng: dict | None = None,
         together: bool = False) -> None:
    """Write the checkpoint of `step`. Sharded: this rank's slice; `together` (every rank saves the same step at
    the same point of the loop) then waits for all ranks and lets rank 0 drop the older checkpoints."""
    if _is_sharded(model):
        _save_shard(Path(out) / CHECKPOINT_DIR, step, model, optimizer, scheduler, rng or rng_state())
        if together:
            torch.distributed.barrier()
            if torch.distributed.get_rank() == 0:
                _prune(Path(out) / CHECKPOINT_DIR, keep)
        return
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
    folder = Path(out) / CHECKPOINT_DIR
    found = sorted([*folder.glob("step-*.pt"), *_complete_shards(folder)], key=lambda p: p.name)
    step = _restore(found[-1], model, optimizer, scheduler) if found else 0
    if _is_sharded(model):  # every rank has read the files: now drop slices of steps past the one resumed from
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            drop_incomplete(out, step)
    return step


def _restore(path: Path, model, optimizer, scheduler) -> int:
    state = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else _join_shards(path)
    if _is_sharded(model):
        _set_sharded(model, optimizer, state)
    else:
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


# ----------------------------------------------------------------------------------------------- sharded (fsdp)
def _is_sharded(model) -> bool:
    return any(hasattr(p, "to_local") for p in model.parameters() if p.requires_grad)


def _local(value):
    """A DTensor's slice on this rank, recursively through dicts and lists (optimizer state)."""
    if hasattr(value, "to_local"):
        return value.to_local().detach().cpu()
    if isinstance(value, dict):
        return {k: _local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_local(v) for v in value)
    return value


def _save_shard(folder: Path, step: int, model, optimizer, scheduler, rng: dict) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the optimizer's parameter order
    state = {"step": step, "names": names, "adapter": {n: _local(p) for n, p in model.named_parameters()
                                                       if p.requires_grad},
             "optimizer": _local(optimizer.state_dict()), "scheduler": scheduler.state_dict(), "rng": rng}
    shards = folder / f"step-{step:07d}.shards"
    shards.mkdir(parents=True, exist_ok=True)
    tmp = shards / f".rank-{rank}-of-{world}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, shards / f"rank-{rank}-of-{world}.pt")


def _complete_shards(folder: Path) -> list[Path]:
    complete = []
    for shards in folder.glob("step-*.shards"):
        files = list(shards.glob("rank-*-of-*.pt"))
        worlds = {f.stem.rsplit("-of-", 1)[1] for f in files}
        if len(worlds) == 1 and len(files) == int(worlds.pop()):
            complete.append(shards)
    return complete


def _join_shards(shards: Path) -> dict:
    """One rank's view of a sharded checkpoint: full tensors (the slices concatenated along dimension 0, in rank
    order, as FSDP2 cut them), the optimizer state in torch's own layout, this rank's RNG if it saved one."""
    files = sorted(shards.glob("rank-*-of-*.pt"), key=lambda f: int(f.stem.split("-")[1]))
    parts = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
    first = parts[0]

    def joined(values):
        return torch.cat(values) if values[0].dim() > 0 else values[0]

    adapter = {n: joined([p["adapter"][n] for p in parts]) for n in first["names"]}
    optim_state = {i: {k: joined([p["optimizer"]["state"][i][k] for p in parts]) for k in s}
                   for i, s in first["optimizer"]["state"].items()}
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    mine = parts[rank] if rank < len(parts) else first
    return {"step": first["step"], "names": first["names"], "adapter": adapter, "scheduler": first["scheduler"],
            "optimizer": {"state": optim_state, "param_groups": first["optimizer"]["param_groups"]},
            "rng": mine["rng"]}


def _set_sharded(model, optimizer, state: dict) -> None:
    """Full adapter and optimizer state onto a sharded model: each rank keeps its slice (torch's own API)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, state["adapter"], options=options)
    optim = state["optimizer"]  # torch's layout (parameters by index) -> by name, as set_optimizer_state_dict takes
    by_name = {"state": {names[int(i)]: s for i, s in optim["state"].items()},
               "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in optim["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` complete sharded checkpoints; drop older ones and older incomplete ones."""
    complete = sorted(_complete_shards(folder), key=lambda p: p.name)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    if complete:
        for partial in folder.glob("step-*.shards"):
            if partial.name < complete[-1].name and partial not in complete:
                shutil.rmtree(partial, ignore_errors=True)


def drop_incomplete(out: Path, step: int) -> None:
    """Remove sharded checkpoints past `step` (the one resumed from): slices that a stopped attempt left behind
    for a step its other ranks never saved. Rank 0 calls it once every rank has loaded."""
    for shards in (Path(out) / CHECKPOINT_DIR).glob("step-*.shards"):
        if int(shards.name[5:12]) > step:
            shutil.rmtree(shards, ignore_errors=True)
