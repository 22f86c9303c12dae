"""NOMAD 4 (MADS, PyNomadBBO) behind the ask/tell protocol: the only module that imports PyNomad.

Profiles: which NOMAD to use when
---------------------------------
Chosen by ``searcher_options: {profile: paper|async}`` in the study YAML; the default is ``paper``
with ``--parallel 1`` or two objectives, ``async`` with ``--parallel`` > 1. An unknown profile is refused.

- ``paper``: NOMAD 4's MADS exactly as the paper ran it: its options (below), X0 = the default
  point, in the paper's variable order (r index, dropout index, alpha, log10 lr) = (2 5 32 -5),
  the same points for the same seed. Use it to reproduce or compare with the paper, one
  evaluation at a time (``--parallel 1``). Upper-case options pass to NOMAD. With ``--parallel K``
  it evaluates NOMAD's blocks (``BB_MAX_BLOCK_SIZE K``): slots wait for a block's slowest trial and
  search steps run alone, so more slots barely help (bench/parallel_efficiency.py, paper
  landscape, 10 seeds: slots busy 38% / 19% / 10% at K = 4 / 8 / 16; within 1% of the optimum
  after 14.0 mean trial lengths at K=1 and 15.5 at K = 4, 8 and 16).
- ``async`` (recommended; the default with ``--parallel`` > 1): asynchronous MADS
  (``orchestrator/search/searchers/async_mads.py``): X0, a short Latin-hypercube start (option
  ``lh_points``), then polls around the incumbent with quadratic-model and speculative search
  steps; a freed slot gets a point at once (slots busy 100% until the budget is handed out). Same
  bench: within 1% after a median 9 evaluations at K=1 (paper profile: 14, Optuna's GP: 14), and
  in 9.6 / 3.1 / 2.6 / 1.9 mean trial lengths at K = 1 / 4 / 8 / 16 (Optuna's GP: 14.0 / 4.6 / 2.8
  / 2.3; TPE with constant liar slower). Also the better choice at ``--parallel 1`` when the
  paper's exact path does not matter. It is NOMAD's algorithm run by this project, not NOMAD's
  code: NOMAD 4.6 has no asynchronous mode (async_mads.py says what was tried). Like NOMAD it is
  a local search: on a landscape with a deeper, narrower second basin (``two_basins``) it finds
  that basin in 1 to 5 studies of 10 (paper profile: 2 to 3), Optuna's GP in 7 to 9.

Profile paper: why ``PyNomad.optimize`` in a background thread, not ``suggest``/``observe``
------------------------------------------------------------------------------------------
``suggest``/``observe`` restart NOMAD from a cache file for every call: each suggestion is one fresh
mega-iteration rebuilt from the file, so the run is not the MADS of the paper (no opportunistic
poll/search sequence, models rebuilt from scratch, mesh state carried by hand). ``optimize`` is
the real, uninterrupted MADS run. It wants to call the blackbox itself, so it runs in a daemon
thread whose callback hands the points to ``ask()`` and blocks (on a ``threading.Condition``,
GIL released) until ``tell()`` has answered every one of them. PyNomad's C++ side releases the GIL
while NOMAD computes, so the study loop keeps running meanwhile.

- parallel = 1: NOMAD's single-point callback; ``ask()`` returns one point, then None until told.
- parallel = K > 1: ``BB_MAX_BLOCK_SIZE K``; NOMAD calls the block callback with up to K points.
  ``ask()`` hands them out one by one, then returns None until all of the block's values are told.
  Opportunism (``EVAL_OPPORTUNISTIC``) then acts between blocks only: a block is always evaluated
  whole, even when its first point is already a success, and NOMAD decides what to do next only
  when the slowest trial of the block is back. Search steps often yield blocks of 1 point
  (quad-model, speculative), so slots may idle; ``MEGA_SEARCH_POLL yes`` in options fills blocks
  with search and poll points together. With K > 1 NOMAD may exceed ``MAX_BB_EVAL`` by up to K-1
  points (its documented behaviour): the searcher never hands out more than ``budget`` points.
- Failures: the callback returns 0 for the point ("failed", and PyNomad always counts the
  evaluation), so NOMAD records it as a failed evaluation, never re-proposes it, and goes on.
  Exception: NOMAD stops for good when its starting point fails (run flag -3), so a failed X0
  is re-proposed to the loop up to ``X0_RETRIES`` times (each a new trial, counted against the budget)
  before NOMAD hears of the failure.
- Cache: NOMAD does not re-evaluate a point in its own cache. The searcher also keeps every answer
  by ``space.key(point)``: a point NOMAD proposes again after decoding (e.g. a real coordinate that
  rounds to a seen point) or twice in one block is answered from that memo, not re-evaluated.
- Replay (resume): the history's results go into the same memo; NOMAD restarts from X0 with the
  same seed and options and, being deterministic given the seed and the same answers, proposes
  the same points again: those are answered from the memo without reaching the loop, so NOMAD ends
  up exactly where the crashed run was, and the trials that were pending at the crash are proposed
  again (answered by their adopted trials, below, when ``replay`` is given them). (NOMAD's
  ``CACHE_FILE`` was the alternative; its format is NOMAD-internal and version-bound, while
  answering from the callback keeps the replay in Python, where it is tested.)
  History points NOMAD does not re-propose (other seed or options) still count against the
  budget, but NOMAD never learns their values. Replayed failures of X0 count as spent retries.
- Adopted trials (``replay(history, pending)``: jobs still running at the crash, re-attached by the
  loop): they are pending in the Ledger from the start (budget, parallel slots). When the callback
  proposes a point whose key is an adopted trial's, that point is not handed out by ``ask()``: the
  callback waits for that trial's ``tell`` like for any pending point of its block. With the same
  seed, options and answers this happens for every adopted trial, in the crash's block, so the run
  goes on exactly as the uninterrupted one. If NOMAD proposes them later, or never (seed or options
  changed), their ``tell`` still settles them at any time, never blocks, and their value goes to the
  memo only: NOMAD learns it if and when it proposes that point, never otherwise. ``ask()`` waits
  for NOMAD's next block whenever the callback is not waiting, even while adopted trials are
  pending, and hands out at most ``parallel`` - (pending trials) points.
- Shutdown: ``close()`` makes every pending and later callback answer "failed" at once, so NOMAD
  runs out of evaluation budget within milliseconds; the thread is joined with a timeout. An atexit
  hook closes searchers the caller forgot, so the interpreter never exits under a live NOMAD call.
- One at a time: NOMAD keeps process-global state (cache, RNG, evaluator control), so only one
  NomadSearcher may run per process; a second one raises until the first is closed or finished.
- Determinism: given the seed, the options and the same answers, NOMAD proposes the same points.
  (PyNomad only re-seeds when SEED differs from the process's last seed, so the RNG is first set
  to another seed; without that a second run with the same seed in one process would differ.)

Constraints and two objectives (profile paper)
---------------------------------------------
NOMAD hears them as NOMAD constraints: ``BB_OUTPUT_TYPE OBJ [OBJ] PB|EB ...`` (one per constraint, in
the told order), the callback hands it ``"f [f2] c1 c2 ..."`` (c <= 0 satisfied); a failed trial is
still a failed evaluation (the callback returns 0: every output failed). Its progressive barrier
tolerates pb violations on the way: it keeps a best infeasible point beside the best feasible one and
polls around both, so it spends more evaluations across a pb bound than our ``async`` profile (which
has no infeasible incumbent once a feasible point exists): bench/multi_criteria.py, 10 seeds, a
boundary optimum with a near-optimal pb region: 35 infeasible evaluations of 100 (random 35, async 30,
Optuna's constrained TPE 16); with both bounds declared eb, 30. Declare ``eb`` when a violation is
worthless. Its best feasible loss after 50 evaluations is better than Optuna's (median 0.961 vs 0.973).

Two objectives: NOMAD's DMultiMADS (``DMULTIMADS_OPTIMIZATION yes``), which refuses the paper's
``ORTHO N+1 QUAD`` directions: ``ORTHO N+1 NEG`` instead, with ``DMULTIMADS_MIDDLEPOINT_SEARCH yes``
(it fills the gaps of the front; median hypervolume after 50 evaluations 0.88 of the true front's
without it 0.73, Optuna's MOTPE 0.89; seeds 0-9 of bench/multi_criteria.py, confirmed on seeds 10-19:
0.90 vs 0.72, MOTPE 0.90). The ``paper`` profile is then the default at any ``parallel``; ``async``
refuses two objectives. The memo keeps whole output vectors, so a resume replays exactly, with
constraints and with two objectives (tested).

Warm start (``warm_start``, before ``replay`` and the first ``ask``): the warm successes become NOMAD's
starting points, X0 = a file of points (NOMAD evaluates them all first and starts from the best one;
sorted best first: feasible, then least violation, then the first objective), and every warm result
goes into the memo, so NOMAD's first callbacks are answered without reaching the loop. PyNomad counts
every answer of the callback as a blackbox evaluation (its Python evaluator sets ``countEval`` always),
so ``MAX_BB_EVAL`` = budget + the number of warm points: the loop still gets exactly ``budget`` new
trials (tested). Warm failures stay in the memo only; the X0 retries do not apply. A resume calls
``warm_start`` again with the same observations, then ``replay``: NOMAD takes the same path.

Defaults are the paper's (NOMAD 4's own, written out): ``DIRECTION_TYPE ORTHO N+1 QUAD``, quad-model,
Nelder-Mead and speculative searches, opportunistic evaluation; ``MAX_BB_EVAL`` = budget,
X0 = the default point, ``DISPLAY_DEGREE 0``, ``SEED`` = seed. ``options`` maps NOMAD parameter names
to values (bool -> yes/no, list -> space separated), passed through; the names set from the space,
budget, parallel and seed are refused. ``PyNomad.help("NAME")`` documents a parameter. Because a
bad parameter makes NOMAD crash the whole process (segfault), options are first tried in a short
NOMAD run in a subprocess; NOMAD's complaint becomes a ValueError.

Built by ``make_searcher("nomad", space, budget=100, parallel=1, seed=0, options={})``;
tested by ``python -m pytest tests/test_searchers.py -k nomad``.
"""
from __future__ import annotations

