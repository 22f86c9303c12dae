"""The global side of the asynchronous MADS (async_mads.py): one Gaussian process over every point tried.

MADS is a local search: its poll and its quadratic model look around one incumbent, so a deeper basin
elsewhere is found only by luck (a Latin-hypercube point, a restart). ``GlobalModel`` gives it what Optuna's
GP sampler has and MADS lacks, used in four places:

- a **global search step** (``propose``): the point of the largest expected improvement (times the
  probability that every constraint holds) among random points of the whole box and perturbations of the
  best points, the running points "believed" at their predicted mean so that parallel proposals spread out;
- a **noise-aware incumbent** (``means`` / ``noise_sd``): the model's mean at the points tried, so that a poll
  centre is not a lucky draw next to better points;
- **constraint models** (``feasible``): the probability that a point satisfies every constraint, so that
  polls predicted infeasible are held back (async_mads.py says when);
- **basins** (``separated``, ``other_basin``): the hill-valley test on the model's mean (a point of the segment
  between two points is higher than both ends, by more than the fitted noise: they lie in different basins),
  so that a new episode of the MADS starts in a basin no earlier episode polled, and stays there.

The GP (gp.py) is refitted (hyperparameters by marginal likelihood) when the data grew by ``REFIT_GROWTH`` or
``REFIT_EVERY`` points since the last fit, and otherwise only updated with the new points (same hyperparameters):
a fit costs tens of milliseconds, an update one Cholesky factorization. Deterministic given its inputs and the
``numpy.random.Generator`` passed to ``propose``. Tested by ``python -m pytest tests/test_search_models.py``.
"""
from __future__ import annotations

import numpy as np

from orchestrator.search.searchers.base import violation
from orchestrator.search.searchers.gp import GP, expected_improvement, feasible_probability
from orchestrator.search.searchers.mads_steps import Box
from orchestrator.search.category import Category
from orchestrator.search.space import SearchSpace

RANDOM_CANDIDATES = 1000        # uniform points of the box per proposal
LOCAL_CANDIDATES = 60           # per (best point, scale): gaussian perturbations in the unit box
LOCAL_SCALES = (0.03, 0.1, 0.3)
LOCAL_CENTERS = 5               # the best points perturbed
REFIT_GROWTH, REFIT_EVERY = 1.2, 6
CAP = 0.8                       # the objective's model caps losses above this quantile
MIN_POINTS = 5
XI = 0.05                       # the global step looks for improvements of 5% or more: smaller ones are the poll's
P_FEASIBLE = 0.5                # a poll point less likely than this to be feasible is held back
NOISY = 0.01                    # noisy: a fitted noise sd above 1% of the losses' sd (noise-free fits: ~0.1%)
NOISE_MIN_POINTS = 15           # ... judged on 15 results at least (a few points leave the noise unidentified)
HILL_STEPS = (0.2, 0.4, 0.6, 0.8)   # the hill-valley test's points on a segment
HILL_CANDIDATES = 30            # the best results tried as another basin's centre
TOP = 200                       # proposals scanned for one not seen yet


def choice_mask(space: SearchSpace) -> np.ndarray:
    """Which NOMAD coordinates index a ``category`` (unordered values): the objective's model treats them as
    categories; ordered ``choice`` numbers (the rank, dropout) stay ordered coordinates."""
    by_name = {dim.name: dim for dim in space.dims}
    order = space.nomad_order or [dim.name for dim in space.dims]
    return np.array([isinstance(by_name[name], Category) for name in order])


