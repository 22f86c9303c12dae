"""One contract suite for every searcher, driven like the study loop drives them, on a cheap objective.

``nomad-paper`` and ``nomad-async`` are NOMAD with its profile forced; plain ``nomad`` gets the
default profile for its ``parallel`` (paper at 1, async above).
"""
import heapq
import math
import time

import numpy as np
import pytest

from orchestrator.search.landscapes import paper_landscape
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.search.space import paper_space

from .drive import drive as drive_searcher

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]  # a NOMAD thread that deadlocks fails the test, not the suite

PROFILES = {"nomad-paper": ("nomad", {"profile": "paper"}), "nomad-async": ("nomad", {"profile": "async"}),
            "tpe-optuna": ("tpe", {"sampler": "optuna"})}
LEARNING = ("nomad-paper", "nomad-async", "tpe", "tpe-optuna", "random")
ALL = LEARNING + ("default",)
REFILLING = ("nomad", "nomad-async", "tpe", "tpe-optuna", "random")   # a freed slot gets a point at once, at any K
DEFAULT_LOSS = paper_landscape(paper_space().default_point())


def build(algo, budget=30, parallel=1, seed=0, **options):
    algo, profile = PROFILES.get(algo, (algo, {}))
    return make_searcher(algo, paper_space(), budget=budget, parallel=parallel, seed=seed,
                         options={**profile, **options})


def drive(searcher, parallel=1, objective=paper_landscape, stop_after=None, running=()):
    """tests/drive.py's loop on an objective without constraints: the told (suggestion, value) pairs and the
    suggestions still pending; a pending point proposed again fails the test."""
    told, pending = drive_searcher(searcher, lambda point: (objective(point), None), parallel, stop_after, running,
                                   key=paper_space().key)
    return [(s, value) for s, value, _ in told], pending


def points(told):
    return [s.point for s, _ in told]


def keys(suggestions):
    return [paper_space().key(s.point) for s in suggestions]


def crash(searcher, parallel, after, hold=1):
    """Drive like `drive`; die once `after` results are told and `hold` trials run: (told, pending).

    The loop may die right after a tell (free slots not refilled yet) or after refilling them.
    """
    told, pending = [], []
    while len(told) < after or len(pending) < hold:
        while len(pending) < parallel and (s := searcher.ask()) is not None:
            pending.append(s)
        assert pending, "the searcher stopped before the crash"
        if len(told) >= after and len(pending) >= hold:
            break
        s = pending.pop(0)
        told.append((s, paper_landscape(s.point)))
        searcher.tell(s.trial_id, told[-1][1])
    searcher.close()
    return told, pending


def resume(searcher, told, pending):
    """What `--resume` does: replay the finished results, adopt the running trials."""
    return searcher.replay([Observation(s.point, v, s.trial_id) for s, v in told],
                           [Pending(s.point, s.trial_id) for s in pending])


@pytest.mark.parametrize("algo", ALL)
def test_points_are_in_the_space_with_python_types(algo):
    searcher = build(algo, budget=25)
    told, _ = drive(searcher)
    searcher.close()
    space = paper_space()
    assert told
    for suggestion, _ in told:
        assert space.contains(suggestion.point)
        assert [type(suggestion.point[k]) for k in ("r", "alpha", "dropout", "lr")] == [int, int, float, float]
    ids = [s.trial_id for s, _ in told]
    assert ids == sorted(set(ids))


@pytest.mark.parametrize("algo", LEARNING)
def test_up_to_k_distinct_points_pending_at_once(algo):
    searcher = build(algo, budget=40, parallel=4)
    widest = 0
    pending, told = [], 0
    while not searcher.finished:
        while len(pending) < 4 and (s := searcher.ask()) is not None:
            pending.append(s)
        widest = max(widest, len(pending))
        assert len({paper_space().key(s.point) for s in pending}) == len(pending)
        if not pending:
            break
        s = pending.pop(0)
        searcher.tell(s.trial_id, paper_landscape(s.point))
        told += 1
    searcher.close()
    assert told == 40
    assert widest == 4   # paper profile: NOMAD's poll blocks fill all 4 slots


