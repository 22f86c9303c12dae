"""Asynchronous MADS: NOMAD's ``async`` profile, a free slot gets a point the moment it frees.

Why this design (NOMAD 4.6's own parallel modes, read in its source and tried with PyNomadBBO 4.6):
- ``BB_MAX_BLOCK_SIZE`` K: NOMAD hands out a block and decides nothing until the whole block is back;
  search steps give blocks of one point. ``NB_THREADS_PARALLEL_EVAL`` (the wheel has OpenMP) is an
  ``omp parallel for`` over the blocks of one step with a barrier at its end: the same wait for the
  slowest trial. ``MEGA_SEARCH_POLL`` fills blocks with search and poll points but keeps the barrier.
- COOP-MADS: several MADS in OpenMP threads, each synchronous; which thread proposes what depends on
  thread timing, so a seed no longer fixes the points; independent polls split the slots instead
  of sharing one incumbent. PSD-MADS: "no parallelism" in this build (its help text).
- ``suggest``/``observe``: one cold mega-iteration per call, rebuilt from a cache file; ``observe``
  updates the mesh once per call, so telling results one by one shrinks the mesh after every failed
  point, and points still running are unknown to it.
So asynchrony needs the control outside NOMAD. This module runs MADS itself, the way NOMAD 4 does
with the paper's options plus an initial Latin hypercube (``LH_SEARCH``), and asynchronously in the
sense of APPS (Hough, Kolda, Torczon: asynchronous parallel pattern search): an iteration is a poll
centre (the incumbent) and a frame level; its trial points are a speculative step (after a
success, the same move again), one quadratic-model search point, then the 2n ORTHO 2N poll points
ordered by the model; they are handed out one per free slot, oldest iteration first.
- Opportunism: a result better than the incumbent becomes the centre at once (frame one level
  coarser than the one it was polled at); the rest of the old poll is never handed out.
- Failure of an iteration: every poll point of (centre, level) evaluated, none better: the level
  goes up (the frame halves). Points evaluated before count (NOMAD's cache).
- Free slots while the current poll is all running: the next iteration's points, assuming this one
  fails (same centre, finer level: APPS's speculative refinement), up to ``LOOKAHEAD`` levels, then a
  space-filling point far from everything tried. So ``ask()`` never leaves a slot idle while
  budget remains. When the frame reaches the finest level the poll restarts at level 0 with new
  directions, instead of stopping with budget left as NOMAD does.
- Start: the default point (the paper's X0), then a Latin hypercube of ``lh_points`` points
  (default ``max(2n, K) - 1``: the first K slots are filled with the start alone).
- Failures (value None) count as evaluated, never become the incumbent, stay out of the model.
- Determinism: the directions, the hypercube and the model's sampled candidates come from generators
  seeded by (seed, centre, level, restart); given the seed and the same answers in the same order,
  the same points come out. No process-global state: any number of these may run in one process.
- Resume: ``replay`` tells the history in trial order (the order of the results is not journaled),
  then adopts the running trials as pending; no point is proposed twice (the Ledger's seen set),
  but the continuation may differ from the uninterrupted run where results came back out of order.

Built by ``make_searcher("nomad", space, budget=100, parallel=4, seed=0, options={"profile": "async"})``;
tested by ``python -m pytest tests/test_async_mads.py``.
"""
from __future__ import annotations

import zlib

import numpy as np

from orchestrator.searchers import Ledger, Observation, Pending, Suggestion
from orchestrator.searchers.mads_steps import (Box, QuadModel, farthest_point, latin_hypercube,
                                               poll_steps)
from orchestrator.space import SearchSpace

LEVEL_MIN, LEVEL_MAX = -2, 7   # frame = range/2 .. range/1024 (reals; integers stop at 1)
MODEL_MIN_EXTRA = 2            # the model needs n + 2 successful evaluations
MODEL_SHARE = 2               # with K slots, up to K / 2 model points run at once
LOOKAHEAD = 2                  # finer levels polled ahead while the current poll is running


