"""NNI's TPE (``nni.algorithms.hpo.tpe_tuner.TpeTuner``) behind the ask/tell protocol.

The only module that imports nni. TpeTuner is used standalone, as NNI's own experiment manager would
drive it: ``update_search_space`` once, ``generate_parameters(id)`` per ask,
``receive_trial_result`` + ``trial_end(success=True)`` per result, ``trial_end(success=False)`` per
failure (NNI keeps no record of a failed trial: TPE simply never learns from it), ``import_data`` on
resume (successful results only; replayed failures still count against the budget).

Defaults are the paper's (NNI's): 20 random start-up trials, constant liar 'best' (it only acts
while trials are pending, i.e. with parallel > 1), 24 EI candidates. ``options`` may override any
field of ``nni.algorithms.hpo.tpe_tuner.TpeArguments``: ``constant_liar_type`` ('best' | 'worst' |
'mean' | None), ``n_startup_jobs``, ``n_ei_candidates``, ``linear_forgetting``, ``prior_weight``, ``gamma``.

Encoding (``SearchSpace.tpe_search_space``): choices as ``choice``, ints as ``uniform`` truncated,
log reals as ``uniform`` on log10. Deterministic given the seed and the same answers. Because lr is
continuous, a repeated point is practically impossible; a proposal equal to a seen point is still
dropped (told to NNI as an abandoned trial) and drawn again.

Built by ``make_searcher("tpe", space, budget=100, parallel=1, seed=0, options={"n_startup_jobs": 20})``;
tested by ``python -m pytest tests/test_searchers.py -k tpe``.
"""
from __future__ import annotations

import logging

from nni.algorithms.hpo.tpe_tuner import TpeArguments, TpeTuner

from orchestrator.searchers import Ledger, Observation, Suggestion
from orchestrator.space import SearchSpace

_MAX_DRAWS = 50


def tpe_arguments(options: dict) -> dict:
    """Validated ``tpe_args`` for TpeTuner; an unknown option names the valid ones."""
    unknown = sorted(set(options) - set(TpeArguments._fields))
    if unknown:
        raise ValueError(f"tpe options {unknown} are unknown; valid: {list(TpeArguments._fields)}")
    args = dict(options)
    liar = args.get("constant_liar_type", "best")
    if isinstance(liar, str) and liar.lower() in ("none", "null", ""):
        args["constant_liar_type"] = None  # NNI 3.0 crashes on the string 'none'
    elif liar not in (None, "best", "worst", "mean"):
        raise ValueError(f"tpe option constant_liar_type={liar!r}; valid: 'best', 'worst', 'mean', None")
    return args


class TpeSearcher:
    name = "tpe"

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict):
        logging.getLogger("nni").setLevel(logging.WARNING)  # NNI logs every proposal at INFO
        self._space = space
        self._ledger = Ledger(space, budget)
        self._tuner = TpeTuner(optimize_mode="minimize", seed=seed, tpe_args=tpe_arguments(options))
        self._tuner.update_search_space(space.tpe_search_space())
        self._running: dict[int, tuple] = {}  # trial_id -> (NNI parameter id, NNI parameters)
        self._nni_ids = 0                     # NNI's own ids: dropped duplicates use one too
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._ledger.exhausted or (self._closed and not self._ledger.pending)

    def ask(self) -> Suggestion | None:
        if self._closed or not self._ledger.can_issue():
            return None
        for _ in range(_MAX_DRAWS):
            nni_id = self._nni_ids
            self._nni_ids += 1
            params = self._tuner.generate_parameters(nni_id)
            point = self._space.from_tpe(params)
            if self._space.key(point) not in self._ledger.seen:
                suggestion = self._ledger.issue(point, encoded=dict(params))
                self._running[suggestion.trial_id] = (nni_id, params)
                return suggestion
            self._tuner.trial_end(nni_id, False)  # a seen point: withdraw it and draw again
        raise RuntimeError(f"TPE proposed only already-seen points in {_MAX_DRAWS} draws")

    def tell(self, trial_id: int, value: float | None) -> None:
        _, value = self._ledger.settle(trial_id, value)
        nni_id, params = self._running.pop(trial_id)
        if value is None:
            self._tuner.trial_end(nni_id, False)
        else:
            self._tuner.receive_trial_result(nni_id, params, value)
            self._tuner.trial_end(nni_id, True)

    def replay(self, history: list[Observation]) -> None:
        results = self._ledger.replay(history)
        data = [{"parameter": self._space.to_tpe(point), "value": value}
                for point, value in results if value is not None]
        if data:
            self._tuner.import_data(data)

    def close(self) -> None:
        self._closed = True
