"""Pruning decisions (orchestrator.search.pruners) on hand-made curves, their config, and the same decisions as
Optuna's MedianPruner / SuccessiveHalvingPruner on random curves fed in time order.

    .venv/bin/python -m pytest -q tests/test_pruners.py
"""
import copy
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.search.pruners import (AshaPruner, Decision, MedianPruner, PrunerError, config, describe, make_pruner,
                                  told_value)

N = 8  # reports at 1/8, 2/8, ..., 1


def line(final: float, upto: int = N, drop: float = 0.4) -> list:
    """A curve falling linearly to `final`, reported up to upto/N of training (N/N: completed)."""
    return [(i / N, final + drop * (1 - i / N)) for i in range(1, upto + 1)]


def flat(value: float, upto: int) -> list:
    return [(i / N, value) for i in range(1, upto + 1)]


COMPLETED = {t: line(f) for t, f in enumerate([0.95, 0.97, 1.00, 1.02, 1.05])}  # at 2/8: 1.25 ... 1.35, median 1.30


@pytest.mark.unit
# ------------------------------------------------------------------------------------------------ median
def test_median_prunes_an_obviously_bad_curve_and_not_the_best():
    pruner = make_pruner({"kind": "median", "n_startup_trials": 5, "warmup": 0.25})
    curves = {**COMPLETED, 10: flat(1.55, 2), 11: line(0.90, 2)}  # lr 1e-6 (flat, untrained) / the best one
    decision = pruner.decide(10, curves)
    assert isinstance(decision, Decision)
    assert (decision.trial, decision.fraction, decision.value, decision.threshold, decision.n_compared) == \
        (10, 0.25, 1.55, pytest.approx(1.30), 5)
    assert decision.pruner == "median" and "median" in decision.reason
    assert pruner.decide(11, curves) is None
    assert pruner.decide(3, curves) is None  # completed trials are never pruned


@pytest.mark.unit
def test_median_waits_for_startup_trials_and_warmup_and_keeps_its_interval():
    bad = {10: flat(1.55, 2)}
    four = {t: c for t, c in COMPLETED.items() if t < 4}
    assert make_pruner({"kind": "median", "n_startup_trials": 5}).decide(10, {**four, **bad}) is None
    assert make_pruner({"kind": "median", "n_startup_trials": 4}).decide(10, {**four, **bad}) is not None
    running = {t: line(0.9, 6) for t in range(20, 30)}  # running trials are not "completed": no startup credit
    assert make_pruner({"kind": "median", "n_startup_trials": 5}).decide(10, {**four, **running, **bad}) is None
    warm = make_pruner({"kind": "median", "warmup": 0.375})
    assert warm.decide(10, {**COMPLETED, **bad}) is None  # 0.25 < warmup
    assert warm.decide(10, {**COMPLETED, 10: flat(1.55, 3)}).fraction == 0.375
    every_quarter = make_pruner({"kind": "median", "warmup": 0.25, "interval": 0.25})  # checks at 2/8, 4/8, 6/8
    assert every_quarter.decide(10, {**COMPLETED, 10: flat(1.55, 3)}) is None  # 3/8: not a check
    assert every_quarter.decide(10, {**COMPLETED, 10: flat(1.55, 4)}).fraction == 0.5
    # a check whose record was missing happens at the next record (Optuna's rule)
    gap = [(0.125, 1.55), (0.375, 1.55), (0.625, 1.55)]
    assert every_quarter.decide(10, {**COMPLETED, 10: gap}).fraction == 0.625


@pytest.mark.unit
def test_median_compares_the_best_value_so_far_and_prunes_a_diverged_curve():
    pruner = MedianPruner(n_startup_trials=1)
    early_good = [(0.125, 1.0), (0.25, 1.4)]  # 1.4 at 2/8 is worse than the median, but 1.0 earlier was not
    assert pruner.decide(10, {**COMPLETED, 10: early_good}) is None
    diverged = pruner.decide(10, {**COMPLETED, 10: [(0.125, math.nan), (0.25, math.nan)]})
    assert diverged is not None and "diverged" in diverged.reason


