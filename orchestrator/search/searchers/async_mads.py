"""Asynchronous MADS: NOMAD's ``async`` profile, a free slot gets a point the moment it frees.

Why this design (NOMAD 4.6's own parallel modes, read in its source and tried with PyNomadBBO 4.6):
- ``BB_MAX_BLOCK_SIZE`` K: NOMAD hands out a block and decides nothing until the whole block is back;
  search steps give blocks of one point. ``NB_THREADS_PARALLEL_EVAL`` (the wheel has OpenMP) is an
  ``omp parallel for`` over the blocks of one step with a barrier at its end: the same wait for the
  slowest trial. ``MEGA_SEARCH_POLL`` fills blocks with search and poll points but keeps the barrier.
- COOP-MADS (runs in this wheel): several MADS in OpenMP threads, each synchronous; which thread
  proposes what depends on thread timing, so a seed no longer fixes the points, and independent
  polls split the slots instead of sharing one incumbent. PSD-MADS: "no parallelism" (its help).
- ``suggest``/``observe``: one cold mega-iteration per call, rebuilt from a cache file; ``observe``
  updates the mesh once per call, so results told one by one shrink the mesh after every failed
  point, and points still running are unknown to it.
So asynchrony needs the control outside NOMAD, and this module runs MADS itself, the way NOMAD 4
runs it with the paper's options plus an initial Latin hypercube (``LH_SEARCH``), made asynchronous
as in APPS (Hough, Kolda, Torczon: asynchronous parallel pattern search). An iteration is a poll
centre (the incumbent) and a frame level (mads_steps.py: mesh, ORTHO 2N poll, quadratic model);
its trial points are a speculative step (after a success, the same move again), one quadratic-model
search point, one global point, then the 2n poll points ordered by the model. They are handed out one
per free slot.
- Global model (mads_global.py, a Gaussian process over every result; ``category`` dimensions as categories,
  ordered ``choice`` numbers such as the rank as ordered coordinates): MADS is a
  local search, so a deeper basin elsewhere was found by luck. The global step proposes the point of
  largest expected improvement over ``XI`` (5%) below the best value: small gains are the poll's, the
  global step looks for another basin. It is the iteration's third search step and every
  ``GLOBAL_EVERY``-th proposal after the start; a global point that beats the incumbent becomes the
  centre with a coarse frame (level 0). With K > 1 the running points are believed at the model's mean,
  so parallel global points spread out.
- Opportunism: a result better than the incumbent becomes the centre at once (its frame one level
  coarser than the one it was polled at); the rest of the old poll is never handed out.
- An iteration fails when every poll point of (centre, level) is evaluated and none is better: the
  level goes up, the frame halves. Points evaluated earlier count (NOMAD's cache).
- Free slots while the current poll is all running (K > 1): more model points as results change
  the model (at most K/2 running, none within a frame of a running point), then the polls of the
  next ``LOOKAHEAD`` levels, assuming this one fails (APPS's speculative refinement), then a point
  far from every point tried. So ``ask()`` never leaves a slot idle while budget remains. At K = 1
  the sequence is NOMAD's: search steps, then the opportunistic poll.
- Episodes (a multi-start MADS; the basins told apart by a hill-valley test on the global model): an
  episode ends when its poll fails at level ``CONVERGED`` (frame range/128; finer polls would refine one
  basin of a noisy loss), when no result has beaten the incumbent by more than ``GAIN`` in ``STALL``
  results of the episode (noise keeps a mesh from converging), or when its poll reaches the basin of an
  earlier episode's incumbent (such an episode adds no basin: its centre is on a known basin's slope). The
  next episode's centre is the best result that the model's mean separates from every converged incumbent (a point of the segment between them is higher than both ends
  by more than the fitted noise: ``GlobalSearch.separated``): a basin seen but never polled; its frame
  starts at ``RESTART_LEVEL`` (range/32), so that its poll stays in that basin, and a result of another
  basin (by the same test) or within ``TABU`` of an earlier incumbent never becomes its centre. Without
  such a result, a Latin hypercube far from every point tried (constrained: predicted feasible first), and
  while no point of it leads anywhere new, global points and points far from all tried (the rest of the
  budget explores instead of polling a converged basin finer; a finer poll of a real loss mostly fits its
  noise). On two_basins (bench/search_quality.py)
  this is what finds the deeper basin; the old design (global points when stalled) found it in 0-6
  studies of 10.
- Noise: when the global model's fitted noise sd exceeds ``NOISY`` (1%) of the losses' sd, the
  centre is the episode's point of lowest model mean, not the lowest observed value: polls do not
  gather around a lucky draw (the incumbent's merit is then that mean).
- Start: the default point (the paper's X0), then a Latin hypercube of ``lh_points`` points
  (default ``max(2n, K) - 1``: the first K slots are filled with the start alone), then ``EARLY`` (10%)
  of the budget in global points: a broad search first, the poll then refines the best basin found, and
  later episodes the others.
  After a warm start there is no such phase (the earlier studies explored); after a resume, the
  replayed results count as proposals.
- Failures (value None) count as evaluated, never become the incumbent, stay out of the model.
- Determinism: directions, hypercubes and sampled model candidates come from generators seeded by
  (seed, centre, level, episode); given the seed and the same answers in the same order, the same
  points come out. No process-global state: any number of these may run in one process.
- Resume: ``replay`` tells the history in trial order (the order of the results is not journaled),
  then adopts the running trials as pending; no point is proposed twice (the Ledger's seen set),
  and the continuation may differ from the uninterrupted run where results came back out of order.
- Constraints (``constraints=("pb", "eb", ...)``), the treatment this MADS can honestly give, not
  NOMAD's progressive barrier: an extreme-barrier violation is never the incumbent and stays out of
  the objective's model (as a failure would); for pb, feasibility first: the incumbent is the result
  with the least violation h (sum of squared pb violations), then the lowest value, so before any
  feasible point it is the least infeasible one, and once one is feasible no infeasible result can
  displace it (NOMAD's barrier would keep polling around an infeasible incumbent too). pb-violating
  results still teach the objective's model. Each constraint gets its own quadratic model (every
  success of the episode, uncapped): the model search takes the best point predicted feasible, and
  the poll is ordered predicted-feasible first (mads_steps.Surrogate). Each constraint also gets a
  Gaussian process (every success, choices ordered: a bound on memory grows with the rank): once the
  incumbent is feasible, poll points it gives less than ``P_FEASIBLE`` (1/2) chance of feasibility are
  held back (counted as failed polls, never evaluated), and the global step's expected improvement is
  weighted by the probability of feasibility. Figures: bench/search_quality.py (constrained landscapes).
  Two objectives are refused (profile paper).
- Warm start (``warm_start``, before ``replay``): the earlier results are recorded like replayed ones
  (incumbent, model), count against no budget and are never proposed again; the start drops X0 and
  its Latin hypercube shrinks by the number of warm successes (the incumbent is already there).

Built by ``make_searcher("nomad", space, budget=100, parallel=4, seed=0, options={"profile": "async"})``;
tested by ``python -m pytest tests/test_async_mads.py tests/test_searchers.py -k async``.
"""
from __future__ import annotations

