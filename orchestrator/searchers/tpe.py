"""NNI's TPE (``nni.algorithms.hpo.tpe_tuner.TpeTuner``) behind the ask/tell protocol.

The only module that imports nni. TpeTuner is used standalone, as NNI's own experiment manager would
drive it: ``update_search_space`` once, ``generate_parameters(id)`` per ask,
``receive_trial_result`` + ``trial_end(success=True)`` per result, ``trial_end(success=False)`` per
failure (NNI keeps no record of a failed trial: TPE simply never learns from it), ``import_data`` on
resume (successful results only; replayed failures still count against the budget).

Resume with trials still running: NNI has no public call for "this parameter set is running", so
``replay`` registers each adopted trial the way ``generate_parameters`` does, under a fresh NNI
parameter id: ``_params[id]`` and ``_running_params[id]`` = the point in NNI's internal format
(``format_parameters``, as ``import_data`` uses), plus the deduplicator's history. That is what the
constant liar reads (one fake record per running parameter set) and what ``receive_trial_result``
needs: it pops ``_running_params[id]`` (a KeyError for an id NNI did not register) to build the
real records; ``trial_end`` pops it too. ``import_data`` does not feed the liar, so ``replay`` also
calls ``liar.update`` with each replayed success: after a resume, the lie ('best', 'worst',
'mean') is the one the uninterrupted run would tell, not NNI's 0.0 for "no result yet". These are
private fields of nni 3.0 (archived, last release): a change of nni version must re-check them.

Defaults are the paper's (NNI's): 20 random start-up trials, 24 EI candidates, constant liar 'best'
with parallel = 1 (the paper ran one trial at a time; the liar acts only while trials are pending).
With parallel > 1 the default liar is 'mean': NNI's 'best' tells TPE that every running trial is as
good as the best result, so it keeps sampling around the running points and stalls in one region
(bench/parallel_efficiency.py, paper landscape, 10 seeds: within 1% of the optimum in 3/10 studies at
K = 4, 8 and 2/10 at K=16 with 'best', 7, 8 and 8/10 with 'mean'; 'worst' is about as good as 'mean').
``options`` may override any field of ``nni.algorithms.hpo.tpe_tuner.TpeArguments``:
``constant_liar_type`` ('best' | 'worst' | 'mean' | None), ``n_startup_jobs``, ``n_ei_candidates``,
``linear_forgetting``, ``prior_weight``, ``gamma``.

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
from nni.common.hpo_utils import format_parameters

from orchestrator.searchers import Ledger, Observation, Pending, Suggestion
from orchestrator.space import SearchSpace

_MAX_DRAWS = 50


def tpe_arguments(options: dict, parallel: int = 1) -> dict:
    """Validated ``tpe_args`` for TpeTuner; an unknown option names the valid ones."""
    unknown = sorted(set(options) - set(TpeArguments._fields))
    if unknown:
        raise ValueError(f"tpe options {unknown} are unknown; valid: {list(TpeArguments._fields)}")
    args = {"constant_liar_type": "best" if parallel == 1 else "mean", **options}
    liar = args["constant_liar_type"]
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
        self._ledger = Ledger(space, budget, parallel)
        self._tuner = TpeTuner(optimize_mode="minimize", seed=seed, tpe_args=tpe_arguments(options, parallel))
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

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        results, adopted = self._ledger.replay(history, pending, encode=self._space.to_tpe)
        successes = [(point, value) for point, value in results if value is not None]
        if successes:
            self._tuner.import_data([{"parameter": self._space.to_tpe(point), "value": value}
                                     for point, value in successes])
            if self._tuner.liar is not None:   # import_data leaves the liar as if nothing were known
                for _, value in successes:
                    self._tuner.liar.update(value)
        for suggestion in adopted:
            self._adopt(suggestion)
        return adopted

    def _adopt(self, suggestion: Suggestion) -> None:
        """Register a trial running since before the resume as NNI's generate_parameters would."""
        nni_id = self._nni_ids
        self._nni_ids += 1
        internal = format_parameters(suggestion.encoded, self._tuner.space)
        self._tuner._params[nni_id] = internal
        self._tuner._running_params[nni_id] = internal
        self._tuner.dedup.add_history(internal)
        self._running[suggestion.trial_id] = (nni_id, dict(suggestion.encoded))

    def close(self) -> None:
        self._closed = True