@pytest.mark.parametrize("algo", LEARNING)
def test_failures_are_told_and_the_search_goes_on(algo):
    calls = []

    def flaky(point):   # the first (X0) succeeds, then every third fails, one NaN
        calls.append(point)
        n = len(calls)
        return float("nan") if n == 5 else None if n % 3 == 0 else paper_landscape(point)

    searcher = build(algo, budget=30, parallel=2)
    told, pending = drive(searcher, parallel=2, objective=flaky)
    searcher.close()
    assert len(told) == 30 and not pending and searcher.finished
    assert sum(value is None for _, value in told) == 10
    assert min(v for _, v in told if v is not None and not math.isnan(v)) < DEFAULT_LOSS


@pytest.mark.parametrize("algo", LEARNING)
@pytest.mark.parametrize("parallel", [1, 3])
def test_same_seed_and_answers_give_the_same_points(algo, parallel):
    runs = []
    for seed in (7, 7, 8):
        searcher = build(algo, budget=30, parallel=parallel, seed=seed)
        runs.append(points(drive(searcher, parallel=parallel)[0]))
        searcher.close()
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("algo", ALL)
def test_budget_counts_pending_and_finishes(algo):
    searcher = build(algo, budget=3, parallel=4)
    handed_out = 0
    while not searcher.finished:
        asked = [s for s in (searcher.ask() for _ in range(4)) if s is not None]
        handed_out += len(asked)
        assert handed_out <= 3, "more suggestions than the budget"
        if not asked:
            break
        for s in asked:
            searcher.tell(s.trial_id, paper_landscape(s.point))
    assert handed_out == (1 if algo == "default" else 3)
    assert searcher.finished and searcher.ask() is None
    searcher.close()


@pytest.mark.parametrize("algo", LEARNING)
def test_replay_counts_against_the_budget_and_is_not_proposed_again(algo):
    first = build(algo, budget=30, parallel=1)
    told, _ = drive(first, stop_after=12)
    first.close()
    history = [Observation(s.point, v, s.trial_id) for s, v in told]
    history[3] = Observation(history[3].point, None, history[3].trial_id)   # a replayed failure

    resumed = build(algo, budget=30, parallel=1)
    resumed.replay(history)
    more, _ = drive(resumed)
    resumed.close()
    old_keys = {paper_space().key(o.point) for o in history}
    assert len(more) == 30 - 12
    assert not old_keys & {paper_space().key(s.point) for s, _ in more}
    assert min(s.trial_id for s, _ in more) > max(o.trial_id for o in history)


@pytest.mark.parametrize("parallel", [1, 3])
def test_nomad_resume_continues_exactly_where_it_stopped(parallel):
    whole = build("nomad-paper", budget=30, parallel=parallel)
    reference = points(drive(whole, parallel=parallel)[0])
    whole.close()

    told, pending = crash(build("nomad-paper", budget=30, parallel=parallel), parallel, after=2,
                          hold=parallel - 1)
    assert len(pending) == parallel - 1   # parallel 3: mid-block; 1: between a tell and the next ask
    resumed = build("nomad-paper", budget=30, parallel=parallel)
    resumed.replay([Observation(s.point, v, s.trial_id) for s, v in told])   # running ones: not adopted
    more = points(drive(resumed, parallel=parallel)[0])
    resumed.close()
    assert points(told) + more == reference
    assert [s.point for s in pending] == more[:len(pending)]   # the crash's pending trials come first


