"""Searchers behind one ask/tell protocol: ``nomad`` (MADS), ``tpe`` (NNI; Optuna's for two objectives or with
option ``sampler: optuna``),
``random``, ``default``.

The study loop owns the loop; a searcher only proposes and listens::

    searcher = make_searcher("nomad", paper_space(), budget=100, parallel=4, seed=0, options={},
                             n_objectives=1, constraints=("pb", "eb"))
    searcher.warm_start(earlier)                  # optional: earlier studies' results (see below)
    adopted = searcher.replay(history, pending)   # on resume, before any ask (see below)
    while not searcher.finished:
        s = searcher.ask()                   # whenever a slot is free (up to `parallel` pending)
        ...                                  # submit s.point; later, when its result arrives:
        searcher.tell(s.trial_id, loss, constraints=[c1, c2])   # loss None = failed evaluation
    searcher.close()

``ask()`` returns None when it has nothing to propose *right now* (NOMAD's ``paper`` profile waits
for its block's results, the budget or every slot is taken by pending trials) or ever again (then
``finished`` is True). NOMAD's ``async`` profile, TPE and random fill a freed slot at once.
Every searcher counts replayed and told results against ``budget`` and never hands out more than
``budget`` suggestions in total, nor one while ``parallel`` trials are pending.
A non-finite value is told as a failure.

Criteria (constraints and two objectives)
-----------------------------------------
``constraints`` is a tuple of kinds, one per constraint, in the order their values are told: ``"pb"``
(NOMAD's progressive barrier: a violation is tolerated on the way, penalized) or ``"eb"`` (extreme
barrier: a violating point is never accepted). A constraint value follows NOMAD's convention,
``c <= 0`` satisfied. ``tell(trial_id, value, constraints=None)``:

- ``value``: a float (``n_objectives=1``), a tuple of two floats (``n_objectives=2``, both
  minimized), or None for a failed trial. A non-finite number in it makes it a failure.
- ``constraints``: a list of one float per constraint, or None. None (or anything) with
  ``value=None`` is a failure: the constraint values of a failed trial are not used. With a value,
  a study that has constraints must give all of them (None is then a ValueError: tell a failure
  instead); a non-finite constraint value makes the trial a failure (it cannot be judged).
- A value of the wrong shape (a pair with one objective, a float with two) or a constraints list
  of the wrong length is a ValueError naming it, and nothing changes.

What each searcher does with them (each module says more): NOMAD ``paper`` declares them to NOMAD
(``BB_OUTPUT_TYPE OBJ [OBJ] PB EB ...``, DMultiMADS for two objectives); NOMAD ``async`` keeps
extreme-barrier points out of its incumbent and model and runs a progressive-barrier-like rule
for pb (async_mads.py), and refuses two objectives; TPE (NNI) tells an infeasible trial as a
penalized value or a failure (option ``infeasible``), and with two objectives is Optuna's
multi-objective TPE with its ``constraints_func`` (optuna_tpe.py); random and default ignore values.
``n_objectives=2`` with ``default`` is refused.

Resume: ``replay(history, pending)`` takes the previous run's finished results (``Observation``:
point, value, trial_id, constraints, exactly as they were told) and
the trials that were still running when it died (``Pending``: their jobs are re-attached, not
resubmitted). It returns one ``Suggestion`` per pending entry, in order, carrying the journal's
``trial_id``: those trials are pending exactly like freshly asked ones (they hold budget and
parallel slots, their points are never proposed again) and are settled by the usual
``tell(trial_id, value)``. New trial ids exceed every replayed and pending id. More pending trials
than ``parallel`` (or than the budget left) are adopted all the same, with a warning: their jobs run
already; nothing new is proposed until they are told.

Warm start: ``warm_start(observations)`` gives the searcher the finished results of earlier studies
(``Observation``s of the same space and criteria; their trial ids are ignored). It is called at most
once, **before** ``replay`` and before the first ``ask`` (else a RuntimeError); a resumed study calls
it again with the same observations, then ``replay``, so that the searcher is rebuilt as it was.
Warm results count against no budget and hold no slot, and their points are never proposed again;
the searcher learns from them (NOMAD ``paper``: they are its starting points, X0, the best first;
``async``: its incumbent and model; TPE: NNI's ``import_data`` or Optuna's ``add_trial``).

Each algorithm lives in its own module, imported only when built, so that ``PyNomad``, ``nni`` and
``optuna`` stay behind one module each.

Try it: ``python bench/hpo_efficiency.py --seeds 2 --budgets 25`` runs them on a synthetic landscape;
``python bench/parallel_efficiency.py --seeds 2 --k 1 4 --algos nomad tpe random`` simulates K slots;
``python bench/multi_criteria.py --seeds 2`` runs constrained and bi-objective studies.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from orchestrator.search.space import SearchSpace

log = logging.getLogger(__name__)

ALGOS = ("nomad", "tpe", "random", "default")
MULTI_OBJECTIVE = ("nomad", "tpe", "random")   # the algos that search two objectives
KINDS = ("pb", "eb")


@dataclass(frozen=True)
class Suggestion:
    """A point to evaluate. ``encoded`` is the algorithm's own view of it, for logging."""
    trial_id: int
    point: dict
    encoded: Any = None


