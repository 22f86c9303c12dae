"""The steps of MADS as pure functions, for the asynchronous profile (``async_mads.py``).

Coordinates are NOMAD's (``SearchSpace.to_nomad``): integers for choice indices and ints, log10 for
``log`` reals. Everything is deterministic given the ``numpy.random.Generator`` passed in.

- ``Box``: bounds, which coordinates are integers, snapping (clip to the bounds, round integers;
  NOMAD 4 snaps to bounds too, so a poll step towards a bound lands on it).
- ``frame``: NOMAD-style frame and mesh sizes at a level (0 = the initial frame, 1/8 of each range;
  each level halves the frame; for reals the mesh is a quarter of the frame at level 0 and shrinks
  faster than the frame, as in MADS, so that the poll directions grow dense; integers keep a mesh of
  1 and a frame of at least 1).
- ``poll_steps``: NOMAD's ORTHO 2N directions: a random Householder basis, each column scaled to the
  frame and rounded to the mesh, with its opposite.
- ``latin_hypercube``: a space-filling start (best of several Latin hypercubes by maximin distance).
- ``QuadModel``: a quadratic model of the loss (least squares, ridge-regularised when points are
  few, weighted towards the incumbent), minimized over a trust region on the mesh, as NOMAD's
  quadratic-model search does; it also orders the poll (NOMAD's default ``EVAL_QUEUE_SORT``).
- ``Surrogate``: the loss's model with one (uncapped) model per constraint: candidates predicted
  feasible come first, then by predicted loss, as NOMAD's model search and model-ordered poll
  treat constraints (they minimize the model of f subject to the models of c <= 0).

Tested through the searcher: ``python -m pytest tests/test_async_mads.py``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from orchestrator.search.space import SearchSpace

INITIAL_FRAME = 1 / 8       # of each variable's range, at level 0
MESH_RATIO = 4.0            # frame / mesh of the reals at level 0
MAX_CANDIDATES = 20000      # model minimization: points scored per search
MODEL_WIDTH = 0.5           # squared distance (unit box) at which a point's weight in the model is 1/e
TRUST = 8.0                 # the model is minimized within TRUST frames of the incumbent
CAP_QUANTILE = 0.75         # model values are capped at this quantile of the losses


@dataclass(frozen=True)
class Box:
    lo: np.ndarray
    hi: np.ndarray
    integer: np.ndarray     # bool per coordinate

    @classmethod
    def from_space(cls, space: SearchSpace) -> "Box":
        lower, upper = space.nomad_bounds()
        integer = np.array([kind == "I" for kind in space.nomad_input_types()])
        return cls(np.array(lower, float), np.array(upper, float), integer)

    @property
    def span(self) -> np.ndarray:
        return self.hi - self.lo

    def snap(self, x: np.ndarray) -> np.ndarray:
        x = np.clip(np.asarray(x, float), self.lo, self.hi)
        return np.where(self.integer, np.round(x), x)

    def scale(self, x: np.ndarray) -> np.ndarray:
        """To [0, 1] per coordinate (the model's and the distances' units); a fixed one maps to 0."""
        return (np.asarray(x, float) - self.lo) / np.where(self.span > 0, self.span, 1.0)

    def from_unit(self, u: np.ndarray) -> np.ndarray:
        """From [0, 1]; integers get equal shares of the unit interval per value."""
        u = np.clip(np.asarray(u, float), 0.0, 1.0)
        ints = self.lo + np.minimum(np.floor(u * (self.span + 1)), self.span)
        return np.where(self.integer, ints, self.lo + u * self.span)


def frame(box: Box, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame size, mesh size) per coordinate at ``level`` (negative levels are coarser than the start)."""
    size = box.span * INITIAL_FRAME * 2.0 ** (-level)
    frame_size = np.where(box.integer, np.maximum(1.0, np.round(size)), size)
    mesh_size = np.where(box.integer, 1.0, size * 2.0 ** (-max(level, 0)) / MESH_RATIO)
    return frame_size, mesh_size


