"""NOMAD 4 (MADS, PyNomadBBO) behind the ask/tell protocol: the only module that imports PyNomad.

Profiles: which NOMAD to use when
---------------------------------
Chosen by ``searcher_options: {profile: paper|async}`` in the study YAML; the default is ``paper``
with ``--parallel 1`` and ``async`` with ``--parallel`` > 1. An unknown profile is refused.

- ``paper``: NOMAD 4's MADS exactly as the paper ran it: its options (below), X0 = the default
  point, in the paper's variable order (r index, dropout index, alpha, log10 lr) = (2 5 32 -5),
  the same points for the same seed. Use it to reproduce or compare with the paper, one
  evaluation at a time (``--parallel 1``). Upper-case options pass to NOMAD. With ``--parallel K``
  it evaluates NOMAD's blocks (``BB_MAX_BLOCK_SIZE K``): slots wait for a block's slowest trial and
  search steps run alone, so more slots barely help (bench/parallel_efficiency.py, paper
  landscape, 10 seeds: slots busy 38% / 19% / 10% at K = 4 / 8 / 16; within 1% of the optimum
  after 14.0 mean trial lengths at K=1 and 15.5 at K = 4, 8 and 16).
- ``async`` (recommended; the default with ``--parallel`` > 1): asynchronous MADS
  (``orchestrator/searchers/async_mads.py``): X0, a short Latin-hypercube start (option
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
import functools
import json
import logging
import re
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import PyNomad

from orchestrator.searchers import Ledger, Observation, Pending, Suggestion
from orchestrator.space import SearchSpace

log = logging.getLogger(__name__)

X0_RETRIES = 2
ASK_TIMEOUT_S = 120.0    # NOMAD computes a block in milliseconds; longer means it is stuck
CLOSE_TIMEOUT_S = 30.0
PAPER_DEFAULTS = {
    "DIRECTION_TYPE": "ORTHO N+1 QUAD",
    "QUAD_MODEL_SEARCH": True,
    "NM_SEARCH": True,
    "SPECULATIVE_SEARCH": True,
    "EVAL_OPPORTUNISTIC": True,
    "DISPLAY_DEGREE": 0,
}
PROFILES = ("paper", "async")
ASYNC_OPTIONS = ("lh_points",)
RESERVED = ("DIMENSION", "BB_INPUT_TYPE", "BB_OUTPUT_TYPE", "LOWER_BOUND", "UPPER_BOUND", "X0",
            "MAX_BB_EVAL", "BB_MAX_BLOCK_SIZE", "SEED")

_NOMAD_LOCK = threading.Lock()  # NOMAD's global state allows one optimize() per process
_LIVE: "weakref.WeakSet[NomadSearcher]" = weakref.WeakSet()


def _format(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    if not text.isascii() or "\n" in text or not text.strip():
        raise ValueError(f"nomad option {name}={value!r}: NOMAD wants one non-empty ASCII line")
    return f"{name} {text}"


def nomad_parameters(space: SearchSpace, *, budget: int, parallel: int, seed: int,
                     options: dict) -> list[str]:
    """NOMAD parameter lines: those derived from the arguments, then defaults overridden by options."""
    for name in options:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise ValueError(f"nomad option {name!r} is not a NOMAD parameter name (upper case, "
                             "e.g. DIRECTION_TYPE; see PyNomad.help()) nor 'profile'")
        if name == "DISPLAY_DEGREE" and options[name] not in (0, 1, 2, 3):
            raise ValueError(f"nomad option DISPLAY_DEGREE={options[name]!r}; use 0, 1, 2 or 3")
        if name in RESERVED:
            raise ValueError(f"nomad option {name} is set by the searcher from the space, budget, "
                             f"parallel and seed; remove it (reserved: {list(RESERVED)})")
    lines = [f"BB_INPUT_TYPE ({' '.join(space.nomad_input_types())})", "BB_OUTPUT_TYPE OBJ",
             f"MAX_BB_EVAL {budget}", f"SEED {seed}"]
    if parallel > 1:
        lines.append(f"BB_MAX_BLOCK_SIZE {parallel}")
    lines += [_format(k, v) for k, v in {**PAPER_DEFAULTS, **options}.items()]
    if options:  # ours are known good; a bad user parameter makes NOMAD crash the process
        lower, upper = space.nomad_bounds()
        _check_in_subprocess(json.dumps([space.nomad_x0(), lower, upper, lines]))
    return lines


# Runs NOMAD for 2 evaluations on the real parameters, silently: any complaint means a bad option.
_CHECK_SCRIPT = """
import json, sys, PyNomad
x0, lower, upper, lines = json.loads(sys.stdin.read())
lines = [l for l in lines if not l.startswith(("MAX_BB_EVAL", "DISPLAY_DEGREE"))]
lines += ["MAX_BB_EVAL 2", "DISPLAY_DEGREE 0"]
calls = []
def one(x):
    calls.append(1); x.setBBO(b"1.0"); return 1
def block(b):
    for k in range(b.size()):
        calls.append(1); b.get_x(k).setBBO(b"1.0")
    return [1] * b.size()