import zlib

import numpy as np

from orchestrator.search.searchers.base import Ledger, LedgerSearcher, Observation, Pending, Suggestion, violation
from orchestrator.search.searchers.mads_global import GlobalSearch, choice_mask
from orchestrator.search.searchers.mads_steps import (Box, QuadModel, Surrogate, farthest_point, frame, latin_hypercube,
                                                      poll_steps)
from orchestrator.search.space import SearchSpace

LEVEL_MIN, LEVEL_MAX = -2, 7   # frame = range/2 .. range/1024 (reals; integers stop at 1)
MODEL_SHARE = 2                # with K slots, up to K / MODEL_SHARE model points run at once
LOOKAHEAD = 2                  # finer levels polled ahead while the current poll is running
GAIN, STALL = 0.001, 16        # no gain > 0.1% in 16 results of an episode: stalled (a new episode)
TABU = 0.25                    # (unit box) around earlier episodes' incumbents: no centre there
MODEL_MIN = 2                  # the quadratic model needs n + MODEL_MIN results
EARLY = 0.1                    # the first 10% of the budget's proposals after the start are global
CONVERGED = 4                  # a failed poll at this level (frame range/128 reals) ends the episode
RESTART_POOL = 4               # constrained: a restart's hypercube keeps 2n of 4 x 2n points, predicted feasible first
RESTART_LEVEL = 2              # a new episode's first frame (range/32): a poll that stays in its basin
GLOBAL_EVERY = 4               # every 4th proposal after the start is the global model's


