"""The searchers with constraints, two objectives and a warm start (orchestrator/search/searchers/__init__.py).

A synthetic landscape shaped like a LoRA fine-tune (the paper's loss; memory and time grow with the rank)
with two constraints: memory <= 30 GB (pb; rank 128 only without dropout) and hours <= 1.2 (eb; ranks
256 and 512 out). Driven like the study loop drives a searcher, real NOMAD, NNI and Optuna.
"""
import math

import numpy as np
import pytest

from orchestrator.search.criteria import hypervolume, pareto_front
from orchestrator.search.landscapes import paper_landscape
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.search.space import paper_space

from .drive import drive

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

SPACE = paper_space()
KINDS = ("pb", "eb")
PROFILES = {"nomad-paper": ("nomad", {"profile": "paper"}), "nomad-async": ("nomad", {"profile": "async"})}
ALL = ("nomad-paper", "nomad-async", "tpe", "random", "default")
MULTI = ("nomad-paper", "tpe", "random")


def memory(p):
    return 14.0 + 14.0 * p["r"] / 128 + 3.0 * (p["dropout"] > 0)


def hours(p):
    return 0.5 + 0.5 * p["r"] / 128 + 0.15 * (p["dropout"] > 0)


def constraints(p, kinds=KINDS):
    return [memory(p) - 30.0, hours(p) - 1.2][:len(kinds)]


def feasible(p):
    return all(c <= 0 for c in constraints(p))


def evaluate(n_objectives, kinds):
    def fn(p):
        value = paper_landscape(p) if n_objectives == 1 else (paper_landscape(p), hours(p))
        return value, constraints(p, kinds)
    return fn


def build(algo, budget=30, parallel=1, seed=0, n_objectives=1, kinds=KINDS, **options):
    algo, profile = PROFILES.get(algo, (algo, {}))
    return make_searcher(algo, SPACE, budget=budget, parallel=parallel, seed=seed, options={**profile, **options},
                         n_objectives=n_objectives, constraints=kinds)


def keys(points):
    return [SPACE.key(p) for p in points]


# ------------------------------------------------------------------------------------------- constraints
def test_nomad_paper_declares_the_constraints_and_its_best_is_feasible():
    searcher = build("nomad-paper", budget=60)
    assert "BB_OUTPUT_TYPE OBJ PB EB" in searcher._params
    told, _ = drive(searcher, evaluate(1, KINDS))
    searcher.close()
    assert len(told) == 60
    assert any(not feasible(s.point) for s, _, _ in told)   # the landscape tempts it across the bounds
    # NOMAD's own answer (it heard the constraint values): its best feasible point is one we told, feasible
    best = SPACE.from_nomad(searcher.result["x_best_feas"][0])
    assert feasible(best)
    assert paper_landscape(best) == pytest.approx(min(v for s, v, _ in told if feasible(s.point)))
    assert paper_landscape(best) > min(v for _, v, _ in told)   # a better infeasible point was not taken


def test_nomad_async_incumbent_is_always_feasible_once_one_is():
    searcher = build("nomad-async", budget=60)
    fn, seen_feasible = evaluate(1, KINDS), False
    pending = []
    while not searcher.finished:
        while not pending and (s := searcher.ask()) is not None:
            pending.append(s)
        if not pending:
            break
        s = pending.pop()
        value, cs = fn(s.point)
        searcher.tell(s.trial_id, value, constraints=cs)
        seen_feasible |= feasible(s.point)
        centre = searcher._center
        if centre is None:   # only between episodes: a restart has no centre until a start point is back
            assert searcher._converged, "no incumbent before any episode converged"
            continue
        assert not seen_feasible or centre[2][0] == 0.0, "an infeasible incumbent"
        assert hours(SPACE.from_nomad(list(centre[1]))) <= 1.2, "an extreme-barrier point became the incumbent"
    searcher.close()


@pytest.mark.parametrize("algo", ["nomad-paper", "nomad-async", "tpe"])
def test_constrained_search_finds_a_good_feasible_point(algo):
    searcher = build(algo, budget=60)
    told, _ = drive(searcher, evaluate(1, KINDS))
    searcher.close()
    best = min(v for s, v, _ in told if feasible(s.point))
    assert best < 0.99   # the feasible optimum is 0.954, the default point 1.19