@pytest.mark.parametrize("parallel, after, hold", [(1, 13, 1), (3, 2, 2), (3, 13, 2)])
def test_nomad_resume_with_running_trials_continues_exactly_where_it_stopped(parallel, after, hold):
    whole = build("nomad-paper", budget=30, parallel=parallel)
    reference = points(drive(whole, parallel=parallel)[0])
    whole.close()

    # (3, 2, 2): mid-block, one point of the first poll told; (3, 13, 2): a whole block running
    told, pending = crash(build("nomad-paper", budget=30, parallel=parallel), parallel, after, hold)
    assert len(pending) >= hold
    resumed = build("nomad-paper", budget=30, parallel=parallel)
    adopted = resume(resumed, told, pending)
    more, left = drive(resumed, parallel=parallel, running=adopted)   # the adopted trials are told first
    resumed.close()
    assert not left and resumed.finished
    assert points(told) + points(more) == reference
    assert [s.trial_id for s, _ in more[:len(pending)]] == [s.trial_id for s in pending]


@pytest.mark.parametrize("algo, k", [(algo, 4) for algo in LEARNING] + [("nomad-async", 8)])
def test_resume_adopts_the_trials_still_running(algo, k):
    budget = 24
    told, pending = crash(build(algo, budget=budget, parallel=k), k, after=9)
    p = len(pending)
    assert p == (1 if algo == "nomad-paper" else k - 1)   # paper NOMAD: a search step's 1-point block

    resumed = build(algo, budget=budget, parallel=k)
    adopted = resume(resumed, told, pending)
    assert [(a.trial_id, a.point) for a in adopted] == [(s.trial_id, s.point) for s in pending]
    fresh = []
    while (s := resumed.ask()) is not None:   # the adopted trials hold p of the k slots
        fresh.append(s)
    assert len(fresh) <= k - p
    if algo != "nomad-paper":   # paper NOMAD's block is the adopted trial alone
        assert len(fresh) == k - p
    old_ids = [s.trial_id for s, _ in told] + [s.trial_id for s in pending]
    assert all(s.trial_id > max(old_ids) for s in fresh)

    more, left = drive(resumed, parallel=k, running=adopted + fresh)
    resumed.close()
    assert not left and resumed.finished and resumed.ask() is None
    assert [s.trial_id for s, _ in more[:p]] == [s.trial_id for s in pending]   # told by their ids
    evaluated = keys(s for s, _ in told) + keys(s for s, _ in more)
    assert len(evaluated) == budget
    assert len(set(evaluated)) == budget, "a point was evaluated twice"


def test_nomad_adopted_trials_it_does_not_propose_are_told_without_deadlock():
    told, pending = crash(build("nomad-paper", budget=24, parallel=4), 4, after=2)   # 3 of the first poll
    assert len(pending) == 3
    resumed = build("nomad-paper", budget=24, parallel=4, seed=5)   # another seed: other poll directions
    adopted = resume(resumed, told, pending)
    proposed, evaluate = [], resumed._evaluate
    resumed._evaluate = lambda coords: proposed.extend(coords) or evaluate(coords)
    more, left = drive(resumed, parallel=4, running=adopted)
    resumed.close()
    assert not left and len(told) + len(more) == 24
    evaluated = keys(s for s, _ in told) + keys(s for s, _ in more)
    assert len(set(evaluated)) == 24
    never = set(keys(pending)) - {paper_space().key(paper_space().from_nomad(c)) for c in proposed}
    assert never   # the case under test: NOMAD did not propose some adopted points...
    assert all(key in resumed._memo for key in never)   # ...whose values went to the memo only


def test_nomad_resume_counts_the_failed_starting_point_retries():
    x0 = paper_space().default_point()
    first = build("nomad-paper", budget=10)
    failed = first.ask()
    first.tell(failed.trial_id, None)
    retry = first.ask()   # the first retry is running at the crash
    first.close()
    assert retry.point == x0

    resumed = build("nomad-paper", budget=10)
    [adopted] = resumed.replay([Observation(x0, None, failed.trial_id)], [Pending(x0, retry.trial_id)])
    assert resumed.ask() is None   # the adopted X0 holds the one slot, and NOMAD waits for it
    resumed.tell(adopted.trial_id, None)
    last = resumed.ask()   # the second and last retry
    assert last.point == x0 and last.trial_id > retry.trial_id
    resumed.tell(last.trial_id, None)
    assert resumed.ask() is None and resumed.finished
    resumed.close()


