"""Cheap synthetic objectives: stand-ins for a LoRA fine-tuning run, for dry runs, tests and benches.

``paper_landscape`` is shaped like the paper's findings (Tribes et al., arXiv 2312.00949): the
validation loss falls with the LoRA rank and alpha, is about quadratic in log10(lr) with an optimum
near 5e-4 (at r = 512, alpha = 64; LoRA scales its update by alpha / r, so the best lr moves with
both: a diagonal valley that coordinate moves alone follow slowly), dropout 1 makes
the adapter useless (loss as if untrained), and the default point scores about 1.2 against a best of
``OPTIMUM`` = 0.92 (paper: default 1.167, best found 0.93-0.96). It takes a decoded-hyperparameter
dict, as a study's ``--objective orchestrator.search.landscapes:paper_landscape`` would pass it, and returns
a float; extra keys (fixed values) are ignored.

``two_basins`` is the harder one (bench/parallel_efficiency.py): the paper's shape lifted by
``DECOY_LIFT`` is a broad basin whose best (0.95, at the paper's corner) is a decoy, and a narrower,
deeper basin around ``TWO_BASINS_POINT`` holds the optimum ``TWO_BASINS_OPTIMUM`` = 0.90: within 1%
of it needs r and dropout exactly right and alpha, lr close. A searcher that only follows the paper's
slope towards high rank and alpha ends 5% short. Evaluations are noisy when ``noise_sd`` > 0.

``measured_landscape`` is measured, not made up: the validation loss of real tiny-preset LoRA fine-tunes over a
Latin hypercube of the paper's space, three training seeds per point (``MEASURED``, written by
bench/measure_landscape.py, which states its settings and cost). As a tabular objective it answers with the
nearest measured point (in NOMAD's encoding scaled to the unit box: r index, dropout index, alpha, log10 lr):
the mean over its seeds (the true value), or with ``rng``, one of its seeds drawn at random (what one more
fine-tune would give). A point whose fine-tunes all failed is a failure (None).

Try it: ``python -c "from orchestrator.search.landscapes import *; print(paper_landscape(OPTIMUM_POINT))"``
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np

UNTRAINED = 1.60          # loss of the base model without a useful adapter
OPTIMUM = 0.92            # the landscape's minimum, at OPTIMUM_POINT
OPTIMUM_POINT = {"r": 512, "alpha": 64, "dropout": 0.0, "lr": 5e-4}
DECOY_LIFT = 0.03         # two_basins: the paper's basin, lifted, is the decoy
TWO_BASINS_OPTIMUM = 0.90
TWO_BASINS_POINT = {"r": 32, "alpha": 20, "dropout": 1e-3, "lr": 2e-4}


def paper_landscape(hp: dict, noise_sd: float = 0.0, rng: np.random.Generator | None = None) -> float:
    """Synthetic validation loss of LoRA hyperparameters ``hp`` (keys r, alpha, dropout, lr).

    ``noise_sd`` > 0 adds Gaussian evaluation noise drawn from ``rng`` (seeded by the caller).
    """
    r, alpha, dropout, lr = float(hp["r"]), float(hp["alpha"]), float(hp["dropout"]), float(hp["lr"])
    if dropout >= 1.0:
        loss = UNTRAINED   # every LoRA input is dropped: the adapter never learns
    else:
        rank_gap = 0.12 * (1.0 - math.log2(r / 4.0) / 7.0)           # 0 at r = 512
        alpha_gap = 0.15 * (1.0 - (alpha - 1.0) / 63.0)               # 0 at alpha = 64
        # LoRA scales its update by alpha / r: the best lr moves with both (a diagonal valley)
        effective_lr = math.log10(lr) + 0.5 * math.log10(alpha / 64.0) - 0.25 * math.log10(r / 512.0)
        lr_gap = 0.035 * (effective_lr - math.log10(5e-4)) ** 2       # quadratic in log10(lr)
        dropout_gap = 0.2 * dropout                                    # 0.02 at the default 0.1
        loss = min(UNTRAINED, OPTIMUM + rank_gap + alpha_gap + lr_gap + dropout_gap)
    if noise_sd > 0:
        loss += float((rng or np.random.default_rng()).normal(0.0, noise_sd))
    return loss


def two_basins(hp: dict, noise_sd: float = 0.0, rng: np.random.Generator | None = None) -> float:
    """Synthetic loss with two basins: ``paper_landscape`` + ``DECOY_LIFT``, and a deeper, narrower one.

    The deep basin is quadratic in log2(r), log10(dropout) (0 counts as 1e-5), alpha and log10(lr)
    around ``TWO_BASINS_POINT``: one rank or dropout step away costs 0.04, 0.3 decade of lr 0.007.
    ``noise_sd`` > 0 adds Gaussian evaluation noise drawn from ``rng``.
    """
    decoy = paper_landscape(hp) + DECOY_LIFT
    r, alpha, dropout, lr = float(hp["r"]), float(hp["alpha"]), float(hp["dropout"]), float(hp["lr"])
    best = TWO_BASINS_POINT
    if dropout >= 1.0:
        deep = UNTRAINED
    else:
        deep = (TWO_BASINS_OPTIMUM
                + 0.04 * math.log2(r / best["r"]) ** 2
                + 0.04 * (math.log10(max(dropout, 1e-5)) - math.log10(best["dropout"])) ** 2
                + 0.04 * ((alpha - best["alpha"]) / 16.0) ** 2
                + 0.08 * math.log10(lr / best["lr"]) ** 2)
    loss = min(decoy, deep, UNTRAINED + DECOY_LIFT)
    if noise_sd > 0:
        loss += float((rng or np.random.default_rng()).normal(0.0, noise_sd))
    return loss


MEASURED = Path(__file__).resolve().parents[2] / "bench" / "data" / "tiny_landscape.json"


class Table:
    """A measured landscape: the design's points (unit-box coordinates) and each point's seed values."""

    def __init__(self, path: Path = MEASURED):
        from orchestrator.search.searchers.mads_steps import Box
        from orchestrator.search.space import paper_space
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} is missing: measure it with python bench/measure_landscape.py")
        doc = json.loads(Path(path).read_text())
        self.space, self.box = paper_space(), Box.from_space(paper_space())
        self.points = doc["points"]
        runs: dict[int, list] = {i: [] for i in range(len(self.points))}
        for row in doc["rows"]:
            if row["val_loss"] is not None and math.isfinite(row["val_loss"]):
                runs[row["index"]].append(float(row["val_loss"]))
        self.seeds = [runs[i] for i in range(len(self.points))]
        self.means = [float(np.mean(v)) if v else None for v in self.seeds]
        self.units = self.box.scale(np.array([self.space.to_nomad(p) for p in self.points], float))
        self.optimum = min(m for m in self.means if m is not None)
        self.cost = doc.get("cost", {})

    def nearest(self, hp: dict) -> int:
        u = self.box.scale(np.array(self.space.to_nomad(hp), float))
        return int(np.argmin(np.sum((self.units - u) ** 2, axis=1)))

    def __call__(self, hp: dict, rng: np.random.Generator | None = None) -> float | None:
        i = self.nearest(hp)
        if rng is None or not self.seeds[i]:
            return self.means[i]
        return self.seeds[i][int(rng.integers(len(self.seeds[i])))]


@functools.lru_cache(maxsize=4)
def measured_table(path: str = str(MEASURED)) -> Table:
    return Table(Path(path))


def measured_landscape(hp: dict, rng: np.random.Generator | None = None) -> float | None:
    """The loss of the nearest measured point: the mean of its seeds, or with ``rng`` one seed's value."""
    return measured_table()(hp, rng)