@pytest.mark.parametrize("infeasible, expected", [("penalty", "worst"), ("failure", None)])
def test_tpe_tells_an_infeasible_trial_as_a_penalty_or_a_failure(infeasible, expected):
    searcher = build("tpe", budget=10, infeasible=infeasible)
    good = searcher.ask()
    searcher.tell(good.trial_id, 1.3, constraints=[-1.0, -1.0])
    bad = searcher.ask()
    searcher.tell(bad.trial_id, 0.9, constraints=[2.0, -1.0])   # better but infeasible
    records = searcher._tuner._history[("r",)]
    assert [rec.loss for rec in records] == ([1.3, 1.3] if expected == "worst" else [1.3])
    searcher.close()


def test_a_failed_trial_stays_a_failure_for_nomad():
    searcher = build("nomad-paper", budget=5)
    s = searcher.ask()
    searcher.tell(s.trial_id, None, constraints=[-1.0, -1.0])   # constraint values of a failure: unused
    assert searcher._memo[SPACE.key(s.point)] is None
    searcher.close()


# ------------------------------------------------------------------------------------------- two objectives
def test_two_objectives_give_a_front():
    fronts = {}
    for algo in MULTI:
        searcher = build(algo, budget=40, n_objectives=2, kinds=())
        told, _ = drive(searcher, evaluate(2, ()))
        searcher.close()
        assert len(told) == 40
        fronts[algo] = pareto_front({s.trial_id: v for s, v, _ in told})
    for algo in ("nomad-paper", "tpe"):
        ranks = {v[1] for v in fronts[algo].values()}   # the hours tell the rank
        assert len(ranks) >= 3, f"{algo}: a front of one or two ranks"
        assert hypervolume(fronts[algo], (1.1, 2.6)) > 0.8 * hypervolume(fronts["random"], (1.1, 2.6))


def test_nomad_two_objectives_is_dmultimads_and_the_default_profile_at_any_parallel():
    from orchestrator.search.searchers.nomad import NomadSearcher
    searcher = build("nomad", parallel=4, n_objectives=2, kinds=("pb",))
    assert isinstance(searcher, NomadSearcher)
    assert "BB_OUTPUT_TYPE OBJ OBJ PB" in searcher._params and "DMULTIMADS_OPTIMIZATION yes" in searcher._params
    told, _ = drive(searcher, evaluate(2, ("pb",)), parallel=4)
    searcher.close()
    assert len(told) == 30 and len({SPACE.key(s.point) for s, _, _ in told}) == 30
    with pytest.raises(ValueError, match="profile 'async' searches one objective.*profile: paper"):
        build("nomad-async", n_objectives=2, kinds=())


# ------------------------------------------------------------------------------------------- exact resume
def crash(searcher, fn, parallel, after):
    told, pending = drive(searcher, fn, parallel=parallel, stop_after=after)
    while len(pending) < parallel and (s := searcher.ask()) is not None:
        pending.append(s)
    searcher.close()
    return told, pending


@pytest.mark.parametrize("n_objectives, kinds", [(1, KINDS), (2, ()), (2, ("pb",))])
@pytest.mark.parametrize("parallel", [1, 3])
def test_nomad_paper_resume_with_criteria_continues_exactly(n_objectives, kinds, parallel):
    fn = evaluate(n_objectives, kinds)
    whole = build("nomad-paper", budget=30, parallel=parallel, n_objectives=n_objectives, kinds=kinds)
    reference = [s.point for s, _, _ in drive(whole, fn, parallel=parallel)[0]]
    whole.close()

    told, pending = crash(build("nomad-paper", budget=30, parallel=parallel, n_objectives=n_objectives,
                                kinds=kinds), fn, parallel, after=13)
    resumed = build("nomad-paper", budget=30, parallel=parallel, n_objectives=n_objectives, kinds=kinds)
    adopted = resumed.replay([Observation(s.point, v, s.trial_id, cs) for s, v, cs in told],
                             [Pending(s.point, s.trial_id) for s in pending])
    more, left = drive(resumed, fn, parallel=parallel, running=adopted)
    resumed.close()
    assert not left
    assert [s.point for s, _, _ in told] + [s.point for s, _, _ in more] == reference


