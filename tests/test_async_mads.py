"""NOMAD's asynchronous profile (orchestrator/search/searchers/async_mads.py) and its MADS steps.

The protocol contract (slots, budget, replay, adoption, determinism) is in test_searchers.py; these
tests pin what makes it MADS: the start, the poll geometry, the refinement around an incumbent.
"""
import math

import numpy as np
import pytest

from orchestrator.search.landscapes import paper_landscape
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.search.searchers.async_mads import CONVERGED
from orchestrator.search.searchers.mads_steps import Box, QuadModel, frame, latin_hypercube, poll_steps
from orchestrator.search.space import SearchSpace, paper_space

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def build(budget=40, parallel=1, seed=0, space=None, constraints=(), **options):
    return make_searcher("nomad", space or paper_space(), budget=budget, parallel=parallel, seed=seed,
                         options={"profile": "async", **options}, constraints=constraints)


def run(searcher, objective, k=1, running=()):
    """Oldest-first answers with k slots (``running``: adopted trials, answered first); the points
    handed out, in order."""
    pending, out = list(running), []
    while not searcher.finished:
        while len(pending) < k and (s := searcher.ask()) is not None:
            pending.append(s)
            out.append(s)
        if not pending:
            break
        s = pending.pop(0)
        searcher.tell(s.trial_id, objective(s.point))
    searcher.close()
    return out


