"""The models behind the async NOMAD profile's global step and the noise-aware champion rule: the Gaussian process
(orchestrator/search/searchers/gp.py), the global search (mads_global.py), the model-mean ranking
(orchestrator/search/model_mean.py) and the measured landscape's table (orchestrator/search/landscapes.py).
"""
import json
import math

import numpy as np
import pytest
from scipy.optimize import check_grad

from orchestrator.search.landscapes import Table, measured_table
from orchestrator.search.model_mean import rank_by_model_mean
from orchestrator.search.searchers.gp import GP, expected_improvement, feasible_probability
from orchestrator.search.searchers.mads_global import GlobalSearch, choice_mask
from orchestrator.search.searchers.mads_steps import Box
from orchestrator.search.space import paper_space

pytestmark = pytest.mark.unit


def smooth(u):
    return np.sin(3 * u[:, 0]) + (u[:, 1] - 0.3) ** 2


def test_gp_gradient_is_the_marginal_likelihoods():
    rng = np.random.default_rng(0)
    u = rng.random((25, 3))
    gp = GP(u, smooth(u) + 0.05 * rng.normal(size=25), categorical=np.array([False, True, False]))
    theta = gp.theta + 0.1
    assert check_grad(lambda t: gp._neg_lml(t)[0], lambda t: gp._neg_lml(t)[1], theta) < 1e-3 * (
        1 + np.linalg.norm(gp._neg_lml(theta)[1]))


def test_gp_interpolates_a_smooth_function_and_estimates_its_noise():
    rng = np.random.default_rng(1)
    u, test = rng.random((40, 2)), rng.random((200, 2))
    clean = GP(u, smooth(u))
    mean, sd = clean.predict(test)
    assert np.sqrt(np.mean((mean - smooth(test)) ** 2)) < 0.05
    assert clean.noise_sd < 0.02
    noisy = GP(u, smooth(u) + 0.1 * rng.normal(size=40))
    assert 0.04 < noisy.noise_sd < 0.2
    # a running point believed at its mean: the uncertainty there collapses, the mean stays
    x = np.array([[1.4, -0.4]])   # outside the data: uncertain
    believed = clean.believe(x)
    assert believed.predict(x)[1][0] < 0.1 * clean.predict(x)[1][0]
    assert abs(believed.predict(x)[0][0] - clean.predict(x)[0][0]) < 1e-6
    # a fixed theta skips the fit and gives the same model
    again = GP(u, smooth(u), theta=clean.theta)
    assert np.allclose(again.predict(test)[0], mean)


def test_expected_improvement_and_feasibility():
    ei = expected_improvement(np.array([0.0, 1.0, 1.0]), np.array([0.1, 0.1, 1.0]), best=0.5)
    assert ei[0] > 0.45 and ei[1] < 1e-6 < ei[2]   # a sure gain; no chance; a chance through uncertainty
    p = feasible_probability(np.array([-3.0, 0.0, 3.0]), np.array([1.0, 1.0, 1.0]))
    assert p[0] > 0.99 and abs(p[1] - 0.5) < 1e-9 and p[2] < 0.01


def test_only_unordered_categories_are_categories_for_the_objectives_model():
    # the paper's r and dropout are ordered numbers (a rank's neighbour is alike): ordered coordinates
    assert list(choice_mask(paper_space())) == [False, False, False, False]   # r index, dropout index, alpha, lr
    from orchestrator.search.space import modern_space
    space = modern_space()
    mask = dict(zip(space.nomad_order or [d.name for d in space.dims], choice_mask(space)))
    assert mask["target_modules"] and mask["use_dora"] and not mask["r"] and not mask["lr"]


def test_the_hill_valley_test_tells_two_basins_from_one():
    """The model's mean between a point and a converged one: a hill between them -> another basin."""
    from orchestrator.search.space import SearchSpace
    space = SearchSpace.from_dict({"lr": {"log": [1e-6, 1e-3], "default": 1e-5}})
    box = Box.from_space(space)   # NOMAD's coordinate: log10(lr) in [-6, -3]; unit u = (c + 6) / 3
    at = lambda u: np.array([-6.0 + 3.0 * u])  # noqa: E731
    us = np.linspace(0.0, 1.0, 21)
    two = [(f"k{i}", at(u), float(min((u - 0.15) ** 2, (u - 0.85) ** 2 + 0.01)), None) for i, u in enumerate(us)]
    one = [(f"k{i}", at(u), float((u - 0.15) ** 2), None) for i, u in enumerate(us)]
    away = lambda x: abs(box.scale(x)[0] - 0.15) > 0.2  # noqa: E731
    search = GlobalSearch(box, (), choice_mask(space))
    assert search.separated(two, at(0.85), [at(0.15)])
    assert box.scale(search.other_basin(two, [at(0.15)], away)[1])[0] == pytest.approx(0.85)
    search = GlobalSearch(box, (), choice_mask(space))
    assert not search.separated(one, at(0.6), [at(0.15)])
    assert search.other_basin(one, [at(0.15)], away) is None