def test_optuna_tpe_replay_restores_values_and_constraints():
    fn = evaluate(2, ("pb",))
    first = build("tpe", budget=20, parallel=2, n_objectives=2, kinds=("pb",), n_startup_trials=4)
    told, pending = crash(first, fn, 2, after=8)
    resumed = build("tpe", budget=20, parallel=2, n_objectives=2, kinds=("pb",), n_startup_trials=4)
    adopted = resumed.replay([Observation(s.point, v, s.trial_id, cs) for s, v, cs in told],
                             [Pending(s.point, s.trial_id) for s in pending])
    trials = resumed._study.trials
    assert [t.values for t in trials[:len(told)]] == [list(v) for _, v, _ in told]
    assert [list(t.constraints.values()) for t in trials[:len(told)]] == [cs for _, _, cs in told]
    assert [t.state.name for t in trials[len(told):]] == ["RUNNING"] * len(pending)
    more, left = drive(resumed, fn, parallel=2, running=adopted)
    resumed.close()
    assert not left and len(told) + len(more) == 20
    assert len(set(keys([s.point for s, _, _ in told + more]))) == 20


# ------------------------------------------------------------------------------------------- warm start
def warm_observations(n=25, seed=3, n_objectives=1, kinds=KINDS):
    rng = np.random.default_rng(seed)
    fn = evaluate(n_objectives, kinds)
    points = [SPACE.sample(rng) for _ in range(n)]
    return [Observation(p, *fn(p)[:1], trial_id=k, constraints=fn(p)[1]) for k, p in enumerate(points)]


@pytest.mark.parametrize("algo", ALL)
def test_warm_points_count_against_no_budget_and_are_never_proposed(algo):
    warm = warm_observations()
    searcher = build(algo, budget=20)
    searcher.warm_start(warm)
    told, _ = drive(searcher, evaluate(1, KINDS))
    searcher.close()
    assert not set(keys([s.point for s, _, _ in told])) & set(keys([o.point for o in warm]))
    assert len(told) == (20 if algo != "default" else 1)
    assert searcher.finished


@pytest.mark.parametrize("algo, n_objectives", [("nomad-paper", 1), ("nomad-async", 1), ("tpe", 1),
                                                 ("nomad-paper", 2), ("tpe", 2)])
def test_warm_start_changes_the_first_suggestion(algo, n_objectives):
    kinds = KINDS if n_objectives == 1 else ()
    cold = build(algo, n_objectives=n_objectives, kinds=kinds)
    first_cold = cold.ask()
    cold.close()
    warm = build(algo, n_objectives=n_objectives, kinds=kinds)
    warm.warm_start(warm_observations(n_objectives=n_objectives, kinds=kinds))
    first_warm = warm.ask()
    warm.close()
    assert first_warm.point != first_cold.point


@pytest.mark.parametrize("algo", ["nomad-paper", "nomad-async"])
def test_nomad_starts_from_the_best_warm_point(algo):
    # unconstrained: with a progressive barrier NOMAD also polls around its best infeasible point
    warm = warm_observations(n=12, kinds=())
    best = min(warm, key=lambda o: o.value)
    searcher = build(algo, kinds=())
    searcher.warm_start(warm)
    first = searcher.ask()
    searcher.close()

    def distance(a, b):
        lower, upper = SPACE.nomad_bounds()
        return math.dist(*[[(v - lo) / (hi - lo) for v, lo, hi in zip(SPACE.to_nomad(p), lower, upper)]
                           for p in (a, b)])
    nearest = min(warm, key=lambda o: distance(o.point, first.point))
    assert nearest is best   # its poll (or model step) is around the best warm point
    if algo == "nomad-paper":
        assert searcher._x0s[0] == SPACE.to_nomad(best.point)   # X0 is the best, then the others


def test_nomad_paper_resume_after_a_warm_start_continues_exactly():
    warm, fn = warm_observations(n=10), evaluate(1, KINDS)
    whole = build("nomad-paper", budget=25)
    whole.warm_start(warm)
    reference = [s.point for s, _, _ in drive(whole, fn)[0]]
    whole.close()
    first = build("nomad-paper", budget=25)
    first.warm_start(warm)
    told, pending = crash(first, fn, 1, after=9)
    resumed = build("nomad-paper", budget=25)
    resumed.warm_start(warm)   # the same warm start, then the journal
    adopted = resumed.replay([Observation(s.point, v, s.trial_id, cs) for s, v, cs in told],
                             [Pending(s.point, s.trial_id) for s in pending])
    more, _ = drive(resumed, fn, running=adopted)
    resumed.close()
    assert [s.point for s, _, _ in told] + [s.point for s, _, _ in more] == reference
    assert len(told) + len(more) == 25