def test_tpe_adopted_trials_are_running_for_nni():
    told, pending = crash(build("tpe", budget=20, parallel=3, n_startup_jobs=4), 3, after=6)
    resumed = build("tpe", budget=20, parallel=3, n_startup_jobs=4, constant_liar_type="best")
    adopted = resume(resumed, told, pending)
    tuner = resumed._tuner
    assert len(tuner._running_params) == len(pending)   # the constant liar lies for each of them
    assert tuner.liar.lie() == min(v for _, v in told)   # the liar knows the replayed results
    records = len(tuner._history[("r",)])   # one record per imported result
    assert records == len(told)
    resumed.tell(adopted[0].trial_id, 0.5)
    assert len(tuner._running_params) == len(pending) - 1 and len(tuner._history[("r",)]) == records + 1
    resumed.close()


def test_default_adopts_a_running_default_point():
    searcher = build("default", budget=10, parallel=2)
    [adopted] = searcher.replay([], [Pending(paper_space().default_point(), 4)])
    assert adopted.trial_id == 4 and searcher.ask() is None and not searcher.finished
    searcher.tell(4, 1.0)
    assert searcher.finished


def test_replay_rejects_clashing_trial_ids():
    point = paper_space().default_point()
    with pytest.raises(ValueError, match=r"trial ids \[3\]"):
        build("random").replay([Observation(point, 1.0, 3)], [Pending(point, 3)])
    with pytest.raises(ValueError, match=r"trial ids \[1\]"):
        build("random", parallel=2).replay([], [Pending(point, 1), Pending(point, 1)])
    with pytest.raises(ValueError, match="outside the search space"):
        build("random").replay([], [Pending({"r": 3, "alpha": 1, "dropout": 0.0, "lr": 1e-4}, 0)])


@pytest.mark.parametrize("algo, k", [("nomad-paper", 1), ("nomad-async", 1), ("nomad-async", 4), ("tpe", 1)])
def test_beats_the_default_point_within_40_evaluations(algo, k):
    searcher = build(algo, budget=40, parallel=k)
    told, _ = drive(searcher, parallel=k)
    searcher.close()
    assert min(v for _, v in told) < DEFAULT_LOSS - 0.15


def test_default_proposes_once():
    searcher = build("default", budget=10)
    first = searcher.ask()
    assert first.point == paper_space().default_point() and searcher.ask() is None
    assert not searcher.finished
    searcher.tell(first.trial_id, 1.0)
    assert searcher.finished

    resumed = build("default", budget=10)
    resumed.replay([Observation(paper_space().default_point(), 1.0, 0)])
    assert resumed.finished and resumed.ask() is None


@pytest.mark.parametrize("algo", ALL)
def test_tell_rejects_unknown_or_repeated_trials(algo):
    searcher = build(algo, budget=5)
    s = searcher.ask()
    with pytest.raises(ValueError, match="not pending"):
        searcher.tell(s.trial_id + 100, 1.0)
    searcher.tell(s.trial_id, 1.0)
    with pytest.raises(ValueError, match="not pending"):
        searcher.tell(s.trial_id, 1.0)
    searcher.close()


@pytest.mark.parametrize("algo", ALL)
def test_replay_only_before_the_first_ask(algo):
    searcher = build(algo, budget=5)
    searcher.ask()
    with pytest.raises(RuntimeError, match="before the first ask"):
        searcher.replay([])
    searcher.close()


def test_replay_rejects_points_outside_the_space():
    with pytest.raises(ValueError, match="outside the search space"):
        build("random").replay([Observation({"r": 3, "alpha": 1, "dropout": 0.0, "lr": 1e-4}, 1.0)])