def poll_steps(box: Box, level: int, rng: np.random.Generator) -> list[np.ndarray]:
    """ORTHO 2N: the 2n steps +-H_j of a random Householder basis H, scaled to the frame, on the mesh."""
    n = len(box.lo)
    frame_size, mesh_size = frame(box, level)
    v = rng.normal(size=n)
    v /= np.linalg.norm(v)
    basis = np.eye(n) - 2.0 * np.outer(v, v)
    steps = []
    for column in basis.T:
        column = column / np.max(np.abs(column))
        step = np.round(column * frame_size / mesh_size) * mesh_size
        if np.any(step != 0):
            steps += [step, -step]
    return steps


def latin_hypercube(box: Box, n: int, rng: np.random.Generator, tries: int = 20,
                    avoid: np.ndarray | None = None) -> list[np.ndarray]:
    """``n`` points, one per stratum of every coordinate; the most spread of ``tries`` designs (the
    farthest from each other and from the points ``avoid``).

    An integer coordinate with L values gives stratum s the values [sL/n, (s+1)L/n): n <= L points
    take n distinct values, more points share them evenly.
    """
    levels = box.span + 1
    best, best_gap = None, -1.0
    for _ in range(tries):
        strata = np.stack([rng.permutation(n) for _ in box.lo], axis=1).astype(float)
        jitter = rng.random(strata.shape)
        first, last = np.floor(strata * levels / n), np.floor((strata + 1) * levels / n)
        ints = box.lo + first + np.floor(jitter * np.maximum(last - first, 1.0))
        points = np.where(box.integer, np.minimum(ints, box.hi), box.lo + (strata + jitter) / n * box.span)
        scaled = box.scale(points)
        gaps = np.linalg.norm(scaled[:, None] - scaled[None], axis=2) + np.eye(n) * 9.0
        gap = float(gaps.min()) if n > 1 else 9.0
        if avoid is not None and len(avoid):
            gap = min(gap, float(np.linalg.norm(scaled[:, None] - box.scale(avoid)[None], axis=2).min()))
        if gap > best_gap:
            best, best_gap = points, gap
    return list(best)


def farthest_point(box: Box, taken: np.ndarray, rng: np.random.Generator, tries: int = 256,
                   allowed=None) -> np.ndarray:
    """A random point far from every point in ``taken`` (a space-filling search step); ``allowed(candidates)``
    (a boolean mask) restricts the choice where it leaves any candidate."""
    candidates = np.array([box.from_unit(u) for u in rng.random((tries, len(box.lo)))])
    if allowed is not None:
        mask = np.asarray(allowed(candidates), bool)
        candidates = candidates[mask] if mask.any() else candidates
    if len(taken) == 0:
        return candidates[0]
    dist = np.linalg.norm(box.scale(candidates)[:, None] - box.scale(taken)[None], axis=2).min(axis=1)
    return candidates[int(np.argmax(dist))]


def _features(u: np.ndarray) -> np.ndarray:
    """[1, u_i, u_i u_j (i <= j)] per row."""
    n = u.shape[1]
    pairs = [u[:, i] * u[:, j] for i, j in itertools.combinations_with_replacement(range(n), 2)]
    return np.column_stack([np.ones(len(u)), u] + pairs)


