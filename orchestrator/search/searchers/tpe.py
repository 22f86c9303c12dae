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

Constraints (NNI's TPE knows none): a result violating any constraint (pb or eb alike: TPE has no
barrier to tell them apart) is told by the option ``infeasible``:
- ``penalty`` (default): as the worst value told so far (its own value if worse), so that TPE files it
  with the bad points and learns to stay away from the region;
- ``failure``: as a failed trial (``trial_end(success=False)``): TPE forgets it and may sample there again.
bench/multi_criteria.py measures both (figures in the report of that bench). Two objectives: NNI has
none; ``make_searcher("tpe", ..., n_objectives=2)`` builds Optuna's multi-objective TPE instead
(optuna_tpe.py). Warm start (``warm_start``): the earlier results go in through ``import_data``
(treated as above), before any replayed ones; they also count for NNI's ``n_startup_jobs``.

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

from orchestrator.search.searchers.base import Ledger, LedgerSearcher, Observation, Pending, Suggestion
from orchestrator.search.space import SearchSpace

_MAX_DRAWS = 50
INFEASIBLE = ("penalty", "failure")


def tpe_arguments(options: dict, parallel: int = 1) -> dict:
    """Validated ``tpe_args`` for TpeTuner; an unknown option names the valid ones."""
    unknown = sorted(set(options) - set(TpeArguments._fields))
    if unknown:
        raise ValueError(f"tpe options {unknown} are unknown; valid: {list(TpeArguments._fields) + ['infeasible']}")
    args = {"constant_liar_type": "best" if parallel == 1 else "mean", **options}
    liar = args["constant_liar_type"]
    if isinstance(liar, str) and liar.lower() in ("none", "null", ""):
        args["constant_liar_type"] = None  # NNI 3.0 crashes on the string 'none'
    elif liar not in (None, "best", "worst", "mean"):
        raise ValueError(f"tpe option constant_liar_type={liar!r}; valid: 'best', 'worst', 'mean', None")
    return args


class TpeSearcher(LedgerSearcher):
    name = "tpe"

    def __init__(self, space: SearchSpace, *, budget: int, parallel: int, seed: int, options: dict,
                 kinds: tuple = ()):
        logging.getLogger("nni").setLevel(logging.WARNING)  # NNI logs every proposal at INFO
        options = dict(options)
        self._infeasible = options.pop("infeasible", "penalty")
        if self._infeasible not in INFEASIBLE:
            raise ValueError(f"tpe option infeasible={self._infeasible!r}; valid: {list(INFEASIBLE)} (how a "
                             "trial violating a constraint is told to TPE)")
        self._space = space
        self._ledger = Ledger(space, budget, parallel, 1, kinds)
        self._worst: float | None = None      # the worst value told to NNI: an infeasible trial's penalty
        self._tuner = TpeTuner(optimize_mode="minimize", seed=seed, tpe_args=tpe_arguments(options, parallel))
        self._tuner.update_search_space(space.tpe_search_space())
        self._running: dict[int, tuple] = {}  # trial_id -> (NNI parameter id, NNI parameters)
        self._nni_ids = 0                     # NNI's own ids: dropped duplicates use one too

    def ask(self) -> Suggestion | None:
        if not self._ledger.can_issue():
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

    def tell(self, trial_id: int, value, constraints=None) -> None:
        _, value, constraints = self._ledger.settle(trial_id, value, constraints)
        nni_id, params = self._running.pop(trial_id)
        value = self._told(value, constraints)
        if value is None:
            self._tuner.trial_end(nni_id, False)
        else:
            self._tuner.receive_trial_result(nni_id, params, value)
            self._tuner.trial_end(nni_id, True)

    def _told(self, value: float | None, constraints: tuple | None) -> float | None:
        """What NNI hears: the value, None for a failure, an infeasible result as ``infeasible`` says."""
        if value is not None and any(c > 0 for c in constraints or ()):
            if self._infeasible == "failure":
                return None
            value = max(value, self._worst if self._worst is not None else value)
        if value is not None:
            self._worst = value if self._worst is None else max(self._worst, value)
        return value

    def warm_start(self, observations: list[Observation]) -> None:
        self._import(self._ledger.warm(observations))

    def replay(self, history: list[Observation], pending: list[Pending] = ()) -> list[Suggestion]:
        results, adopted = self._ledger.replay(history, pending, encode=self._space.to_tpe)
        self._import(results)
        for suggestion in adopted:
            self._adopt(suggestion)
        return adopted

    def _import(self, results: list) -> None:
        """Finished results into NNI (``import_data``: successes only) and its liar."""
        told = [(point, self._told(value, constraints)) for point, value, constraints in results]
        successes = [(point, value) for point, value in told if value is not None]
        if successes:
            self._tuner.import_data([{"parameter": self._space.to_tpe(point), "value": value}
                                     for point, value in successes])
            if self._tuner.liar is not None:   # import_data leaves the liar as if nothing were known
                for _, value in successes:
                    self._tuner.liar.update(value)

    def _adopt(self, suggestion: Suggestion) -> None:
        """Register a trial running since before the resume as NNI's generate_parameters would."""
        nni_id = self._nni_ids
        self._nni_ids += 1
        internal = format_parameters(suggestion.encoded, self._tuner.space)
        self._tuner._params[nni_id] = internal
        self._tuner._running_params[nni_id] = internal
        self._tuner.dedup.add_history(internal)
        self._running[suggestion.trial_id] = (nni_id, dict(suggestion.encoded))