def test_nomad_retries_a_failed_starting_point_then_gives_up():
    searcher = build("nomad-paper", budget=10)
    x0 = paper_space().default_point()
    for _ in range(3):   # the first try and two retries
        s = searcher.ask()
        assert s.point == x0
        searcher.tell(s.trial_id, None)
    assert searcher.ask() is None and searcher.finished
    searcher.close()

    searcher = build("nomad-paper", budget=10)
    s = searcher.ask()
    searcher.tell(s.trial_id, None)
    s = searcher.ask()
    searcher.tell(s.trial_id, 1.0)
    assert searcher.ask().point != x0   # NOMAD goes on from a successful X0
    searcher.close()


def test_nomad_close_mid_block_is_quick_and_frees_nomad_for_the_next_searcher():
    first = build("nomad-paper", budget=100, parallel=4)
    drive(first, parallel=4, stop_after=6)
    with pytest.raises(RuntimeError, match="another NomadSearcher"):
        build("nomad-paper").ask()
    start = time.monotonic()
    first.close()
    assert time.monotonic() - start < 5 and first.finished and first.ask() is None
    second = build("nomad-paper", budget=5)
    assert second.ask() is not None
    second.close()


def test_make_searcher_validates_its_arguments():
    with pytest.raises(ValueError, match=r"valid: \['nomad', 'tpe', 'random', 'default'\]"):
        build("grid")
    with pytest.raises(ValueError, match="budget=0"):
        build("random", budget=0)
    with pytest.raises(ValueError, match="parallel"):
        build("random", parallel=0)
    with pytest.raises(ValueError, match="takes none"):
        build("random", n_startup_jobs=5)
    with pytest.raises(ValueError, match="n_startup_job.*valid"):
        build("tpe", n_startup_job=5)


def test_tpe_liar_is_the_papers_at_parallel_1_and_mean_above():
    assert build("tpe", parallel=1)._tuner.args.constant_liar_type == "best"
    assert build("tpe", parallel=4)._tuner.args.constant_liar_type == "mean"
    assert build("tpe", parallel=4, constant_liar_type="worst")._tuner.args.constant_liar_type == "worst"


def test_tpe_options_reach_nni():
    searcher = build("tpe", budget=8, n_startup_jobs=2, constant_liar_type="none")
    told, _ = drive(searcher)
    searcher.close()
    assert len(told) == 8
    assert searcher._tuner.args.n_startup_jobs == 2 and searcher._tuner.liar is None


def simulate(searcher, k, budget, seed=0, objective=paper_landscape):
    """Trials of unequal, seeded lengths on k slots; results told as trials end (out of order).

    Checks at every step that at most k trials run and at most `budget` are handed out; returns the
    suggestions in the order they were handed out and the number of times ask() left a slot idle.
    """
    rng, running, handed, idle, now = np.random.default_rng(seed), [], [], 0, 0.0
    while not searcher.finished:
        while len(running) < k and len(handed) < budget:
            s = searcher.ask()
            if s is None:
                idle += 1
                break
            handed.append(s)
            heapq.heappush(running, (now + rng.lognormal(0.0, 0.5), s.trial_id, s))
        assert len(running) <= k and len(handed) <= budget
        if not running:
            break
        now, _, s = heapq.heappop(running)
        searcher.tell(s.trial_id, objective(s.point))
    searcher.close()
    return handed, idle