class AsyncMadsSearcher(LedgerSearcher):
    name = "nomad"
    profile = "async"   # which NOMAD profile (nomad.py's docstring): for logging by the study

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, lh_points: int | None,
                 kinds: tuple = ()):
        self._space, self._box, self._seed = space, Box.from_space(space), seed
        self._ledger = Ledger(space, budget, parallel, 1, kinds)
        n = len(space.dims)
        self._lh = lh = max(2 * n, parallel) - 1 if lh_points is None else lh_points
        start = latin_hypercube(self._box, lh, self._rng("lh")) if lh else []
        self._start = [np.array(space.nomad_x0(), float)] + start
        self._results: dict[str, tuple] = {}   # key -> (x, value, episode, constraint values)
        self._running: dict[int, tuple] = {}   # trial -> (key, x, level, step, episode)
        self._episode = 0                      # a restart begins a new one
        self._told_in_episode = self._last_gain = 0
        self._converged: list = []             # the incumbents of earlier episodes
        self._known_basin = False              # this episode's poll reached an earlier episode's basin
        self._feasible_seen = False            # a result satisfied every constraint
        self._center: tuple[str, np.ndarray, tuple] | None = None        # incumbent (key, x, (h, value))
        self._move: np.ndarray | None = None   # the step that made the incumbent, for the speculative step
        self._level = 0
        self._searched: set = set()            # (centre, level, episode, step): search steps done
        self._model: tuple[tuple, QuadModel | None] = ((), None)
        self._explored = 0
        self._model_used: tuple = ()
        self._global = GlobalSearch(self._box, kinds, choice_mask(space))
        self._asks = 0                         # proposals after the start: every GLOBAL_EVERY-th is global
        self._early = EARLY * budget           # ... and the first EARLY share of the budget

    # -- protocol ------------------------------------------------------------------------------
    def ask(self) -> Suggestion | None:
        if not self._ledger.can_issue():
            return None
        proposal = self._propose()
        if proposal is None:
            self._ledger.end()   # a small discrete space, every point tried
            return None
        x, level, step = proposal
        point = self._space.from_nomad(list(x))
        suggestion = self._ledger.issue(point, encoded=[float(v) for v in x])
        self._running[suggestion.trial_id] = (self._space.key(point), x, level, step, self._episode)
        return suggestion

    def tell(self, trial_id: int, value, constraints=None) -> None:
        _, value, constraints = self._ledger.settle(trial_id, value, constraints)
        key, x, level, _, episode = self._running.pop(trial_id)
        self._record(key, x, value, level, episode, constraints)

    def warm_start(self, observations: list[Observation]) -> None:
        """Earlier results seed the incumbent and the model; the start shrinks by the warm successes
        (no X0: the best warm point is the incumbent)."""
        results = self._ledger.warm(observations)
        for point, value, constraints in results:
            x = np.array(self._space.to_nomad(point), float)
            self._record(self._space.key(point), x, value, None, 0, constraints)
        successes = sum(value is not None for _, value, _ in results)
        if successes:
            self._early = 0   # the earlier studies explored: start from their best
            lh = max(0, self._lh - successes)
            taken = np.array([x for x, *_ in self._results.values()])
            self._start = latin_hypercube(self._box, lh, self._rng("lh"), avoid=taken) if lh else []

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        results, adopted = self._ledger.replay(history, pending, encode=self._space.to_nomad)
        for point, value, constraints in results:
            self._record(self._space.key(point), np.array(self._space.to_nomad(point), float), value, None, 0,
                         constraints)
        self._asks = len(results)   # a resumed study does not explore from scratch again
        for suggestion in adopted:
            x = np.array(suggestion.encoded, float)
            self._running[suggestion.trial_id] = (self._space.key(suggestion.point), x, None, "adopted", 0)
        return adopted

    # -- MADS ----------------------------------------------------------------------------------
    def _rng(self, *tags) -> np.random.Generator:
        words = [zlib.crc32(str(tag).encode()) for tag in tags]
        return np.random.default_rng([self._seed, *words])

    def _key(self, x: np.ndarray) -> str:
        return self._space.key(self._space.from_nomad(list(x)))

    def _record(self, key: str, x: np.ndarray, value: float | None, level: int | None, episode: int,
                constraints: tuple | None = None) -> None:
        if key in self._results and self._results[key][1] is not None and value is None:
            return   # a replayed failed attempt of a point that also succeeded
        self._results[key] = (x, value, episode, constraints)
        if episode == self._episode:
            self._told_in_episode += 1
        if value is None or episode != self._episode:
            return
        eb, h = violation(constraints, self._ledger.kinds)
        if eb:
            return   # extreme barrier: never the incumbent
        merit = (h, value)   # feasibility first: the least violation, then the value
        self._feasible_seen |= h == 0
        if self._center is not None and merit >= self._center[2]:
            return
        if h > 0 and self._feasible_seen:
            return   # a new episode starts from a feasible point once one is known
        if self._near_converged(x):
            if level is not None:   # the poll walked into an earlier episode's basin: a new episode
                self._known_basin = True
            return   # the basin of an earlier episode: not a centre for this one
        if self._center is not None and self._converged and \
                self._global.separated(self._listed(), x, [self._center[1]]):
            return   # a restarted episode stays in its basin
        old = self._center[2] if self._center is not None else None
        if old is None or h < old[0] or old[1] - value > GAIN * abs(old[1]):
            self._last_gain = self._told_in_episode
        if self._center is not None and level is not None:   # a MADS point: opportunistic success
            self._move = x - self._center[1]
            self._level = max(LEVEL_MIN, level - 1)
        else:
            self._move = None
            if self._center is not None:   # a global point: another basin, a coarse frame
                self._level = 0
        self._center = (key, x, merit)

    def _propose(self) -> tuple[np.ndarray, int | None, str] | None:
        for x in self._start:
            if self._key(x) not in self._ledger.seen:
                return x, None, "start"
        self._advance()
        self._asks += 1
        early = self._asks <= self._early
        if early or self._asks % GLOBAL_EVERY == 0:
            x = self._global_point()
            if x is not None:
                return x, None, "global"
        if self._center is not None:
            extra = self._extra_model_point()
            if extra is not None:
                return extra
            for depth in range(LOOKAHEAD + 1):
                level = self._level + depth
                for x, step in self._candidates(level, depth):
                    if self._key(x) not in self._ledger.seen:
                        if step != "poll":
                            self._searched.add((self._center[0], level, self._episode, step))
                        return x, level, step
        return self._explore()

    def _extra_model_point(self) -> tuple[np.ndarray, int, str] | None:
        """With K > 1: a model point whenever results changed the model, up to K / MODEL_SHARE running."""
        if self._ledger.parallel == 1 or self._fit() is None or self._model_used == self._model[0]:
            return None
        running = sum(1 for _, _, _, step, _ in self._running.values() if step == "model")
        if running >= max(1, self._ledger.parallel // MODEL_SHARE):
            return None
        self._model_used = self._model[0]
        key, center, _ = self._center
        rng = self._rng("model", key, self._level, self._episode, len(self._results))
        # not inside the frame of a running point or of the incumbent: a batch of model points
        # that differ by one mesh step would teach little more than one of them
        frame_size = frame(self._box, self._level)[0]
        busy = np.array([center] + [x for _, x, *_ in self._running.values()])
        for x in self._model[1].minimizers(center, self._level, rng):
            near = np.all(np.abs(busy - x) < frame_size, axis=1).any()
            if not near and self._key(x) not in self._ledger.seen:
                return x, self._level, "model"
        return None

    def _poll(self, level: int) -> list[np.ndarray]:
        key, center, _ = self._center
        rng = self._rng("poll", key, level, self._episode)
        points = [self._box.snap(center + step) for step in poll_steps(self._box, level, rng)]
        unique = {self._key(x): x for x in points}
        unique.pop(key, None)
        return list(unique.values())

    def _advance(self) -> None:
        """Apply the outcome of finished iterations: all poll points evaluated, none better -> refine."""
        if self._center is not None:
            self._recenter()
        if self._center is not None and (self._known_basin or self._told_in_episode - self._last_gain >= STALL):
            self._restart()
        for _ in range(LEVEL_MAX - LEVEL_MIN + 2):
            if self._center is None:
                return
            poll = self._poll(self._level)
            held = self._held_back([x for x in poll if self._key(x) not in self._results])
            if any(self._key(x) not in self._results and self._key(x) not in held for x in poll):
                return
            self._level += 1
            if self._level > CONVERGED:
                self._restart()
                return

    def _recenter(self) -> None:
        """Under noise, the centre is the episode's point of lowest model mean, not a lucky draw."""
        kinds = self._ledger.kinds
        points = [(key, x, violation(cs, kinds)) for key, (x, f, episode, cs) in self._results.items()
                  if f is not None and episode == self._episode]
        points = [(key, x, h) for key, x, (eb, h) in points if not eb and h <= self._center[2][0]]
        if self._converged and self._global.model.noisy:   # not another episode's basin, nor another basin
            center = [self._center[1]]
            points = [p for p in points if p[0] == self._center[0] or not self._near_converged(p[1]) and
                      not self._global.separated(self._listed(), p[1], center)]
        best = self._global.mean_center(self._listed(), [x for _, x, _ in points])
        if best is not None and points[best[0]][0] != self._center[0]:
            key, x, h = points[best[0]]
            self._center, self._move = (key, x, (h, best[1])), None

    def _in_tabu(self, x: np.ndarray) -> bool:
        return any(np.linalg.norm(self._box.scale(x) - self._box.scale(old)) < TABU for old in self._converged)

    def _near_converged(self, x: np.ndarray) -> bool:
        """Within TABU of an earlier episode's incumbent, or in its basin (not separated by the global model)."""
        return self._in_tabu(x) or not self._global.separated(self._listed(), x, self._converged)

    def _restart(self) -> None:
        """The episode has converged or stalled: a new one from a Latin hypercube far from all points."""
        self._episode += 1
        # an episode that walked into a known basin adds none: its centre lies on that basin's slope, and against
        # a slope point the hill-valley test puts every point downhill of it 'in a known basin'
        if not self._known_basin:
            self._converged.append(self._center[1])
        self._level, self._center, self._move = RESTART_LEVEL, None, None
        self._known_basin = False
        self._told_in_episode = self._last_gain = 0
        other = self._global.other_basin(self._listed(), self._converged, lambda x: not self._in_tabu(x))
        if other is not None:   # a result in another basin than every converged one: its centre
            key, x, value, cs = other
            self._results[key] = (x, value, self._episode, cs)
            self._center = (key, x, (violation(cs, self._ledger.kinds)[1], value))
            self._start = []
            return
        taken = np.array([x for x, *_ in self._results.values()] + [x for _, x, *_ in self._running.values()])
        n = 2 * len(self._box.lo)
        lh = latin_hypercube(self._box, n * (RESTART_POOL if self._ledger.kinds else 1),
                             self._rng("lh", self._episode), avoid=taken)
        self._start = self._feasible_first(lh)[:n]

    def _candidates(self, level: int, depth: int):
        """The iteration's points in order (a generator: later steps are computed only when reached):
        speculative step, quadratic-model point, global (GP) point, poll by predicted value.

        The search steps give one point per iteration (NOMAD's): once one is out, the step is done.
        """
        key, center, _ = self._center
        iteration = (key, level, self._episode)
        done = {step for (*it, step) in self._searched if tuple(it) == iteration}
        if depth == 0 and self._move is not None and "speculative" not in done:
            yield self._box.snap(center + self._move), "speculative"
        model = self._fit()
        if model is not None and depth == 0 and "model" not in done:
            rng = self._rng("model", key, level, self._episode)
            for x in model.minimizers(center, level, rng):
                if self._key(x) not in self._ledger.seen:
                    yield x, "model"
                    break
        if depth == 0 and "global" not in done:
            x = self._global_point()
            if x is not None:
                yield x, "global"
        poll = self._poll(level)
        held = self._held_back(poll)
        poll = [x for x in poll if self._key(x) not in held]
        if model is not None:
            if model.constraints:
                poll = list(model.order(np.array(poll))) if poll else poll
            else:
                poll.sort(key=lambda x: float(model.predict(x)[0]))
        for x in poll:
            yield x, "poll"

    def _listed(self) -> list:
        return [(key, x, f, cs) for key, (x, f, _, cs) in self._results.items()]

    def _global_point(self) -> np.ndarray | None:
        """The global model's point (mads_global.py): every results, the running points believed."""
        running = [x for _, x, *_ in self._running.values()]
        rng = self._rng("global", len(self._results), len(self._running), self._episode)
        return self._global.point(self._listed(), running, rng, lambda x: self._key(x) not in self._ledger.seen)

    def _held_back(self, xs: list, always: bool = False) -> set:
        """Keys of the poll points the constraint models predict infeasible, once the incumbent is feasible:
        the poll skips them and counts them as failed (``always``: whatever the incumbent; restarts, exploration)."""
        if not xs or not always and (self._center is None or self._center[2][0] > 0):
            return set()
        return {self._key(x) for x, held in zip(xs, self._global.held_back(self._listed(), xs)) if held}

    def _fit(self) -> Surrogate | None:
        # after a restart the model learns from the new episode only: the old basin's points
        # would pull its search steps back there. The objective's model leaves out extreme-barrier
        # points (no value, as in NOMAD); each constraint's model learns from every success.
        kinds = self._ledger.kinds
        done = [(x, f, cs) for x, f, episode, cs in self._results.values()
                if f is not None and episode == self._episode]
        state = (len(self._results), self._center[0], self._episode)
        if self._model[0] != state:
            model, enough = None, len(self._box.lo) + MODEL_MIN
            objective = [(x, f) for x, f, cs in done if not violation(cs, kinds)[0]]
            if len(objective) >= enough:
                xs, fs = np.array([x for x, _ in objective]), np.array([f for _, f in objective])
                constraints = []
                if kinds and len(done) >= enough:
                    xc = np.array([x for x, _, _ in done])
                    constraints = [QuadModel(self._box, xc, np.array([cs[j] for _, _, cs in done]),
                                             self._center[1], cap=False) for j in range(len(kinds))]
                model = Surrogate(QuadModel(self._box, xs, fs, self._center[1]), constraints)
            self._model = (state, model)
        return self._model[1]

    def _explore(self) -> tuple[np.ndarray, None, str] | None:
        """A point far from every point tried or running (nothing else to propose)."""
        taken = np.array([x for x, *_ in self._results.values()] + [x for _, x, *_ in self._running.values()])
        feasible = None
        if self._ledger.kinds:   # constrained: far from all, among the points predicted feasible
            feasible = lambda xs: np.logical_not(self._global.held_back(self._listed(), list(xs)))  # noqa: E731
        for _ in range(50):
            self._explored += 1
            x = farthest_point(self._box, taken, self._rng("explore", self._explored), allowed=feasible)
            if self._key(x) not in self._ledger.seen:
                return x, None, "explore"
        return None

    def _feasible_first(self, xs: list) -> list:
        """``xs`` with the points the constraint models predict infeasible moved last (order kept otherwise)."""
        held = self._held_back(xs, always=True)
        return [x for x in xs if self._key(x) not in held] + [x for x in xs if self._key(x) in held]