@dataclass(frozen=True)
class Observation:
    """A finished evaluation, for ``replay`` and ``warm_start``: value None = failed; ``constraints``
    as they were told (one value per constraint, <= 0 satisfied), None when failed or unconstrained."""
    point: dict
    value: float | tuple | None
    trial_id: int | None = None
    constraints: list | tuple | None = None


@dataclass(frozen=True)
class Pending:
    """A trial still running when the previous run died, for ``replay``; told later with its id."""
    point: dict
    trial_id: int


class Searcher(Protocol):
    name: str

    @property
    def finished(self) -> bool: ...
    def ask(self) -> Suggestion | None: ...
    def tell(self, trial_id: int, value: float | tuple | None, constraints: list | None = None) -> None: ...
    def warm_start(self, observations: list[Observation]) -> None: ...
    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]: ...
    def close(self) -> None: ...


def clean_value(value: Any) -> float | None:
    """The value a searcher stores: a finite float, or None for a failure (NaN/inf included)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (hasattr(x, "__len__") and hasattr(x, "__getitem__")
                                           and not isinstance(x, (str, bytes, dict)))


def _number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, (bool, str, bytes))


def clean_result(value: Any, constraints: Any, n_objectives: int, n_constraints: int,
                 where: str = "tell()") -> tuple[float | tuple | None, tuple | None]:
    """(value, constraints) as searchers store them: a float or a tuple of ``n_objectives`` floats and a
    tuple of ``n_constraints`` floats, or (None, None) for a failure. A wrong shape is a ValueError."""
    if n_objectives == 1 and value is not None and not _number(value):
        raise ValueError(f"{where}: value={value!r} must be one number (the study has one objective) or None")
    if n_objectives > 1 and value is not None and not (
            _is_sequence(value) and len(value) == n_objectives and all(_number(v) for v in value)):
        raise ValueError(f"{where}: value={value!r} must be a tuple of {n_objectives} numbers (one per "
                         "objective) or None")
    if constraints is not None and not (_is_sequence(constraints) and len(constraints) == n_constraints
                                        and all(_number(c) for c in constraints)):
        raise ValueError(f"{where}: constraints={constraints!r} must list {n_constraints} numbers (one per "
                         "constraint, <= 0 satisfied) or be None")
    if value is None:
        return None, None
    if constraints is None and n_constraints:
        raise ValueError(f"{where}: constraints=None with value={value!r}: the study has {n_constraints} "
                         "constraints; give their values, or value=None for a failed trial")
    values = (float(value),) if n_objectives == 1 else tuple(float(v) for v in value)
    cs = tuple(float(c) for c in constraints or ())
    if not all(math.isfinite(v) for v in values + cs):
        return None, None
    return (values[0] if n_objectives == 1 else values), cs


def violation(constraints: tuple | None, kinds: tuple) -> tuple[bool, float]:
    """(an extreme-barrier constraint is violated, h): h = sum of the squared progressive-barrier
    violations, NOMAD's default H_NORM L2 (0 = those constraints hold)."""
    cs = constraints or ()
    eb = any(c > 0 for c, kind in zip(cs, kinds) if kind == "eb")
    return eb, sum(max(c, 0.0) ** 2 for c, kind in zip(cs, kinds) if kind == "pb")