@pytest.mark.parametrize("algo", REFILLING)
@pytest.mark.parametrize("k", [4, 8])
def test_a_freed_slot_is_refilled_at_once(algo, k):
    """The oldest trial keeps running while the others end one by one: every end frees a slot that
    ask() fills at once, with a point never handed out before."""
    budget = 40
    searcher = build(algo, budget=budget, parallel=k)
    running = [searcher.ask() for _ in range(k)]
    assert None not in running
    straggler, running, handed = running[0], running[1:], k
    while handed < budget:
        s = running.pop(0)
        searcher.tell(s.trial_id, paper_landscape(s.point))   # k - 1 told since the straggler started...
        fresh = searcher.ask()                                 # ...and the freed slot is filled at once
        assert fresh is not None, f"slot left idle after {handed} hand-outs"
        running.append(fresh)
        handed += 1
        assert searcher.ask() is None   # all k slots taken: nothing more
    for s in [straggler] + running:
        searcher.tell(s.trial_id, paper_landscape(s.point))
    assert searcher.finished and searcher.ask() is None
    searcher.close()


@pytest.mark.parametrize("algo", LEARNING)
@pytest.mark.parametrize("k", [1, 4, 8, 16])
def test_unequal_trials_respect_slots_and_budget_and_never_repeat(algo, k):
    handed, idle = simulate(build(algo, budget=48, parallel=k), k, budget=48)
    assert len(handed) == 48
    assert len(set(keys(handed))) == 48, "a point was handed out twice"
    if algo != "nomad-paper":   # paper NOMAD waits for its blocks; the others never leave a slot idle
        assert idle == 0


@pytest.mark.parametrize("k", [4, 8])
def test_nomad_async_same_seed_and_out_of_order_answers_give_the_same_points(k):
    runs = [keys(simulate(build("nomad-async", budget=40, parallel=k, seed=seed), k, 40, seed=1)[0])
            for seed in (3, 3, 4)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_nomad_profiles_default_by_parallel_and_are_validated():
    from orchestrator.search.searchers.async_mads import AsyncMadsSearcher
    from orchestrator.search.searchers.nomad import NomadSearcher
    assert isinstance(build("nomad", parallel=1), NomadSearcher)           # the paper's MADS
    assert isinstance(build("nomad", parallel=2), AsyncMadsSearcher)       # the recommended one
    assert (build("nomad", parallel=1).profile, build("nomad", parallel=2).profile) == ("paper", "async")
    assert isinstance(build("nomad", parallel=4, profile="paper"), NomadSearcher)
    assert isinstance(build("nomad", parallel=1, profile="async", lh_points=3), AsyncMadsSearcher)
    with pytest.raises(ValueError, match=r"profile='fast' is unknown; valid: \['paper', 'async'\]"):
        build("nomad", profile="fast")
    with pytest.raises(ValueError, match=r"\['DIRECTION_TYPE'\] do not apply to profile 'async'"):
        build("nomad", parallel=4, DIRECTION_TYPE="ORTHO 2N")
    with pytest.raises(ValueError, match="lh_points=-1 must be an integer"):
        build("nomad", profile="async", lh_points=-1)
    with pytest.raises(ValueError, match="not a NOMAD parameter name"):
        build("nomad", profile="paper", lh_points=3)


@pytest.mark.parametrize("algo", ["nomad-paper", "nomad-async"])
def test_nomad_starts_from_the_papers_x0_in_the_papers_variable_order(algo):
    searcher = build(algo, budget=5)
    first = searcher.ask()
    searcher.close()
    assert first.point == paper_space().default_point()
    assert first.encoded == [2, 5, 32, -5.0]   # (r index, dropout index, alpha, log10 lr), as the paper


@pytest.mark.unit
def test_tpe_sampler_option_picks_nni_or_optuna():
    def make(n_objectives=1, **options):
        return make_searcher("tpe", paper_space(), budget=5, parallel=1, seed=0, options=options,
                             n_objectives=n_objectives)
    assert type(make()).__name__ == "TpeSearcher"                    # the paper's NNI by default
    assert getattr(make(sampler="optuna"), "profile", None) == "optuna"
    assert getattr(make(2), "profile", None) == "optuna"              # two objectives: Optuna's only
    with pytest.raises(ValueError, match="sampler='hyperopt'"):
        make(sampler="hyperopt")
    with pytest.raises(ValueError, match="sampler='nni'"):
        make(2, sampler="nni")