def sleeper(hp: dict) -> dict:
    """The landscape after a sleep of $LORA_HPO_SLEEP_S seconds (default 10): a blackbox with a known cost,
    for measuring the orchestrator's own overhead (bench/orchestrator_overhead.py). Reports when it ran."""
    import os
    import time

    start = time.time()
    time.sleep(float(os.environ.get("LORA_HPO_SLEEP_S", "10")))
    return {"objective": paper_landscape(hp), "busy_start": start, "busy_end": time.time()}


# ------------------------------------------------------------------------------------------- the modern space
MODERN_LAYERS = {"q_proj+v_proj": 0, "attention": 1, "all-linear": 2}   # category labels -> capacity step


def modern_landscape(hp: dict, noise_sd: float = 0.0, rng: np.random.Generator | None = None) -> float:
    """Synthetic validation loss over ``modern_space()`` (orchestrator/search/space.py), with the effects and
    interactions reported for these hyperparameters, so that categorical and boolean dimensions matter:

    - capacity: the adapted layers (q,v < attention < all linear) and the usable rank. Standard LoRA scales its
      update by alpha / r = alpha_ratio, so high ranks learn no faster than low ones and the rank's gain stops
      at 32; rsLoRA's alpha / sqrt(r) keeps it growing up to 256 (the rsLoRA paper's finding);
    - DoRA helps where LoRA is weakest: low ranks (nothing at r >= 64);
    - the step: lr x scale (alpha_ratio, x sqrt(r) with rsLoRA) is best at 4e-4 x sqrt(effective_batch / 64)
      (the square-root batch rule), 0.7 of that with all linear layers; quadratic in its log10;
    - no warm-up makes a step above the best one unstable (an extra penalty);
    - epochs: one underfits (more so with large batches: fewer steps), three overfit unless dropout >= 0.05
      or weight decay regularizes; dropout costs a little noise of its own.
    ``noise_sd`` > 0 adds Gaussian evaluation noise drawn from ``rng``. ``modern_optimum()`` gives the minimum.
    """
    from orchestrator.search.category import label

    r, ratio, dropout, lr = float(hp["r"]), float(hp["alpha_ratio"]), float(hp["dropout"]), float(hp["lr"])
    layers = MODERN_LAYERS[label(hp["target_modules"])]
    rslora, dora = bool(hp["use_rslora"]), bool(hp["use_dora"])
    epochs, warmup, decay, batch = (float(hp["epochs"]), float(hp["warmup_ratio"]), float(hp["weight_decay"]),
                                    float(hp["effective_batch"]))
    usable = r if rslora else min(r, 32.0)
    rank_gap = 0.08 * (1.0 - math.log2(usable / 4.0) / 6.0)                   # 0 at r = 256 with rsLoRA
    layer_gap = (0.06, 0.03, 0.0)[layers]
    dora_gain = 0.02 * max(0.0, 1.0 - math.log2(r / 4.0) / 4.0)               # 0.02 at r = 4, 0 from r = 64
    step = math.log10(lr * ratio * (math.sqrt(r) if rslora else 1.0))
    best_step = math.log10(4e-4 * math.sqrt(batch / 64.0) * (0.7 if layers == 2 else 1.0))
    step_gap = 0.05 * (step - best_step) ** 2 + (0.04 * max(0.0, step - best_step) if warmup == 0 else 0.0)
    underfit = 0.03 * (batch / 128.0) if epochs == 1 else 0.0
    overfit = 0.012 * (epochs - 2.0) * (1.0 - min(1.0, dropout / 0.05)) * (1.0 - min(1.0, decay / 0.1)) \
        if epochs > 2 else 0.0
    regular_gain = 0.01 if epochs > 2 else 0.0                                 # a third epoch helps if regularized
    loss = (MODERN_BASE + rank_gap + layer_gap - (dora_gain if dora else 0.0) + step_gap + underfit + overfit
            - regular_gain + 0.05 * dropout + 0.02 * decay + 0.003 * warmup / 0.1)
    if noise_sd > 0:
        loss += float((rng or np.random.default_rng()).normal(0.0, noise_sd))
    return loss


MODERN_BASE = 0.95


def modern_optimum() -> tuple[float, dict]:
    """(minimum, a point reaching it) of ``modern_landscape``: every discrete combination, each with its best lr
    (the step's optimum, clipped to the space's lr range), by enumeration (about 0.2 M points, a few seconds)."""
    import itertools

    from orchestrator.search.space import modern_space

    space = modern_space()
    lr_dim = next(d for d in space.dims if d.name == "lr")
    discrete = [d for d in space.dims if d.name != "lr"]
    best = (math.inf, None)
    for values in itertools.product(*[[d.canonical(v) for v in d.values] for d in discrete]):
        hp = dict(zip([d.name for d in discrete], values))
        scale = hp["alpha_ratio"] * (math.sqrt(hp["r"]) if hp["use_rslora"] else 1.0)
        wide = 0.7 if hp["target_modules"] == "all-linear" else 1.0
        hp["lr"] = lr_dim.canonical(4e-4 * math.sqrt(hp["effective_batch"] / 64.0) * wide / scale)
        loss = modern_landscape(hp)
        if loss < best[0]:
            best = (loss, hp)
    return best