class AsyncMadsSearcher:
    name = "nomad"

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, lh_points: int | None):
        self._space, self._box, self._seed = space, Box.from_space(space), seed
        self._ledger = Ledger(space, budget, parallel)
        n = len(space.dims)
        lh = max(2 * n, parallel) - 1 if lh_points is None else lh_points
        start = latin_hypercube(self._box, lh, self._rng("lh")) if lh else []
        self._start = [np.array(space.nomad_x0(), float)] + start
        self._results: dict[str, tuple[np.ndarray, float | None]] = {}   # key -> (x, value)
        self._running: dict[int, tuple] = {}   # trial -> (key, x, level, step)
        self._center: tuple[str, np.ndarray, float] | None = None        # incumbent (key, x, value)
        self._move: np.ndarray | None = None   # the step that made the incumbent, for the speculative step
        self._level = 0
        self._restarts = 0
        self._searched: set = set()            # (centre, level, restart, step): search steps done
        self._model: tuple[tuple, QuadModel | None] = ((), None)
        self._explored = 0
        self._model_used: tuple = ()
        self._closed = self._exhausted = False

    # -- protocol ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self._ledger.exhausted or ((self._closed or self._exhausted) and not self._ledger.pending)

    def ask(self) -> Suggestion | None:
        if self._closed or self._exhausted or not self._ledger.can_issue():
            return None
        proposal = self._propose()
        if proposal is None:
            self._exhausted = True   # a small discrete space, every point tried
            return None
        x, level, step = proposal
        point = self._space.from_nomad(list(x))
        suggestion = self._ledger.issue(point, encoded=[float(v) for v in x])
        self._running[suggestion.trial_id] = (self._space.key(point), x, level, step)
        return suggestion

    def tell(self, trial_id: int, value: float | None) -> None:
        _, value = self._ledger.settle(trial_id, value)
        key, x, level, _ = self._running.pop(trial_id)
        self._record(key, x, value, level)

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        results, adopted = self._ledger.replay(history, pending, encode=self._space.to_nomad)
        for point, value in results:
            self._record(self._space.key(point), np.array(self._space.to_nomad(point), float), value, None)
        for suggestion in adopted:
            x = np.array(suggestion.encoded, float)
            self._running[suggestion.trial_id] = (self._space.key(suggestion.point), x, None, "adopted")
        return adopted

    def close(self) -> None:
        self._closed = True

    # -- MADS ----------------------------------------------------------------------------------
    def _rng(self, *tags) -> np.random.Generator:
        words = [zlib.crc32(str(tag).encode()) for tag in tags]
        return np.random.default_rng([self._seed, *words])

    def _key(self, x: np.ndarray) -> str:
        return self._space.key(self._space.from_nomad(list(x)))

    def _record(self, key: str, x: np.ndarray, value: float | None, level: int | None) -> None:
        if key in self._results and self._results[key][1] is not None and value is None:
            return   # a replayed failed attempt of a point that also succeeded
        self._results[key] = (x, value)
        if value is None or (self._center is not None and value >= self._center[2]):
            return
        if self._center is not None and level is not None:   # a MADS point: opportunistic success
            self._move = x - self._center[1]
            self._level = max(LEVEL_MIN, level - 1)
        else:
            self._move = None
        self._center = (key, x, value)

    def _propose(self) -> tuple[np.ndarray, int | None, str] | None:
        for x in self._start:
            if self._key(x) not in self._ledger.seen:
                return x, None, "start"
        self._advance()
        if self._center is not None:
            extra = self._extra_model_point()
            if extra is not None:
                return extra
            for depth in range(LOOKAHEAD + 1):
                level = self._level + depth
                for x, step in self._candidates(level, depth):
                    if self._key(x) not in self._ledger.seen:
                        if step != "poll":
                            self._searched.add((self._center[0], level, self._restarts, step))
                        return x, level, step
        return self._explore()

    def _extra_model_point(self):
        if self._ledger.parallel == 1 or self._fit() is None or self._model_used == self._model[0]:
            return None
        running = sum(1 for *_, step in self._running.values() if step == "model")
        if running >= max(1, self._ledger.parallel // MODEL_SHARE):
            return None
        self._model_used = self._model[0]
        key, center, _ = self._center
        rng = self._rng("model", key, self._level, self._restarts, len(self._results))
        for x in self._model[1].minimizers(center, self._level, rng):
            if self._key(x) not in self._ledger.seen:
                return x, self._level, "model"
        return None

    def _poll(self, level: int) -> list[np.ndarray]:
        key, center, _ = self._center
        rng = self._rng("poll", key, level, self._restarts)
        points = [self._box.snap(center + step) for step in poll_steps(self._box, level, rng)]
        unique = {self._key(x): x for x in points}
        unique.pop(key, None)
        return list(unique.values())

    def _advance(self) -> None:
        """Apply the outcome of finished iterations: all poll points evaluated, none better -> refine."""
        for _ in range(4 * (LEVEL_MAX - LEVEL_MIN + 2)):
            if self._center is None or any(self._key(x) not in self._results for x in self._poll(self._level)):
                return
            self._level += 1
            if self._level > LEVEL_MAX:   # finest frame reached: new directions from the start frame
                self._level, self._restarts = 0, self._restarts + 1
                self._move = None

    def _candidates(self, level: int, depth: int) -> list[tuple[np.ndarray, str]]:
        """The iteration's points in order: speculative step, model point, poll by predicted value.

        The search steps give one point per iteration (NOMAD's): once one is out, the step is done.
        """
        key, center, _ = self._center
        done = {step for (k, lvl, restarts, step) in self._searched
                if (k, lvl, restarts) == (key, level, self._restarts)}
        out = []
        if depth == 0 and self._move is not None and "speculative" not in done:
            out.append((self._box.snap(center + self._move), "speculative"))
        poll = self._poll(level)
        model = self._fit()
        if model is not None:
            if "model" not in done:
                rng = self._rng("model", key, level, self._restarts)
                for x in model.minimizers(center, level, rng):
                    if self._key(x) not in self._ledger.seen:
                        out.append((x, "model"))
                        break
            poll.sort(key=lambda x: float(model.predict(x)[0]))
        return out + [(x, "poll") for x in poll]

    def _fit(self) -> QuadModel | None:
        done = [(x, f) for x, f in self._results.values() if f is not None]
        state = (len(self._results), self._center[0])
        if self._model[0] != state:
            model = None
            if len(done) >= len(self._box.lo) + MODEL_MIN_EXTRA:
                xs, fs = np.array([x for x, _ in done]), np.array([f for _, f in done])
                model = QuadModel(self._box, xs, fs, self._center[1])
            self._model = (state, model)
        return self._model[1]

    def _explore(self) -> tuple[np.ndarray, None] | None:
        taken = np.array([x for x, _ in self._results.values()] + [x for _, x, *_ in self._running.values()])
        for _ in range(50):
            self._explored += 1
            x = farthest_point(self._box, taken, self._rng("explore", self._explored))
            if self._key(x) not in self._ledger.seen:
                return x, None, "explore"
        return None