class QuadModel:
    """A quadratic model of the loss, from the successful evaluations ``xs``, ``fs``, weighted
    towards ``center`` (the incumbent): f(u) = c + g.u + u.Q.u on the unit box. ``cap=False`` for a
    constraint's model, whose large values matter (they say where it is violated)."""

    def __init__(self, box: Box, xs: np.ndarray, fs: np.ndarray, center: np.ndarray, cap: bool = True):
        self.box = box
        u, uc = box.scale(xs), box.scale(center)
        # Outliers (e.g. dropout 1: the loss of an untrained model) would bend a quadratic away from
        # the good region, which is the one that matters: the values are capped at the 3rd quartile
        # (a flat model where the loss is bad; measured better than capping at Tukey's fence).
        if cap:
            fs = np.minimum(fs, np.quantile(fs, CAP_QUANTILE))
        weights = np.exp(-np.sum((u - uc) ** 2, axis=1) / MODEL_WIDTH)
        a = _features(u)
        ridge = np.full(a.shape[1], 1e-4 * len(fs))   # few points: the least-norm-like model
        ridge[0] = 0.0
        lhs = a.T @ (a * weights[:, None]) + np.diag(ridge)
        coef = np.linalg.lstsq(lhs, a.T @ (weights * fs), rcond=None)[0]
        n = len(box.lo)
        self.c, self.g, self.q = coef[0], coef[1:n + 1], np.zeros((n, n))
        for value, (i, j) in zip(coef[n + 1:], itertools.combinations_with_replacement(range(n), 2)):
            self.q[i, j] += value / 2
            self.q[j, i] += value / 2

    def _value(self, u: np.ndarray) -> np.ndarray:
        return self.c + u @ self.g + np.einsum("ki,ij,kj->k", u, self.q, u)

    def predict(self, xs: np.ndarray) -> np.ndarray:
        return self._value(self.box.scale(np.atleast_2d(xs)))

    def minimizers(self, center: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
        """Mesh points of the trust region around ``center``, best predicted first.

        Integer coordinates: every combination in the region (a random sample if too many); real
        coordinates: minimized exactly for each, by coordinate descent on the quadratic, then put
        on the mesh around the center (as NOMAD projects its model search's point).
        """
        box = self.box
        frame_size, mesh_size = frame(box, level)
        half = np.minimum(box.span, TRUST * frame_size)
        lo, hi = np.maximum(box.lo, center - half), np.minimum(box.hi, center + half)
        ints = np.flatnonzero(box.integer)
        axes = [np.arange(lo[i], hi[i] + 1.0) for i in ints]
        grid = np.tile(center, (1, 1))
        if len(ints):
            if np.prod([len(axis) for axis in axes], dtype=float) <= MAX_CANDIDATES:
                combos = np.array(list(itertools.product(*axes)), float)
            else:
                combos = np.round(lo[ints] + rng.random((MAX_CANDIDATES, len(ints))) * (hi - lo)[ints])
            grid = np.tile(center, (len(combos), 1))
            grid[:, ints] = combos
        grid = self._minimize_reals(grid, lo, hi)
        on_mesh = center + np.round((grid - center) / mesh_size) * mesh_size
        grid = np.clip(np.where(box.integer, grid, on_mesh), lo, hi)
        return grid[np.argsort(self.predict(grid), kind="stable")]

    def _minimize_reals(self, grid: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        reals = np.flatnonzero(~self.box.integer)
        u, ulo, uhi = self.box.scale(grid), self.box.scale(lo), self.box.scale(hi)
        for _ in range(3 if len(reals) > 1 else 1):
            for j in reals:   # f along u_j: q_jj u_j^2 + b u_j + const, b = g_j + 2 sum_{i != j} q_ij u_i
                b = self.g[j] + 2 * (u @ self.q[:, j] - u[:, j] * self.q[j, j])
                if self.q[j, j] > 0:
                    u[:, j] = np.clip(-b / (2 * self.q[j, j]), ulo[j], uhi[j])
                else:   # concave or flat: the better end
                    ends = np.array([ulo[j], uhi[j]])
                    u[:, j] = ends[(self.q[j, j] * ends[1] ** 2 + b * ends[1]
                                    < self.q[j, j] * ends[0] ** 2 + b * ends[0]).astype(int)]
        return self.box.lo + u * self.box.span


class Surrogate:
    """The objective's QuadModel and one per constraint: points predicted feasible first, then by
    predicted objective. Without constraints, exactly the objective's model."""

    def __init__(self, objective: QuadModel, constraints: list):
        self.objective, self.constraints = objective, constraints

    def predict(self, xs: np.ndarray) -> np.ndarray:
        return self.objective.predict(xs)

    def order(self, xs: np.ndarray) -> np.ndarray:
        xs = np.atleast_2d(xs)
        f = self.objective.predict(xs)
        if not self.constraints:
            return xs[np.argsort(f, kind="stable")]
        infeasible = np.any([model.predict(xs) > 0 for model in self.constraints], axis=0)
        return xs[np.lexsort((f, infeasible))]

    def minimizers(self, center: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
        best = self.objective.minimizers(center, level, rng)
        return self.order(best) if self.constraints else best