def paper_results(points, values, constraints=None):
    space = paper_space()
    return [(space.key(p), np.array(space.to_nomad(p), float), v, None if constraints is None else constraints[i])
            for i, (p, v) in enumerate(zip(points, values))]


def test_global_point_is_unseen_and_held_back_follows_the_constraint_model():
    space = paper_space()
    rng = np.random.default_rng(2)
    points = [space.sample(rng) for _ in range(30)]
    cs = [(math.log2(p["r"]) - 6.5,) for p in points]   # feasible up to r = 64
    results = paper_results(points, [1.0 + 0.01 * math.log2(512 / p["r"]) for p in points], cs)
    search = GlobalSearch(Box.from_space(space), ("pb",), choice_mask(space))
    seen = {key for key, *_ in results}
    x = search.point(results, [], np.random.default_rng(0), lambda x: space.key(space.from_nomad(list(x))) not in seen)
    assert x is not None and space.key(space.from_nomad(list(x))) not in seen
    low, high = [1.0, 1.0, 32.0, -4.0], [8.0, 1.0, 32.0, -4.0]   # r = 4 and r = 512
    assert search.held_back(results, [np.array(low), np.array(high)]) == [False, True]


def test_mean_center_only_under_noise():
    space = paper_space()
    rng = np.random.default_rng(3)
    points = [space.sample(rng) for _ in range(30)]
    true = [abs(math.log10(p["lr"]) + 4) * 0.1 + 1.0 for p in points]
    search = GlobalSearch(Box.from_space(space), (), choice_mask(space))
    xs = [np.array(space.to_nomad(p), float) for p in points]
    assert search.mean_center(paper_results(points, true), xs) is None   # noise-free: no
    noisy = [t + 0.05 * rng.normal() for t in true]
    search = GlobalSearch(Box.from_space(space), (), choice_mask(space))
    index, mean = search.mean_center(paper_results(points, noisy), xs)
    assert true[index] <= sorted(true)[3] and abs(mean - true[index]) < 0.05


def lr_points(n=40, seed=0):
    """Points along lr (others at the default); the true loss is quadratic in log10 lr, best at 1e-4."""
    space = paper_space()
    logs = np.linspace(-6, -3, n)
    points = [{**space.default_point(), "lr": float(10 ** v)} for v in logs]
    return space, points, [0.9 + 0.02 * (v + 4) ** 2 for v in logs]


def test_model_mean_agrees_with_the_lowest_loss_without_noise():
    space, points, true = lr_points()
    assert rank_by_model_mean(points, true, space)[0] == int(np.argmin(true))


def test_model_mean_passes_over_a_lucky_draw():
    space, points, true = lr_points()
    noise = np.random.default_rng(4).normal(0.0, 0.01, len(true))
    lucky = 3   # far from the optimum, but one seed made it look best
    observed = [t + e for t, e in zip(true, noise)]
    observed[lucky] = min(observed) - 0.01
    order = rank_by_model_mean(points, observed, space)
    assert int(np.argmin(observed)) == lucky and order[0] != lucky
    assert true[order[0]] < true[lucky] - 0.05
    assert sorted(order) == list(range(len(points)))


def test_model_mean_puts_failed_and_infeasible_trials_last():
    space, points, true = lr_points(12)
    values = list(true)
    values[0] = None
    feasible = [True] * 12
    feasible[int(np.argmin(true))] = False
    order = rank_by_model_mean(points, values, space, feasible)
    assert order[-1] == 0 and order[-2] == int(np.argmin(true))
    assert rank_by_model_mean(points[:3], [1.0, 0.5, None], space) == [1, 0, 2]   # few trials: by value
    with pytest.raises(ValueError, match="one of each per trial"):
        rank_by_model_mean(points, values[:5], space)


def test_measured_table_answers_the_nearest_point(tmp_path):
    space = paper_space()
    a, b = space.default_point(), {"r": 512, "alpha": 64, "dropout": 0.0, "lr": 1e-3}
    rows = [{"index": 0, "seed": s, "val_loss": v} for s, v in enumerate((2.0, 2.2))]
    rows += [{"index": 1, "seed": 0, "val_loss": 1.0}, {"index": 1, "seed": 1, "val_loss": None}]
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"points": [a, b], "rows": rows, "cost": {"cpu_hours": 0.1}}))
    table = Table(path)
    near_a = {**a, "alpha": 30}
    assert table(near_a) == pytest.approx(2.1) and table(b) == 1.0 and table.optimum == 1.0
    draws = {table(near_a, np.random.default_rng(i)) for i in range(20)}
    assert draws == {2.0, 2.2}   # one measured seed at random
    with pytest.raises(FileNotFoundError, match="measure_landscape.py"):
        Table(tmp_path / "missing.json")


def test_the_shipped_measured_table_is_whole():
    table = measured_table()
    assert len(table.points) >= 41 and all(len(v) >= 1 for v in table.seeds)
    assert table.optimum == min(m for m in table.means if m is not None)
    assert table.cost["cpu_hours"] > 0