def rank(value: float | tuple | None, constraints: tuple | None, kinds: tuple) -> tuple:
    """Sort key of results, best first: successes before failures, then no extreme-barrier violation,
    then the smallest h (feasible = 0), then the (first) objective."""
    if value is None:
        return (1, 1, math.inf, math.inf)
    eb, h = violation(constraints, kinds)
    return (0, int(eb), h, value if isinstance(value, float) else value[0])


@dataclass
class Ledger:
    """Book-keeping shared by all searchers: trial ids, pending trials, seen points, budget, slots,
    and the shape of what is told (objectives, constraint kinds)."""
    space: SearchSpace
    budget: int
    parallel: int
    n_objectives: int = 1
    kinds: tuple = ()
    next_id: int = 0
    used: int = 0                                   # replayed + told results
    pending: dict = field(default_factory=dict)     # trial_id -> Suggestion
    seen: set = field(default_factory=set)          # keys of pending, told, replayed and warm points
    replayed: bool = False
    warmed: bool = False
    ended: bool = False                             # no more proposals: closed, or the searcher ran out

    def can_issue(self) -> bool:
        return not self.ended and self.used + len(self.pending) < self.budget and len(self.pending) < self.parallel

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    @property
    def done(self) -> bool:
        """What a searcher's `finished` says: the budget is used, or it ended and nothing is pending."""
        return self.exhausted or (self.ended and not self.pending)

    def end(self) -> None:
        """No more proposals (close(), or a searcher that has nothing left to propose); pending trials are
        still told."""
        self.ended = True

    def issue(self, point: dict, encoded: Any = None) -> Suggestion:
        suggestion = Suggestion(self.next_id, point, encoded)
        self.next_id += 1
        self.pending[suggestion.trial_id] = suggestion
        self.seen.add(self.space.key(point))
        return suggestion

    def clean(self, value: Any, constraints: Any, where: str = "tell()") -> tuple:
        return clean_result(value, constraints, self.n_objectives, len(self.kinds), where)

    def settle(self, trial_id: int, value: Any, constraints: Any = None) -> tuple[Suggestion, Any, tuple | None]:
        """Close a pending trial; returns it, its cleaned value and constraint values (clean_result)."""
        if trial_id not in self.pending:
            raise ValueError(f"tell(): trial {trial_id} is not pending (pending: {sorted(self.pending)})")
        value, constraints = self.clean(value, constraints)   # a ValueError leaves the trial pending
        self.used += 1
        return self.pending.pop(trial_id), value, constraints

    def _check_points(self, what: str, entries, where: str) -> None:
        for entry in entries:
            if not self.space.contains(entry.point):
                raise ValueError(f"{where}: {what} {entry.point!r} is outside the search space "
                                 "(or its fixed values differ); replay only this study's results")

    def warm(self, observations: list[Observation]) -> list[tuple[dict, Any, tuple | None]]:
        """Validate earlier studies' results and mark their points seen; they count against no budget."""
        if self.warmed or self.replayed or self.next_id or self.used or self.pending:
            raise RuntimeError("warm_start() must be called once, before replay() and the first ask()")
        observations = list(observations)
        self._check_points("warm point", observations, "warm_start()")
        out = [(obs.point, *self.clean(obs.value, obs.constraints, "warm_start()")) for obs in observations]
        self.warmed = True
        self.seen.update(self.space.key(point) for point, _, _ in out)
        return out

    def replay(self, history: list[Observation], pending: list[Pending] = (),
               encode: Callable[[dict], Any] = dict) -> tuple[list[tuple[dict, Any, tuple | None]],
                                                               list[Suggestion]]:
        """Count a previous run's results and adopt its running trials as pending.

        Returns the results as (point, cleaned value, constraint values) and one pending Suggestion
        per ``pending`` entry (same order and trial id, ``encoded`` = ``encode(point)``).
        """
        if self.replayed or self.next_id or self.used or self.pending:
            raise RuntimeError("replay() must be called once, before the first ask()")
        pending = list(pending)
        self._check_points("point", history, "replay()")
        self._check_points("pending point", pending, "replay()")
        finished_ids = {obs.trial_id for obs in history if obs.trial_id is not None}
        pending_ids = [p.trial_id for p in pending]
        for trial_id in pending_ids:
            if isinstance(trial_id, bool) or not isinstance(trial_id, int) or trial_id < 0:
                raise ValueError(f"replay(): pending trial_id={trial_id!r} must be an integer >= 0")
        twice = {i for i in pending_ids if pending_ids.count(i) > 1}
        clashes = sorted(twice | (finished_ids & set(pending_ids)))
        if clashes:
            raise ValueError(f"replay(): trial ids {clashes} are pending twice, or both pending and "
                             "finished; each trial must appear once (check the journal)")
        out = [(obs.point, *self.clean(obs.value, obs.constraints, "replay()")) for obs in history]
        if len(pending) > self.parallel or len(history) + len(pending) > self.budget:
            log.warning("replay(): %d finished + %d pending trials exceed budget=%d or parallel=%d; "
                        "no new trial is proposed until they are told", len(history), len(pending),
                        self.budget, self.parallel)
        self.replayed = True
        adopted = [Suggestion(p.trial_id, p.point, encode(p.point)) for p in pending]
        for point, _, _ in out:
            self.seen.add(self.space.key(point))
        for suggestion in adopted:
            self.seen.add(self.space.key(suggestion.point))
            self.pending[suggestion.trial_id] = suggestion
        self.used = len(out)
        # new trial ids never collide with old ones (observations without an id included)
        self.next_id = max([len(out) + len(adopted)] + [i + 1 for i in finished_ids | set(pending_ids)])
        return out, adopted


