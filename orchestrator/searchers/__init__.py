"""Searchers behind one ask/tell protocol: ``nomad`` (MADS), ``tpe`` (NNI), ``random``, ``default``.

The study loop owns the loop; a searcher only proposes and listens::

    searcher = make_searcher("nomad", paper_space(), budget=100, parallel=4, seed=0, options={})
    adopted = searcher.replay(history, pending)   # on resume, before any ask (see below)
    while not searcher.finished:
        s = searcher.ask()                   # whenever a slot is free (up to `parallel` pending)
        ...                                  # submit s.point; later, when its result arrives:
        searcher.tell(s.trial_id, loss)      # loss None = failed evaluation
    searcher.close()

``ask()`` returns None when it has nothing to propose *right now* (NOMAD's ``paper`` profile waits
for its block's results, the budget or every slot is taken by pending trials) or ever again (then
``finished`` is True). NOMAD's ``async`` profile, TPE and random fill a freed slot at once.
Every searcher counts replayed and told results against ``budget`` and never hands out more than
``budget`` suggestions in total, nor one while ``parallel`` trials are pending.
A non-finite value is told as a failure.

Resume: ``replay(history, pending)`` takes the previous run's finished results (``Observation``) and
the trials that were still running when it died (``Pending``: their jobs are re-attached, not
resubmitted). It returns one ``Suggestion`` per pending entry, in order, carrying the journal's
``trial_id``: those trials are pending exactly like freshly asked ones (they hold budget and
parallel slots, their points are never proposed again) and are settled by the usual
``tell(trial_id, value)``. New trial ids exceed every replayed and pending id. More pending trials
than ``parallel`` (or than the budget left) are adopted all the same, with a warning: their jobs run
already; nothing new is proposed until they are told.

Each algorithm lives in its own module, imported only when built, so that ``PyNomad`` and ``nni``
stay behind one module each.

Try it: ``python bench/hpo_efficiency.py --seeds 2 --budgets 25`` runs them on a synthetic landscape;
``python bench/parallel_efficiency.py --seeds 2 --k 1 4 --algos nomad tpe random`` simulates K slots.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from orchestrator.space import SearchSpace

log = logging.getLogger(__name__)

ALGOS = ("nomad", "tpe", "random", "default")


@dataclass(frozen=True)
class Suggestion:
    """A point to evaluate. ``encoded`` is the algorithm's own view of it, for logging."""
    trial_id: int
    point: dict
    encoded: Any = None


@dataclass(frozen=True)
class Observation:
    """A finished evaluation from a previous run, for ``replay``; value None = failed."""
    point: dict
    value: float | None
    trial_id: int | None = None


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
    def tell(self, trial_id: int, value: float | None) -> None: ...
    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]: ...
    def close(self) -> None: ...


def clean_value(value: Any) -> float | None:
    """The value a searcher stores: a finite float, or None for a failure (NaN/inf included)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class Ledger:
    """Book-keeping shared by all searchers: trial ids, pending trials, seen points, budget, slots."""
    space: SearchSpace
    budget: int
    parallel: int
    next_id: int = 0
    used: int = 0                                   # replayed + told results
    pending: dict = field(default_factory=dict)     # trial_id -> Suggestion
    seen: set = field(default_factory=set)          # keys of pending, told and replayed points
    replayed: bool = False

    def can_issue(self) -> bool:
        return self.used + len(self.pending) < self.budget and len(self.pending) < self.parallel

    @property
    def exhausted(self) -> bool:
        return self.used >= self.budget

    def issue(self, point: dict, encoded: Any = None) -> Suggestion:
        suggestion = Suggestion(self.next_id, point, encoded)
        self.next_id += 1
        self.pending[suggestion.trial_id] = suggestion
        self.seen.add(self.space.key(point))
        return suggestion

    def settle(self, trial_id: int, value: Any) -> tuple[Suggestion, float | None]:
        """Close a pending trial; returns it and its cleaned value."""
        if trial_id not in self.pending:
            raise ValueError(f"tell(): trial {trial_id} is not pending (pending: {sorted(self.pending)})")
        self.used += 1
        return self.pending.pop(trial_id), clean_value(value)

    def replay(self, history: list[Observation], pending: list[Pending] = (),
               encode: Callable[[dict], Any] = dict) -> tuple[list[tuple[dict, float | None]],
                                                               list[Suggestion]]:
        """Count a previous run's results and adopt its running trials as pending.

        Returns the results as (point, cleaned value) and one pending Suggestion per ``pending``
        entry (same order and trial id, ``encoded`` = ``encode(point)``).
        """
        if self.replayed or self.next_id or self.used or self.pending:
            raise RuntimeError("replay() must be called once, before the first ask()")
        pending = list(pending)
        for what, entries in (("point", history), ("pending point", pending)):
            for entry in entries:
                if not self.space.contains(entry.point):
                    raise ValueError(f"replay(): {what} {entry.point!r} is outside the search space "
                                     "(or its fixed values differ); replay only this study's results")
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
        if len(pending) > self.parallel or len(history) + len(pending) > self.budget:
            log.warning("replay(): %d finished + %d pending trials exceed budget=%d or parallel=%d; "
                        "no new trial is proposed until they are told", len(history), len(pending),
                        self.budget, self.parallel)
        self.replayed = True
        out = [(obs.point, clean_value(obs.value)) for obs in history]
        adopted = [Suggestion(p.trial_id, p.point, encode(p.point)) for p in pending]
        for point, _ in out:
            self.seen.add(self.space.key(point))
        for suggestion in adopted:
            self.seen.add(self.space.key(suggestion.point))
            self.pending[suggestion.trial_id] = suggestion
        self.used = len(out)
        # new trial ids never collide with old ones (observations without an id included)
        self.next_id = max([len(out) + len(adopted)] + [i + 1 for i in finished_ids | set(pending_ids)])
        return out, adopted


def make_searcher(algo: str, space: SearchSpace, *, budget: int, parallel: int, seed: int,
                  options: dict | None = None) -> Searcher:
    """Build the searcher named ``algo`` (one of ALGOS). ``options`` are the algorithm's own."""
    if algo not in ALGOS:
        raise ValueError(f"algo={algo!r} is unknown; valid: {list(ALGOS)}")
    for what, value in (("budget", budget), ("parallel", parallel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what}={value!r} must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**31)")
    options = dict(options or {})
    if algo == "nomad":
        from orchestrator.searchers.nomad import make_nomad
        return make_nomad(space, budget=budget, parallel=parallel, seed=seed, options=options)
    if algo == "tpe":
        from orchestrator.searchers.tpe import TpeSearcher
        return TpeSearcher(space, budget=budget, parallel=parallel, seed=seed, options=options)
    from orchestrator.searchers.simple import DefaultSearcher, RandomSearcher
    if options:
        raise ValueError(f"options {sorted(options)} given to algo={algo!r}, which takes none; remove them")
    cls = RandomSearcher if algo == "random" else DefaultSearcher
    return cls(space, budget=budget, parallel=parallel, seed=seed)
