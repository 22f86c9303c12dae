"""The noise-aware champion rule: rank a study's trials by a model's mean of their loss, not by the loss one
seed happened to give.

    order = rank_by_model_mean(points, values, space, feasible=None)   # indices, best first
    champion = trials[order[0]]

A real validation loss moves with the training seed (bench/data/tiny_landscape.json: the same point, three
seeds), so the trial with the lowest observed loss is often a lucky draw next to better points. This rule fits
a Gaussian process with a noise term (orchestrator/search/searchers/gp.py) to every successful, feasible trial
of the study (their points in NOMAD's encoding scaled to the unit box), and ranks by its posterior mean at the
trial's own point: a lucky value is pulled towards its neighbours', a point whose neighbours confirm it moves up.
Only a trained adapter can be registered, so the rule ranks trials, never model-predicted points. The
candidates are the trials whose observed loss is within ``SPREAD`` fitted noise sds of the best observed one
(no trial the data clearly ranks worse can win); they come first, by model mean, then the rest by observed
value, then the failed or infeasible ones (by observed value; failed last). Without noise the fitted noise is
tiny, the mean at a trial is its value and the rule agrees with "lowest loss". Fewer than ``MIN_TRIALS``
successes: ranked by observed value. Pure function: no state, no I/O; deterministic.

Where the study uses it (wiring by orchestrator/search/champion.py): ``champion_rule: mean``;
bench/search_quality.py reports the true loss of the trial each rule would register.
"""
from __future__ import annotations

import math

import numpy as np

from orchestrator.search.space import SearchSpace

SPREAD = 3.0       # candidates: observed loss <= best + SPREAD x fitted noise sd
MIN_TRIALS = 6     # below this, the observed loss decides
CAP = 0.8          # losses above this quantile are capped for the model (the good region is what matters)


def model_means(points: list[dict], values: list[float], space: SearchSpace) -> tuple[np.ndarray, float]:
    """The GP posterior mean at each point, and the fitted noise sd, from these (point, value) pairs."""
    from orchestrator.search.searchers.gp import GP
    from orchestrator.search.searchers.mads_steps import Box
    box = Box.from_space(space)
    u = box.scale(np.array([space.to_nomad(p) for p in points], float))
    gp = GP(u, np.asarray(values, float), cap=CAP)
    return gp.predict(u)[0], gp.noise_sd


def rank_by_model_mean(points: list[dict], values: list[float | None], space: SearchSpace,
                       feasible: list[bool] | None = None) -> list[int]:
    """Indices of the trials, best first (see the module docstring). ``values[i]`` None = failed;
    ``feasible[i]`` False = a constraint is violated (default: all feasible)."""
    if len(points) != len(values) or (feasible is not None and len(feasible) != len(values)):
        raise ValueError(f"rank_by_model_mean: {len(points)} points, {len(values)} values"
                         + (f", {len(feasible)} feasibility flags" if feasible is not None else "")
                         + "; give one of each per trial")
    feasible = [True] * len(values) if feasible is None else list(feasible)
    ok = [i for i, v in enumerate(values) if v is not None and math.isfinite(v) and feasible[i]]
    by_value = sorted(ok, key=lambda i: values[i])
    rest = sorted((i for i in range(len(values)) if i not in set(ok)),
                  key=lambda i: (values[i] is None or not math.isfinite(values[i]),
                                 values[i] if values[i] is not None else 0.0))
    if len(ok) < MIN_TRIALS:
        return by_value + rest
    means, noise_sd = model_means([points[i] for i in ok], [values[i] for i in ok], space)
    mean_of = dict(zip(ok, means))
    best = values[by_value[0]]
    candidates = [i for i in by_value if values[i] <= best + SPREAD * noise_sd]
    head = sorted(candidates, key=lambda i: (mean_of[i], values[i]))
    return head + [i for i in by_value if i not in set(candidates)] + rest