def test_starts_with_x0_then_a_latin_hypercube():
    handed = run(build(budget=8, lh_points=7), paper_landscape)
    assert handed[0].point == paper_space().default_point()
    lh = np.array([s.encoded for s in handed[1:]])
    assert len(set(lh[:, 0])) == 7    # r index: 7 of the 8 values, one per stratum
    assert len(set((lh[:, 2] - 1) * 7 // 64)) == 7   # alpha: one point per seventh of [1, 64]
    assert len(set(np.floor((lh[:, 3] + 6) / 3 * 7))) == 7   # log10 lr: one per seventh of [-6, -3]


def test_poll_steps_are_a_positive_basis_on_the_mesh_inside_the_frame():
    box = Box.from_space(paper_space())
    for level in (-2, 0, 3, 7):
        frame_size, mesh_size = frame(box, level)
        steps = np.array(poll_steps(box, level, np.random.default_rng(level + 10)))
        assert len(steps) == 8 and np.allclose(steps[0::2], -steps[1::2])   # +-d: 2n directions
        assert np.linalg.matrix_rank(steps[0::2]) == 4                       # spanning
        assert np.all(np.abs(steps) <= frame_size + 1e-12)
        assert np.allclose(steps / mesh_size, np.round(steps / mesh_size))    # on the mesh
        assert np.all(steps[:, :3] == np.round(steps[:, :3]))                 # integers stay integers
    sizes = [frame(box, level)[0] for level in range(-2, 8)]
    assert all(np.all(a >= b) and np.any(a > b) for a, b in zip(sizes, sizes[1:]))


def test_latin_hypercube_hits_every_stratum_once():
    box = Box.from_space(SearchSpace.from_dict({"a": {"int": [0, 99], "default": 0},
                                                "b": {"log": [1e-4, 1.0], "default": 1e-2}}))
    points = np.array(latin_hypercube(box, 10, np.random.default_rng(0)))
    assert sorted(points[:, 0] // 10) == list(range(10))
    assert sorted(np.floor(box.scale(points)[:, 1] * 10)) == list(range(10))


def test_failed_polls_halve_the_frame_around_an_incumbent_nothing_beats(monkeypatch):
    """One real variable, best at X0: every poll fails, so MADS polls X0 +- frame with the frame
    halving at each level down to CONVERGED, where the episode ends (global points come in between; the
    stall rule, which would end the episode sooner on a few results per level, is off here)."""
    from orchestrator.search.searchers import async_mads
    monkeypatch.setattr(async_mads, "STALL", 10 ** 6)
    space = SearchSpace.from_dict({"lr": {"log": [1e-6, 1e-3], "default": 1e-5}})
    handed = run(build(budget=60, space=space), lambda p: (math.log10(p["lr"]) + 5) ** 2)
    offsets = [round(s.encoded[0] + 5, 6) for s in handed]
    assert offsets[0] == 0   # X0
    first_seen = []
    for level in range(CONVERGED + 1):   # frame = range / 8 / 2^level
        step = round(3 / 8 / 2 ** level, 6)
        assert step in offsets and -step in offsets, f"level {level}: X0 +- {step} not polled"
        first_seen.append(min(offsets.index(step), offsets.index(-step)))
    assert first_seen == sorted(first_seen)
    assert offsets.count(0) == 1   # X0 is never proposed again


def test_episodes_find_the_deeper_of_two_basins():
    """two_basins: the paper's broad basin (0.95) is a decoy, a narrower one holds 0.90. The first episode
    polls down the broad one; a later episode starts in the basin the global model separates from it and
    polls that one down. Four slots, seeds 0-3: within 1% of 0.90 in at least 3 (4 now; the profile before the
    episodes: 1). On seeds 0-9 in this harness: 5/10 at K=4, 8/10 at K=1 (before: 3/10, 7/10)."""
    from orchestrator.search.landscapes import TWO_BASINS_OPTIMUM, two_basins
    hits = 0
    for seed in range(4):
        best = min(two_basins(s.point) for s in run(build(budget=100, parallel=4, seed=seed), two_basins, k=4))
        hits += best <= 1.01 * TWO_BASINS_OPTIMUM
    assert hits >= 3


def test_quadratic_model_finds_the_minimum_of_a_quadratic():
    space = SearchSpace.from_dict({"n": {"int": [0, 20], "default": 0},
                                   "x": {"log": [1e-3, 1.0], "default": 1e-2}})
    box = Box.from_space(space)
    xs = np.array(latin_hypercube(box, 12, np.random.default_rng(1)))
    fs = (xs[:, 0] - 13) ** 2 + 40 * (xs[:, 1] + 1.2) ** 2
    model = QuadModel(box, xs, fs, xs[np.argmin(fs)])
    best = model.minimizers(xs[np.argmin(fs)], 3, np.random.default_rng(0))[0]   # a fine mesh
    assert best[0] == 13 and abs(best[1] + 1.2) < 0.15   # values above the 3rd quartile are capped


def test_failures_do_not_stop_the_search():
    calls = []

    def failing(point):   # X0 and every second evaluation fail
        calls.append(point)
        return None if len(calls) % 2 == 1 else paper_landscape(point)

    handed = run(build(budget=30, parallel=3), failing, k=3)
    assert len(handed) == 30 and len({paper_space().key(s.point) for s in handed}) == 30
    handed = run(build(budget=12, parallel=2), lambda point: None, k=2)   # nothing ever succeeds
    assert len(handed) == 12 and len({paper_space().key(s.point) for s in handed}) == 12


def test_a_small_discrete_space_is_exhausted_without_repeats():
    space = SearchSpace.from_dict({"r": {"choice": [4, 8, 16], "default": 8},
                                   "dropout": {"choice": [0.0, 0.1], "default": 0.1},
                                   "alpha": {"choice": [16], "default": 16}})   # one value: a span of 0
    searcher = build(budget=20, parallel=2, space=space)
    handed = run(searcher, lambda p: p["r"] / 16 + p["dropout"], k=2)
    assert len(handed) == 6 and len({space.key(s.point) for s in handed}) == 6
    assert searcher.finished and searcher.ask() is None


def test_several_instances_run_side_by_side_with_the_papers_nomad():
    paper = make_searcher("nomad", paper_space(), budget=12, parallel=1, seed=0, options={"profile": "paper"})
    first, second = build(budget=12, parallel=2), build(budget=12, parallel=2)
    alone = run(build(budget=12, parallel=2), paper_landscape, k=2)
    s = paper.ask()   # the paper profile's NOMAD thread runs meanwhile
    together = run(first, paper_landscape, k=2)
    run(second, paper_landscape, k=2)
    paper.tell(s.trial_id, 1.0)
    paper.close()
    assert [x.point for x in together] == [x.point for x in alone]


def test_resume_is_deterministic_and_repeats_nothing():
    k = 4
    searcher = build(budget=30, parallel=k)
    told, running = [], []
    while len(told) < 14:
        while len(running) < k:
            running.append(searcher.ask())
        s = running.pop(len(running) // 2)   # out of order
        told.append((s, paper_landscape(s.point)))
        searcher.tell(s.trial_id, told[-1][1])
    searcher.close()
    history = [Observation(s.point, v, s.trial_id) for s, v in told]
    pending = [Pending(s.point, s.trial_id) for s in running]
    continuations = []
    for _ in range(2):
        resumed = build(budget=30, parallel=k)
        adopted = resumed.replay(history, pending)
        assert [a.trial_id for a in adopted] == [s.trial_id for s in running]
        continuations.append(run(resumed, paper_landscape, k=k, running=adopted))
        assert resumed.finished
    assert len(continuations[0]) == 30 - len(told) - len(running)
    keys = [paper_space().key(p.point) for p in [s for s, _ in told] + running + continuations[0]]
    assert len(keys) == len(set(keys))
    assert [s.point for s in continuations[0]] == [s.point for s in continuations[1]]
    assert min(s.trial_id for s in continuations[0]) > max(s.trial_id for s in running)


def memory_and_hours(p):
    """bench/multi_criteria.py's constraints: memory <= 30 GB (pb), hours <= 1.2 (eb); ranks 256, 512 and 128
    with dropout are infeasible, and the best feasible point (r = 128, dropout 0) is on the bound."""
    return [14 + 14 * p["r"] / 128 + 3 * (p["dropout"] > 0) - 30, 0.5 + 0.5 * p["r"] / 128 + 0.15 * (p["dropout"] > 0) - 1.2]


@pytest.mark.parametrize("seed", [0, 1])
def test_constraint_models_keep_the_search_off_the_infeasible_side(seed):
    """The constraint models hold back polls predicted infeasible and weigh the global step by feasibility:
    few infeasible evaluations (random spends ~20 of 60 here, this profile spent ~18 before them, 7-9 now: the
    restarts' hypercubes and the points far from all tried are drawn among the predicted feasible), and the
    feasible optimum (0.95429) is still reached."""
    searcher = build(budget=60, seed=seed, constraints=("pb", "eb"))
    infeasible, best = 0, math.inf
    while not searcher.finished:
        s = searcher.ask()
        cs, value = memory_and_hours(s.point), paper_landscape(s.point)
        searcher.tell(s.trial_id, value, cs)
        infeasible += any(c > 0 for c in cs)
        best = min(best, value) if all(c <= 0 for c in cs) else best
    assert infeasible <= 10 and best < 0.955


def test_an_episode_that_walked_into_a_known_basin_adds_no_basin():
    """An episode ends when its poll reaches an earlier episode's basin; its centre then lies on that basin's
    slope, not at a minimum. Were it kept as a converged basin, the hill-valley test would find every point
    downhill of it 'in a known basin' and end the next episode there (two_basins: the deep basin's episode was
    ended so, and the rest of the budget explored). An episode that converged adds its incumbent."""
    searcher = build(budget=100)
    known, slope = np.array([7.0, 0.0, 64.0, -3.3]), np.array([4.0, 1.0, 30.0, -3.4])
    searcher._converged = [known]
    searcher._center, searcher._known_basin = (searcher._key(slope), slope, (0.0, 1.0)), True
    searcher._restart()
    assert [list(x) for x in searcher._converged] == [list(known)]
    searcher._center = (searcher._key(slope), slope, (0.0, 1.0))   # converged (not a known basin)
    searcher._restart()
    assert [list(x) for x in searcher._converged] == [list(known), list(slope)]
