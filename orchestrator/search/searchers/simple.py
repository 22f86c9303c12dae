"""The two baseline searchers: ``default`` (the paper's untuned point) and ``random`` (uniform).

Both are pure Python and deterministic given the seed. On resume, ``replay(history, pending)``
books the still-running trials in the Ledger as pending: they hold budget and slots, and their points,
like the finished ones, are never proposed again (for ``default``, a pending default point counts as
proposed). They ignore values: constraints and two objectives (random only) are accepted and checked
for shape, nothing more; ``warm_start`` marks the earlier points seen (random never draws them; a warm
default point is not proposed again, so ``default`` then has nothing to do). Built through
``orchestrator.search.searchers.make_searcher("random", space, budget=..., parallel=..., seed=...)``.
"""
from __future__ import annotations

import numpy as np

from orchestrator.search.searchers.base import Ledger, LedgerSearcher, Observation, Pending, Suggestion
from orchestrator.search.space import SearchSpace

_MAX_DRAWS = 1000  # draws to find an unseen point before calling a (small, discrete) space exhausted


class DefaultSearcher(LedgerSearcher):
    """Proposes the space's default point once (budget permitting), then is finished."""
    name = "default"

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, n_objectives: int = 1,
                 kinds: tuple = ()):
        self._ledger = Ledger(space, budget, parallel, n_objectives, kinds)
        self._space = space

    def ask(self) -> Suggestion | None:
        if not self._ledger.can_issue():
            return None
        self._ledger.end()   # the one point it has
        point = self._space.default_point()
        return self._ledger.issue(point, encoded=dict(point))

    def tell(self, trial_id: int, value, constraints=None) -> None:
        self._ledger.settle(trial_id, value, constraints)

    def warm_start(self, observations: list[Observation]) -> None:
        self._ledger.warm(observations)
        self._end_if_seen()

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        _, adopted = self._ledger.replay(history, pending)
        self._end_if_seen()   # pending too
        return adopted

    def _end_if_seen(self) -> None:
        if self._space.key(self._space.default_point()) in self._ledger.seen:
            self._ledger.end()


class RandomSearcher(LedgerSearcher):
    """Uniform sampling per dimension (log-uniform for ``log``), never repeating a seen point."""
    name = "random"

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, n_objectives: int = 1,
                 kinds: tuple = ()):
        self._ledger = Ledger(space, budget, parallel, n_objectives, kinds)
        self._space = space
        self._rng = np.random.default_rng(seed)

    def ask(self) -> Suggestion | None:
        if not self._ledger.can_issue():
            return None
        for _ in range(_MAX_DRAWS):
            point = self._space.sample(self._rng)
            if self._space.key(point) not in self._ledger.seen:
                return self._ledger.issue(point, encoded=dict(point))
        self._ledger.end()
        return None

    def tell(self, trial_id: int, value, constraints=None) -> None:
        self._ledger.settle(trial_id, value, constraints)

    def warm_start(self, observations: list[Observation]) -> None:
        self._ledger.warm(observations)

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        return self._ledger.replay(history, pending)[1]   # adopted: pending and seen, never drawn again