@pytest.mark.unit
# -------------------------------------------------------------------------------------------------- asha
def test_asha_rungs_come_from_min_fraction_and_reduction_factor():
    assert make_pruner({"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3}).rungs == (0.125, 0.375)
    assert make_pruner({"kind": "asha", "min_fraction": 0.125, "reduction_factor": 2}).rungs == (0.125, 0.25, 0.5)
    assert make_pruner({"kind": "asha", "min_fraction": 0.125, "reduction_factor": 2,
                        "min_early_stopping_rate": 1}).rungs == (0.25, 0.5)
    assert make_pruner({"kind": "asha", "rungs": [0.2, 0.6]}).rungs == (0.2, 0.6)


@pytest.mark.unit
def test_asha_keeps_the_top_third_at_each_rung_asynchronously():
    pruner = AshaPruner(min_fraction=0.125, reduction_factor=3)
    curves = {0: [(0.125, 1.20)]}
    assert pruner.decide(0, curves) is None  # alone at the rung: the best so far there
    curves[1] = [(0.125, 1.30)]
    decision = pruner.decide(1, curves)  # 2 at the rung keep max(1, 2 // 3) = 1: the better one
    assert (decision.rung, decision.fraction, decision.threshold, decision.n_compared) == (0, 0.125, 1.20, 2)
    curves[2] = [(0.125, 1.10)]
    assert pruner.decide(2, curves) is None  # the new best
    for t, v in ((3, 1.40), (4, 1.50)):
        curves[t] = [(0.125, v)]
    curves[5] = [(0.125, 1.15)]
    assert pruner.decide(5, curves) is None  # 6 at the rung keep 2: 1.10 and 1.15
    curves[6] = [(0.125, 1.16)]
    assert pruner.decide(6, curves).threshold == 1.15  # 7 keep 2: the third best stops
    # between rungs nothing is judged, even a worse value; at rung 1 (3/8) the survivors compete again
    curves[0] += [(0.25, 1.9)]
    assert pruner.decide(0, curves) is None
    curves[2] += [(0.25, 1.0), (0.375, 0.95)]
    assert pruner.decide(2, curves) is None
    curves[0] += [(0.375, 1.05)]
    assert pruner.decide(0, curves).rung == 1  # 2 at rung 1, keep 1: trial 2 (0.95)
    # a record that jumps over both rungs is judged at both, in order
    jumper = {**curves, 9: [(0.5, 1.5)]}
    assert pruner.decide(9, jumper).rung == 0


@pytest.mark.unit
def test_a_margin_keeps_trials_close_to_the_threshold():
    curves = {**COMPLETED, 10: flat(1.33, 2), 11: flat(1.55, 2)}  # median at 2/8: 1.30
    assert MedianPruner().decide(10, curves) is not None
    with_margin = MedianPruner(margin=0.05)
    assert with_margin.decide(10, curves) is None and "margin 0.05" in with_margin.decide(11, curves).reason
    rung = {0: [(0.125, 1.20)], 1: [(0.125, 1.21)], 2: [(0.125, 1.6)]}
    assert AshaPruner(min_fraction=0.125).decide(1, rung) is not None
    assert AshaPruner(min_fraction=0.125, margin=0.02).decide(1, rung) is None
    assert AshaPruner(min_fraction=0.125, margin=0.02).decide(2, rung).threshold == 1.20


@pytest.mark.unit
def test_asha_min_trials_lets_early_trials_continue():
    pruner = make_pruner({"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3, "min_trials": 3})
    curves = {0: [(0.125, 1.2)], 1: [(0.125, 1.3)]}
    assert pruner.decide(1, curves) is None  # 2 < 3 at the rung: no judgement yet
    curves[2] = [(0.125, 1.4)]
    assert pruner.decide(2, curves) is not None  # 3 at the rung, keep 1
    assert pruner.decide(9, {9: [(0.125, math.nan)]}).reason.endswith("(diverged)")


@pytest.mark.unit
# ----------------------------------------------------------------------------------- purity and config
def test_decisions_are_pure_and_deterministic():
    rng = random.Random(3)
    levels = [1 + rng.random() for _ in range(30)]  # each trial its own level, plus noise along the curve
    lengths = [N] * 8 + [rng.randint(1, N - 1) for _ in range(22)]  # 8 completed, 22 running
    curves = {t: [(i / N, levels[t] + 0.05 * rng.random()) for i in range(1, lengths[t] + 1)] for t in range(30)}
    frozen = copy.deepcopy(curves)
    reordered = dict(reversed(list(curves.items())))
    for pruner in (MedianPruner(n_startup_trials=2), AshaPruner(min_fraction=0.125)):
        first = [pruner.decide(t, curves) for t in curves]
        assert first == [pruner.decide(t, curves) for t in curves] == [pruner.decide(t, reordered) for t in curves]
        assert any(first) and not all(first)
        assert curves == frozen  # nothing was changed
    assert MedianPruner().decide(5, {}) is None and AshaPruner(min_fraction=0.1).decide(5, {5: []}) is None


@pytest.mark.unit
@pytest.mark.parametrize("bad, message", [
    ({"kind": "hyperband"}, "unknown; valid: median, asha"),
    ({"warmup": 0.2}, "needs a kind"),
    ("median", "must be a mapping"),
    ({"kind": "median", "warmpu": 0.2}, r"\['warmpu'\] unknown for kind median; valid: n_startup_trials"),
    ({"kind": "median", "warmup": 1.0}, "warmup=1.0 is at or beyond the end of training"),
    ({"kind": "median", "warmup": -0.1}, "must be >= 0"),
    ({"kind": "median", "n_startup_trials": 2.5}, "must be an integer >= 0"),
    ({"kind": "median", "interval": 0}, "interval=0 must be > 0"),
    ({"kind": "asha", "min_fraction": 1.5}, "min_fraction=1.5 is at or beyond the end of training"),
    ({"kind": "asha", "rungs": [0.2, 1.25]}, r"rungs\[1\]=1.25 is at or beyond the end of training"),
    ({"kind": "asha", "rungs": [0.4, 0.2]}, "must increase strictly"),
    ({"kind": "asha", "min_fraction": 0.4, "min_early_stopping_rate": 1}, "first rung.*1.2.*beyond the end"),
    ({"kind": "asha", "min_fraction": 0.1, "reduction_factor": 1}, "reduction_factor=1 must be an integer >= 2"),
    ({"kind": "asha", "min_fraction": 0.1, "reduction_factor": True}, "reduction_factor=True must be an integer"),
    ({"kind": "asha"}, "needs either min_fraction"),
    ({"kind": "asha", "min_fraction": 0.1, "rungs": [0.2]}, "not both"),
    ({"kind": "none", "warmup": 0.1}, "takes no options"),
    ({"kind": "median", "margin": -0.01}, "margin=-0.01 must be a number >= 0"),
])
def test_bad_configs_are_one_line_errors(bad, message):
    with pytest.raises(PrunerError, match=message) as error:
        make_pruner(bad)
    assert "\n" not in str(error.value)


@pytest.mark.unit
def test_configs_round_trip_and_off():
    assert make_pruner(None) is None and make_pruner({"kind": "none"}) is None
    for cfg in ({"kind": "median", "n_startup_trials": 3, "warmup": 0.25, "interval": 0.25},
                {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 4, "margin": 0.02},
                {"kind": "asha", "rungs": [0.1, 0.3]}):
        pruner = make_pruner(cfg)
        assert config(pruner) == cfg and make_pruner(config(pruner)) == pruner
    assert describe(make_pruner({"kind": "asha", "min_fraction": 0.125})) == "asha(min_fraction=0.125)"
    assert describe(None) == "none"


@pytest.mark.unit
def test_reports_must_reach_every_rung_before_the_end():
    reports = [0.25, 0.5, 0.75, 1.0]
    make_pruner({"kind": "asha", "min_fraction": 0.25, "reduction_factor": 3}).check_reports(reports)
    with pytest.raises(PrunerError, match="rung 1 at 0.8 of training has no intermediate report"):
        make_pruner({"kind": "asha", "rungs": [0.25, 0.8]}).check_reports(reports)
    with pytest.raises(PrunerError, match="warmup=0.8 leaves no intermediate report"):
        make_pruner({"kind": "median", "warmup": 0.8}).check_reports(reports)


@pytest.mark.unit
def test_what_the_searcher_is_told():
    d = Decision(4, "asha", 0, 0.125, 1.4, 1.4, 1.2, 3, "why")
    assert told_value("tpe", d) == 1.4 and told_value("random", d) == 1.4
    assert told_value("nomad", d) is None  # extreme barrier
    assert told_value("nomad", d, is_start=True) == 1.4  # NOMAD stops for good when X0 fails
    assert told_value("nomad", d, policy="last") == 1.4 and told_value("tpe", d, policy="fail") is None
    assert told_value("tpe", Decision(4, "asha", 0, 0.125, math.nan, math.nan, 1.2, 3, "why")) is None
    with pytest.raises(ValueError, match="valid: last, fail"):
        told_value("tpe", d, policy="median")


def test_the_pruners_import_nothing_heavy():
    """The orchestrator (login node) decides; its pruners must not pull torch, numpy or optuna in."""
    script = ("import sys, orchestrator.search.pruners\n"
              "print([m for m in ('torch', 'transformers', 'numpy', 'optuna', 'mlflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --------------------------------------------------------------------------------- against Optuna's own
def _events(rng: random.Random, n_trials: int) -> list:
    """Reports of n_trials random curves, interleaved in time; some curves contain a NaN."""
    events = []
    for t in range(n_trials):
        start, speed, final = rng.uniform(0, 40), rng.uniform(0.5, 2), rng.uniform(0.9, 1.4)
        nan_at = rng.randint(1, 3 * N) if rng.random() < 0.1 else None
        for i in range(1, N + 1):
            value = math.nan if i == nan_at else final + (1.6 - final) * math.exp(-3 * i / N) + rng.gauss(0, 0.02)
            events.append((start + i * speed, t, i, value))
    return sorted(events)


@pytest.mark.unit
@pytest.mark.parametrize("cfg", [{"kind": "median", "n_startup_trials": 3, "warmup": 0.25},
                                 {"kind": "median", "n_startup_trials": 0, "warmup": 0.25, "interval": 0.25},
                                 {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3},
                                 {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 2}])
def test_same_decisions_as_optuna(cfg):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if cfg["kind"] == "median":
        theirs = optuna.pruners.MedianPruner(n_startup_trials=cfg["n_startup_trials"],
                                             n_warmup_steps=round(cfg["warmup"] * N),
                                             interval_steps=round(cfg.get("interval", 1 / N) * N))
    else:
        theirs = optuna.pruners.SuccessiveHalvingPruner(min_resource=round(cfg["min_fraction"] * N),
                                                        reduction_factor=cfg["reduction_factor"])
    ours = make_pruner(cfg)
    rng = random.Random(12)
    for _ in range(3):
        study = optuna.create_study(direction="minimize", pruner=theirs)
        curves, trials, stopped, pruned = {}, {}, set(), 0
        for _, t, i, value in _events(rng, 40):
            if t in stopped:
                continue
            curves.setdefault(t, []).append((i / N, value))
            trial = trials.setdefault(t, study.ask())
            trial.report(value, i)
            if i == N:
                study.tell(trial, value if not math.isnan(value) else None,
                           state=None if not math.isnan(value) else optuna.trial.TrialState.FAIL)
                assert ours.decide(t, curves) is None
                continue
            decision = ours.decide(t, curves)
            assert (decision is not None) == trial.should_prune(), (t, i, curves[t], decision)
            if decision is not None:
                stopped.add(t)
                pruned += 1
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        assert 0 < pruned < 40