class LedgerSearcher:
    """What the searchers built on a Ledger share of the protocol: `finished` and `close` (nomad-paper keeps its
    own: PyNomad runs in a thread and must be stopped)."""
    _ledger: Ledger

    @property
    def finished(self) -> bool:
        return self._ledger.done

    def close(self) -> None:
        self._ledger.end()


def make_searcher(algo: str, space: SearchSpace, *, budget: int, parallel: int, seed: int,
                  options: dict | None = None, n_objectives: int = 1, constraints: tuple = ()) -> Searcher:
    """Build the searcher named ``algo`` (one of ALGOS). ``options`` are the algorithm's own;
    ``n_objectives`` (1 or 2) and ``constraints`` (kinds, "pb" | "eb", one per constraint) say what
    ``tell`` will be given (see the module docstring)."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is unknown; valid: {list(ALGOS)}")
    for what, value in (("budget", budget), ("parallel", parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    if n_objectives not in (1, 2) or isinstance(n_objectives, bool):
        raise ValueError(f"n_objectives={n_objectives!r} must be 1 or 2")
    if n_objectives == 2 and algo not in MULTI_OBJECTIVE:
        raise ValueError(f"algo={algo!r} cannot search two objectives; use one of {list(MULTI_OBJECTIVE)}")
    if isinstance(constraints, str) or not isinstance(constraints, (list, tuple)) or \
            any(kind not in KINDS for kind in constraints):
        raise ValueError(f"constraints={constraints!r} must be a tuple of kinds, one per constraint, "
                         f"each one of {list(KINDS)}")
    kinds = tuple(constraints)
    options = dict(options or {})
    criteria = {"n_objectives": n_objectives, "kinds": kinds}
    if algo == "nomad":
        from orchestrator.search.searchers.nomad import make_nomad
        return make_nomad(space, budget=budget, parallel=parallel, seed=seed, options=options, **criteria)
    sampler = options.pop("sampler", "optuna" if n_objectives == 2 else "nni") if algo == "tpe" else None
    if sampler not in (None, "nni", "optuna") or (sampler == "nni" and n_objectives == 2):
        raise ValueError(f"tpe option sampler={sampler!r}; valid: 'nni' (the paper's, one objective) or 'optuna'")
    if algo == "tpe" and sampler == "optuna":
        from orchestrator.search.searchers.optuna_tpe import OptunaTpeSearcher
        return OptunaTpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options, **criteria)
    if algo == "tpe":
        from orchestrator.search.searchers.tpe import TpeSearcher
        return TpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options, kinds=kinds)
    from orchestrator.search.searchers.simple import DefaultSearcher, RandomSearcher
    if options:
        raise ValueError(f"options {sorted(options)} given to algo={algo!r}, which takes none; remove them")
    cls = RandomSearcher if algo == "random" else DefaultSearcher
    return cls(space, budget=budget, parallel=parallel, seed=seed, **criteria)