blocks = any(l.startswith("BB_MAX_BLOCK_SIZE") for l in lines)
PyNomad.optimize(block if blocks else one, x0, lower, upper, lines)
sys.stdout.flush()
print("OK" if calls else "NO EVALUATION")
"""


@functools.lru_cache(maxsize=32)
def _check_in_subprocess(problem_json: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT], input=problem_json, text=True,
                          capture_output=True, timeout=120)
    output = proc.stdout + proc.stderr
    complaints = ("Unknown parameter", "Error", "Exception", "Warning")
    if proc.returncode != 0 or proc.stdout.strip().splitlines()[-1:] != ["OK"] or \
            any(word in output for word in complaints):
        lines = [re.sub(r"\(/[^)]*\)\s*", "", line).strip() for line in output.splitlines()]
        lines = [line for line in lines if line and "report to develop" not in line and line != "OK"]
        lines.sort(key=lambda line: not line.startswith(("Warning", "Unknown", "line")))
        said = " | ".join(lines)
        raise ValueError(f"NOMAD rejects the nomad options (exit code {proc.returncode}): {said[:500]}; "
                         "fix them (PyNomad.help('NAME') documents a parameter)")


def make_nomad(space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict):
    """The NOMAD searcher of the profile named by ``options["profile"]`` (default: see PROFILES)."""
    options = dict(options)
    profile = options.pop("profile", "paper" if parallel == 1 else "async")
    if profile not in PROFILES:
        raise ValueError(f"nomad option profile={profile!r} is unknown; valid: {list(PROFILES)}")
    if profile == "paper":
        return NomadSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options)
    from orchestrator.searchers.async_mads import AsyncMadsSearcher
    unknown = sorted(set(options) - set(ASYNC_OPTIONS))
    if unknown:
        raise ValueError(f"nomad options {unknown} do not apply to profile 'async' (its own asynchronous "
                         f"MADS; NOMAD parameters need profile: paper); valid: {['profile', *ASYNC_OPTIONS]}")
    lh_points = options.get("lh_points")
    if lh_points is not None and (isinstance(lh_points, bool) or not isinstance(lh_points, int)
                                  or not 0 <= lh_points < budget):
        raise ValueError(f"nomad option lh_points={lh_points!r} must be an integer in [0, budget={budget}); "
                         "it is the size of the Latin-hypercube start")
    return AsyncMadsSearcher(space, budget=budget, parallel=parallel, seed=seed, lh_points=lh_points)


class NomadSearcher:
    name = "nomad"
    profile = "paper"   # which NOMAD profile (nomad.py's docstring): for logging by the study

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict):
        self._space = space
        self._ledger = Ledger(space, budget, parallel)
        self._parallel = parallel
        self._seed = seed
        self._params = nomad_parameters(space, budget=budget, parallel=parallel, seed=seed,
                                        options=options)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._offers: collections.deque = collections.deque()  # (key, point, coords) not handed out
        self._keys: dict[int, str] = {}       # trial_id -> key, for handed-out points
        self._waiting: set[str] = set()       # keys the callback waits for
        self._adopted: dict[int, str] = {}    # trial_id -> key, for pending trials adopted by replay
        self._memo: dict[str, float | None] = {}  # key -> value: told, replayed
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

    def tell(self, trial_id: int, value: float | None) -> None:
        with self._cv:
            _, value = self._ledger.settle(trial_id, value)
            key = self._keys.pop(trial_id)
            self._adopted.pop(trial_id, None)
            self._memo[key] = value
            self._waiting.discard(key)
            self._cv.notify_all()

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        with self._cv:
            if self._thread is not None:
                raise RuntimeError("replay() must be called before the first ask()")
            results, adopted = self._ledger.replay(history, pending, encode=self._space.to_nomad)
            for point, value in results:
                key = self._space.key(point)
                if self._memo.get(key) is None:   # a success wins over a failed attempt
                    self._memo[key] = value
            for suggestion in adopted:
                key = self._space.key(suggestion.point)
                self._keys[suggestion.trial_id] = key
                self._adopted[suggestion.trial_id] = key
            # X0's failed attempts are retries already spent (the last one only once NOMAD hears of it)
            x0 = self._space.key(self._space.default_point())
            failures = sum(1 for point, value in results if value is None and self._space.key(point) == x0)
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
        try:
            PyNomad.setSeed(1 if self._seed == 0 else 0)  # so that SEED below really re-seeds
            lower, upper = self._space.nomad_bounds()
            callback = self._eval_block if self._parallel > 1 else self._eval_point
            self.result = PyNomad.optimize(callback, self._space.nomad_x0(), lower, upper, self._params)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller through ask()
            self._error = exc
        finally:
            with self._cv:
                self._done = True
                self._cv.notify_all()
            _NOMAD_LOCK.release()

    def _eval_point(self, x) -> int:
        try:
            value = self._evaluate([[x.get_coord(i) for i in range(x.size())]])[0]
            if value is None:
                return 0
            x.setBBO(repr(value).encode("ascii"))
            return 1
        except BaseException as exc:  # noqa: BLE001 - an exception must not cross into NOMAD
            self._fail(exc)
            return 0

    def _eval_block(self, block) -> list[int]:
        n = block.size()
        try:
            xs = [block.get_x(k) for k in range(n)]
            values = self._evaluate([[x.get_coord(i) for i in range(x.size())] for x in xs])
            for x, value in zip(xs, values):
                if value is not None:
                    x.setBBO(repr(value).encode("ascii"))
            return [0 if value is None else 1 for value in values]
        except BaseException as exc:  # noqa: BLE001 - NOMAD needs a list of n flags, always
            self._fail(exc)
            return [0] * n

    def _evaluate(self, coords: list[list[float]]) -> list[float | None]:
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
                if self._callbacks == 1 and values == [None] and self._x0_retries < X0_RETRIES:
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


@atexit.register
def _close_live_searchers() -> None:
    for searcher in list(_LIVE):
        searcher.close()