import atexit
import collections
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref

import PyNomad

from orchestrator.search.searchers.base import Ledger, Observation, Pending, Suggestion, rank
from orchestrator.search.searchers.nomad_params import nomad_parameters
from orchestrator.search.space import SearchSpace

log = logging.getLogger(__name__)

X0_RETRIES = 2
ASK_TIMEOUT_S = 120.0    # NOMAD computes a block in milliseconds; longer means it is stuck
CLOSE_TIMEOUT_S = 30.0
PROFILES = ("paper", "async")
ASYNC_OPTIONS = ("lh_points",)

_NOMAD_LOCK = threading.Lock()  # NOMAD's global state allows one optimize() per process
_LIVE: "weakref.WeakSet[NomadSearcher]" = weakref.WeakSet()


def make_nomad(space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict,
               n_objectives: int = 1, kinds: tuple = ()):
    """The NOMAD searcher of the profile named by ``options["profile"]`` (default: paper at parallel 1
    or with two objectives, else async)."""
    options = dict(options)
    profile = options.pop("profile", "paper" if parallel == 1 or n_objectives > 1 else "async")
    if profile not in PROFILES:
        raise ValueError(f"nomad option profile={profile!r} is unknown; valid: {list(PROFILES)}")
    if profile == "paper":
        return NomadSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options,
                             n_objectives=n_objectives, kinds=kinds)
    if n_objectives > 1:
        raise ValueError("nomad profile 'async' searches one objective; for two objectives use profile: paper "
                         "(NOMAD's DMultiMADS), or drop the profile option (paper is then the default)")
    from orchestrator.search.searchers.async_mads import AsyncMadsSearcher
    unknown = sorted(set(options) - set(ASYNC_OPTIONS))
    if unknown:
        raise ValueError(f"nomad options {unknown} do not apply to profile 'async' (its own asynchronous "
                         f"MADS; NOMAD parameters need profile: paper); valid: {['profile', *ASYNC_OPTIONS]}")
    lh_points = options.get("lh_points")
    if lh_points is not None and (isinstance(lh_points, bool) or not isinstance(lh_points, int)
                                  or not 0 <= lh_points < budget):
        raise ValueError(f"nomad option lh_points={lh_points!r} must be an integer in [0, budget={budget}); "
                         "it is the size of the Latin-hypercube start")
    return AsyncMadsSearcher(space, budget=budget, parallel=parallel, seed=seed, lh_points=lh_points, kinds=kinds)


