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

Try it: ``python -c "from orchestrator.search.landscapes import *; print(paper_landscape(OPTIMUM_POINT))"``
"""
from __future__ import annotations

import math

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


def sleeper(hp: dict) -> dict:
    """The landscape after a sleep of $LORA_HPO_SLEEP_S seconds (default 10): a blackbox with a known cost,
    for measuring the orchestrator's own overhead (bench/orchestrator_overhead.py). Reports when it ran."""
    import os
    import time

    start = time.time()
    time.sleep(float(os.environ.get("LORA_HPO_SLEEP_S", "10")))
    return {"objective": paper_landscape(hp), "busy_start": start, "busy_end": time.time()}