@pytest.mark.parametrize("algo", ALL)
def test_warm_start_only_once_before_replay_and_ask(algo):
    warm = warm_observations(n=3)
    searcher = build(algo)
    searcher.warm_start(warm)
    with pytest.raises(RuntimeError, match="warm_start.*once"):
        searcher.warm_start(warm)
    searcher.close()
    searcher = build(algo)
    searcher.replay([])
    with pytest.raises(RuntimeError, match="before replay"):
        searcher.warm_start(warm)
    searcher.close()
    searcher = build(algo)
    searcher.ask()
    with pytest.raises(RuntimeError, match="first ask"):
        searcher.warm_start(warm)
    searcher.close()
    with pytest.raises(ValueError, match="outside the search space"):
        build(algo).warm_start([Observation({"r": 3, "alpha": 1, "dropout": 0.0, "lr": 1e-4}, 1.0, None, [0, 0])])


# ------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("algo", ALL)
def test_tell_checks_the_shape_of_values_and_constraints(algo):
    searcher = build(algo, budget=5)
    s = searcher.ask()
    with pytest.raises(ValueError, match=r"value=\(1.0, 2.0\) must be one number"):
        searcher.tell(s.trial_id, (1.0, 2.0), constraints=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"constraints=\[0.0\] must list 2 numbers"):
        searcher.tell(s.trial_id, 1.0, constraints=[0.0])
    with pytest.raises(ValueError, match="constraints=None with value=1.0"):
        searcher.tell(s.trial_id, 1.0)
    searcher.tell(s.trial_id, 1.0, constraints=[-1.0, float("nan")])   # still pending; NaN: a failure
    searcher.close()
    with pytest.raises(ValueError, match=r"replay\(\): constraints=\[1.0\] must list 2 numbers"):
        build(algo).replay([Observation(s.point, 1.0, 0, [1.0])])


@pytest.mark.parametrize("algo", MULTI)
def test_two_objectives_want_pairs(algo):
    searcher = build(algo, budget=5, n_objectives=2, kinds=())
    s = searcher.ask()
    with pytest.raises(ValueError, match=r"value=1.0 must be a tuple of 2 numbers"):
        searcher.tell(s.trial_id, 1.0)
    searcher.tell(s.trial_id, (1.0, 0.5))
    searcher.close()


def test_make_searcher_validates_the_criteria():
    with pytest.raises(ValueError, match=r"algo='default' cannot search two objectives; use one of "
                                         r"\['nomad', 'tpe', 'random'\]"):
        build("default", n_objectives=2, kinds=())
    with pytest.raises(ValueError, match="n_objectives=3 must be 1 or 2"):
        build("random", n_objectives=3)
    with pytest.raises(ValueError, match=r"constraints=\('pb', 'hard'\) must be a tuple of kinds"):
        build("random", kinds=("pb", "hard"))
    with pytest.raises(ValueError, match=r"infeasible='skip'; valid: \['penalty', 'failure'\]"):
        build("tpe", infeasible="skip")
    with pytest.raises(ValueError, match=r"\['constant_liar_type'\] do not apply to two objectives"):
        build("tpe", n_objectives=2, kinds=(), constant_liar_type="best")
    with pytest.raises(ValueError, match="DMULTIMADS_OPTIMIZATION is set by the searcher"):
        build("nomad-paper", DMULTIMADS_OPTIMIZATION=True)


@pytest.mark.parametrize("algo", MULTI)
@pytest.mark.parametrize("parallel", [1, 3])
def test_two_objective_searchers_are_seeded_and_respect_slots(algo, parallel):
    runs = []
    for seed in (7, 7, 8):
        searcher = build(algo, budget=24, parallel=parallel, seed=seed, n_objectives=2, kinds=("pb",))
        pending, told = [], []
        while not searcher.finished:
            while len(pending) < parallel and (s := searcher.ask()) is not None:
                pending.append(s)
            assert len(pending) <= parallel and len({SPACE.key(s.point) for s in pending}) == len(pending)
            if not pending:
                break
            s = pending.pop(0)
            value, cs = evaluate(2, ("pb",))(s.point)
            searcher.tell(s.trial_id, value, constraints=cs)
            told.append(s.point)
        searcher.close()
        assert len(told) == 24 and len(set(keys(told))) == 24
        runs.append(told)
    assert runs[0] == runs[1] and runs[0] != runs[2]