class NomadSearcher:
    name = "nomad"
    profile = "paper"   # which NOMAD profile (nomad.py's docstring): for logging by the study

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict,
                 n_objectives: int = 1, kinds: tuple = ()):
        self._space = space
        self._ledger = Ledger(space, budget, parallel, n_objectives, kinds)
        self._parallel = parallel
        self._seed = seed
        self._params = nomad_parameters(space, budget=budget, parallel=parallel, seed=seed,
                                        options=options, n_objectives=n_objectives, kinds=kinds)
        self._x0s: list[list[float]] = []     # warm start: NOMAD's starting points, best first
        self._warm: set[str] = set()          # keys of the warm points (answered beyond the budget)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._offers: collections.deque = collections.deque()  # (key, point, coords) not handed out
        self._keys: dict[int, str] = {}       # trial_id -> key, for handed-out points
        self._waiting: set[str] = set()       # keys the callback waits for
        self._adopted: dict[int, str] = {}    # trial_id -> key, for pending trials adopted by replay
        self._memo: dict[str, tuple | None] = {}  # key -> outputs (objectives, constraints): told, replayed, warm
        self._callbacks = 0
        self._x0_retries = 0
        self._stop = self._done = self._closed = False
        self._error: BaseException | None = None
        self.result: dict | None = None       # PyNomad.optimize's answer, once NOMAD has stopped

    # -- protocol ------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        with self._cv:
            return self._closed or self._ledger.exhausted or \
                (self._done and not self._offers and not self._ledger.pending)

    def ask(self) -> Suggestion | None:
        with self._cv:
            if self._closed:
                return None
            if self._thread is None:
                self._start()
            deadline = time.monotonic() + ASK_TIMEOUT_S
            while True:
                self._raise_if_failed()
                if not self._ledger.can_issue():
                    return None   # budget spoken for, or every slot pending
                if self._offers:
                    key, point, coords = self._offers.popleft()
                    suggestion = self._ledger.issue(point, encoded=coords)
                    self._keys[suggestion.trial_id] = key
                    return suggestion
                if self._waiting or self._done:
                    return None   # NOMAD waits for the block's results, or has stopped
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"NOMAD proposed nothing within {ASK_TIMEOUT_S:.0f} s")
                self._cv.wait(remaining)

    def tell(self, trial_id: int, value, constraints=None) -> None:
        with self._cv:
            _, value, constraints = self._ledger.settle(trial_id, value, constraints)
            key = self._keys.pop(trial_id)
            self._adopted.pop(trial_id, None)
            self._memo[key] = _outputs(value, constraints)
            self._waiting.discard(key)
            self._cv.notify_all()

    def warm_start(self, observations: list[Observation]) -> None:
        """Earlier results: NOMAD's starting points (X0, best first), answered from the memo, beyond
        MAX_BB_EVAL = budget (see the module docstring)."""
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("warm_start() must be called once, before replay() and the first ask()")
            results = self._ledger.warm(observations)
            kinds = self._ledger.kinds
            for point, value, constraints in sorted(results, key=lambda r: rank(r[1], r[2], kinds)):
                key = self._space.key(point)
                if key in self._memo and (self._memo[key] is not None or value is None):
                    continue   # a point warm twice: its best record answers
                self._warm.add(key)
                if value is not None and key not in self._memo:
                    self._x0s.append([float(v) for v in self._space.to_nomad(point)])
                self._memo[key] = _outputs(value, constraints)

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("replay() must be called before the first ask()")
            results, adopted = self._ledger.replay(history, pending, encode=self._space.to_nomad)
            for point, value, constraints in results:
                key = self._space.key(point)
                if self._memo.get(key) is None:   # a success wins over a failed attempt
                    self._memo[key] = _outputs(value, constraints)
            for suggestion in adopted:
                key = self._space.key(suggestion.point)
                self._keys[suggestion.trial_id] = key
                self._adopted[suggestion.trial_id] = key
            # X0's failed attempts are retries already spent (the last one only once NOMAD hears of it)
            x0 = self._space.key(self._space.default_point())
            failures = sum(1 for point, value, _ in results if value is None and self._space.key(point) == x0)
            if self._memo.get(x0, 0.0) is None:
                spent = failures if x0 in self._adopted.values() else failures - 1
                self._x0_retries = min(X0_RETRIES, max(0, spent))
            return adopted

    def close(self) -> None:
        with self._cv:
            self._stop = self._closed = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_TIMEOUT_S)
            if thread.is_alive():
                log.warning("NOMAD did not stop within %.0f s after close()", CLOSE_TIMEOUT_S)

    # -- NOMAD thread --------------------------------------------------------------------------
    def _start(self) -> None:
        if not _NOMAD_LOCK.acquire(blocking=False):
            raise RuntimeError("another NomadSearcher is running in this process (NOMAD's state is "
                               "global); close() it first")
        self._thread = threading.Thread(target=self._run, name="nomad", daemon=True)
        _LIVE.add(self)
        self._thread.start()

    def _run(self) -> None:
        folder = None
        try:
            PyNomad.setSeed(1 if self._seed == 0 else 0)  # so that SEED below really re-seeds
            lower, upper = self._space.nomad_bounds()
            callback = self._eval_block if self._parallel > 1 else self._eval_point
            x0, params = self._space.nomad_x0(), self._params
            if self._x0s:   # warm start: X0 is a file of points; their memo answers are beyond the budget
                folder = tempfile.mkdtemp(prefix="nomad-x0-")
                path = os.path.join(folder, "x0.txt")
                with open(path, "w") as f:
                    f.writelines(" ".join(repr(v) for v in x) + "\n" for x in self._x0s)
                budget = self._ledger.budget + len(self._warm)
                params = [f"MAX_BB_EVAL {budget}" if line.startswith("MAX_BB_EVAL") else line for line in params]
                x0, params = [], params + [f"DIMENSION {len(lower)}", f"X0 {path}"]
            self.result = PyNomad.optimize(callback, x0, lower, upper, params)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller through ask()
            self._error = exc
        finally:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            with self._cv:
                self._done = True
                self._cv.notify_all()
            _NOMAD_LOCK.release()

    def _eval_point(self, x) -> int:
        try:
            outputs = self._evaluate([[x.get_coord(i) for i in range(x.size())]])[0]
            if outputs is None:
                return 0   # every output failed, constraints included
            x.setBBO(_bbo(outputs))
            return 1
        except BaseException as exc:  # noqa: BLE001 - an exception must not cross into NOMAD
            self._fail(exc)
            return 0

    def _eval_block(self, block) -> list[int]:
        n = block.size()
        try:
            xs = [block.get_x(k) for k in range(n)]
            values = self._evaluate([[x.get_coord(i) for i in range(x.size())] for x in xs])
            for x, outputs in zip(xs, values):
                if outputs is not None:
                    x.setBBO(_bbo(outputs))
            return [0 if outputs is None else 1 for outputs in values]
        except BaseException as exc:  # noqa: BLE001 - NOMAD needs a list of n flags, always
            self._fail(exc)
            return [0] * n

    def _evaluate(self, coords: list[list[float]]) -> list[tuple | None]:
        """Hand the points NOMAD wants to ask(), wait for tell() to answer them all."""
        points = [self._space.from_nomad(c) for c in coords]
        keys = [self._space.key(p) for p in points]
        with self._cv:
            self._callbacks += 1
            while True:
                wanted, adopted = {}, set(self._adopted.values())
                for key, point, c in zip(keys, points, coords):
                    if key not in self._memo and key not in wanted and key not in adopted:
                        wanted[key] = (key, point, [float(v) for v in c])
                self._offers.extend(wanted.values())   # adopted keys: running already, wait for tell
                self._waiting = set(wanted) | (adopted & set(keys))
                self._cv.notify_all()
                while self._waiting and not self._stop:
                    self._cv.wait(1.0)
                if self._stop:
                    self._offers.clear()
                    return [None] * len(keys)
                values = [self._memo[key] for key in keys]
                if self._callbacks == 1 and values == [None] and self._x0_retries < X0_RETRIES and not self._x0s:
                    self._x0_retries += 1   # NOMAD would stop on a failed X0: try it again
                    del self._memo[keys[0]]
                    continue
                return values

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            self._error = self._error or exc
            self._stop = True
            self._cv.notify_all()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"NOMAD failed: {self._error!r}") from self._error
        if self._done and self._callbacks == 0 and not self._ledger.exhausted:
            reason = (self.result or {}).get("stop_reason", "unknown")
            raise RuntimeError(f"NOMAD stopped before proposing a point ({reason}); "
                               f"check the nomad options: {self._params}")


def _outputs(value, constraints) -> tuple | None:
    """NOMAD's outputs of a cleaned result: the objective(s), then the constraint values; None = failed."""
    if value is None:
        return None
    return (*(value if isinstance(value, tuple) else (value,)), *(constraints or ()))


def _bbo(outputs: tuple) -> bytes:
    return " ".join(repr(v) for v in outputs).encode("ascii")


@atexit.register
def _close_live_searchers() -> None:
    for searcher in list(_LIVE):
        searcher.close()