class GlobalModel:
    """GPs of the objective and of each constraint over ``(x, value, constraints)`` results (NOMAD encoding)."""
    LCB = 0

    def __init__(self, box: Box, n_constraints: int = 0, categorical: np.ndarray | None = None):
        self.box, self.n_constraints = box, n_constraints
        self.categorical = categorical
        self._theta: dict = {}          # model -> (points at its last fit, hyperparameters)
        self._data: tuple = ()
        self.objective: GP | None = None
        self.constraints: list[GP] = []
        self._u = np.zeros((0, len(box.lo)))

    def fit(self, objective: list[tuple[np.ndarray, float]], constraints: list[tuple[np.ndarray, tuple]]) -> bool:
        """(Re)build the models from the objective's (x, value) and the constraints' (x, values); False when
        there are too few points for a model."""
        key = (tuple(f for _, f in objective), len(constraints), tuple(objective[-1][0]) if objective else ())
        if key == self._data:
            return self.objective is not None
        self._data = key
        if len(objective) < MIN_POINTS:
            self.objective = None
            return False
        self._u = self.box.scale(np.array([x for x, _ in objective]))
        self.objective = self._gp("objective", self._u, np.array([f for _, f in objective]), CAP)
        self.constraints = []
        if self.n_constraints and len(constraints) >= MIN_POINTS:
            uc = self.box.scale(np.array([x for x, _ in constraints]))
            for j in range(self.n_constraints):
                y = np.array([cs[j] for _, cs in constraints])
                self.constraints.append(self._gp(f"c{j}", uc, y, None, categorical=False))
        return True

    def _gp(self, name: str, u: np.ndarray, y: np.ndarray, cap: float | None, categorical: bool = True) -> GP:
        """A constraint's model sees every choice as ordered (a bound on memory grows with the rank: a trend to
        extrapolate); the objective's sees ``categorical`` (choice_mask: ``category`` dimensions as categories,
        ordered ``choice`` numbers such as the rank as ordered coordinates)."""
        cat = self.categorical if categorical else None
        fitted, theta = self._theta.get(name, (0, None))
        if theta is not None and len(y) < max(fitted * REFIT_GROWTH, fitted + REFIT_EVERY):
            return GP(u, y, cap=cap, theta=theta, categorical=cat)
        gp = GP(u, y, cap=cap, start=theta, categorical=cat)
        self._theta[name] = (len(y), gp.theta)
        return gp

    # -- what the search asks ------------------------------------------------------------------
    @property
    def noise_sd(self) -> float:
        return self.objective.noise_sd if self.objective is not None else 0.0

    @property
    def noisy(self) -> bool:
        """The fitted noise sd exceeds NOISY x the sd of the losses (a noise-free fit stays near 0.1%)."""
        return self.objective is not None and len(self.objective.z) >= NOISE_MIN_POINTS and \
            self.objective.noise_sd > NOISY * self.objective.scale

    def means(self, xs: np.ndarray) -> np.ndarray:
        return self.objective.predict(self.box.scale(np.atleast_2d(xs)))[0]

    def feasible(self, xs: np.ndarray) -> np.ndarray:
        """P(every constraint holds) at ``xs`` (1 without constraint models)."""
        p = np.ones(len(np.atleast_2d(xs)))
        u = self.box.scale(np.atleast_2d(xs))
        for gp in self.constraints:
            p = p * feasible_probability(*gp.predict(u))
        return p

    def propose(self, best: np.ndarray, incumbent: float | None, pending: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
        """Candidates sorted by acquisition, best first: EI over ``incumbent`` (None: no feasible point yet,
        then the probability of feasibility alone) times P(feasible); ``best`` are the points whose
        neighbourhoods are searched too; ``pending`` are believed at their predicted mean."""
        d = len(self.box.lo)
        xs = [self.box.from_unit(rng.random((RANDOM_CANDIDATES, d)))]   # Box methods take rows too
        for center in self.box.scale(np.atleast_2d(best))[:LOCAL_CENTERS]:
            for scale in LOCAL_SCALES:
                u = center + scale * rng.normal(size=(LOCAL_CANDIDATES, d))
                xs.append(self.box.snap(self._from_unit(u)))
        xs = np.unique(np.vstack(xs), axis=0)
        model = self.objective.believe(self.box.scale(pending)) if len(pending) else self.objective
        mean, sd = model.predict(self.box.scale(xs))
        if self.LCB:
            score = -(mean - self.LCB * sd) if incumbent is not None else self.feasible(xs)
            score = score - score.min() + 1e-12
        else:
            score = self.feasible(xs) if incumbent is None else expected_improvement(mean, sd, incumbent)
        if incumbent is not None and self.constraints:
            score = score * self.feasible(xs)
        order = np.lexsort((mean, -score))
        return xs[order]

    def _from_unit(self, u: np.ndarray) -> np.ndarray:
        """Unit box -> NOMAD coordinates (clipped; integers rounded by ``Box.snap``): local perturbations keep
        their distance, unlike ``Box.from_unit``'s equal shares."""
        return self.box.lo + np.clip(u, 0.0, 1.0) * self.box.span



class GlobalSearch:
    """What the asynchronous MADS asks of the global model, from its results ``[(key, x, value, constraints)]``
    (failures included: they are left out here)."""

    def __init__(self, box: Box, kinds: tuple, categorical: np.ndarray | None):
        self.box, self.kinds = box, kinds
        self.model = GlobalModel(box, len(kinds), categorical)

    def fit(self, results: list) -> tuple | None:
        """(successes best first as (key, x, value, constraints), best feasible value or None); None when there
        are too few for a model."""
        done = [r for r in results if r[2] is not None]
        objective = [(x, f) for _, x, f, cs in done if not violation(cs, self.kinds)[0]]
        if not self.model.fit(objective, [(x, cs) for _, x, _, cs in done if self.kinds]):
            return None
        ranked = sorted(done, key=lambda r: (violation(r[3], self.kinds), r[2]))
        feasible = [f for _, _, f, cs in ranked if violation(cs, self.kinds) == (False, 0)]
        return ranked, (feasible[0] if feasible else None)

    def point(self, results: list, pending: np.ndarray, rng: np.random.Generator, unseen) -> np.ndarray | None:
        """The unseen point (``unseen(x)`` True) of largest expected improvement over ``XI`` below the best
        feasible value (times P(feasible)), the ``pending`` points believed at their predicted mean."""
        fitted = self.fit(results)
        if fitted is None:
            return None
        ranked, best = fitted
        if best is not None and self.model.noisy:   # the best model mean, not a lucky draw
            feasible = [x for _, x, _, cs in ranked if violation(cs, self.kinds) == (False, 0)]
            best = float(np.min(self.model.means(np.array(feasible))))
        # the losses' sd stands in for a loss near 0, where 5% of it is no gain at all
        target = None if best is None else best - XI * max(abs(best), self.model.objective.scale)
        pending = np.asarray(pending, float).reshape(-1, len(self.box.lo))
        proposals = self.model.propose(np.array([x for _, x, _, _ in ranked]), target, pending, rng)
        return next((x for x in proposals[:TOP] if unseen(x)), None)

    def other_basin(self, results: list, converged: list, allowed) -> tuple | None:
        """The best feasible result ``(key, x, value, constraints)`` (``allowed(x)`` True) that the objective's model
        separates from every ``converged`` point (``separated``); None without a model or such a result."""
        fitted = self.fit(results)
        if fitted is None or not converged:
            return None
        for row in fitted[0][:HILL_CANDIDATES]:
            if violation(row[3], self.kinds) == (False, 0) and allowed(row[1]) and \
                    self.separated(results, row[1], converged):
                return row
        return None

    def separated(self, results: list, x: np.ndarray, converged: list) -> bool:
        """The hill-valley test on the model's mean: on the segment from ``x`` to each ``converged`` point some
        point is higher than both ends (by more than the fitted noise), so ``x`` lies in another basin. True
        without a model or converged points."""
        if not converged or self.fit(results) is None:
            return True
        ends = self.box.scale(np.array(converged, float))
        u = self.box.scale(np.asarray(x, float))
        gp = self.model.objective
        segments = np.vstack([u + t * (ends - u) for t in HILL_STEPS])           # steps x converged
        mean = gp.predict(segments)[0].reshape(len(HILL_STEPS), len(ends))
        here, there = gp.predict(u[None])[0][0], gp.predict(ends)[0]
        return bool(np.all(mean.max(axis=0) > np.maximum(here, there) + self.model.noise_sd))

    def held_back(self, results: list, xs: list) -> list[bool]:
        """Per point: the constraint models give it less than P_FEASIBLE chance of feasibility."""
        if not self.kinds or not xs or self.fit(results) is None or not self.model.constraints:
            return [False] * len(xs)
        return list(self.model.feasible(np.array(xs)) < P_FEASIBLE)

    def mean_center(self, results: list, candidates: list) -> tuple | None:
        """Under noise (``GlobalModel.noisy``): the index of the candidate point of lowest model mean, and that
        mean; None without noise or model."""
        if not candidates or self.fit(results) is None or not self.model.noisy:
            return None
        means = self.model.means(np.array(candidates))
        return int(np.argmin(means)), float(np.min(means))
