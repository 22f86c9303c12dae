"""HPO efficiency on a synthetic landscape: best value found vs evaluations, per searcher.

Runs our searchers (nomad with its default profile for ``--parallel``, i.e. ``paper`` at 1;
``nomad-async``: profile ``async``; tpe, random, default) and Optuna's TPESampler (the outside peer,
driven through its ask/tell API, default settings) on ``orchestrator.search.landscapes.paper_landscape`` with
Gaussian evaluation noise, over several seeds and budgets. With ``--parallel K`` up to K
evaluations are pending at once and results come back oldest first.

"Best found" is the noise-free loss of the incumbent, i.e. of the point with the best *observed*
(noisy) value: what a user would pick. The last column counts the evaluations until that incumbent
is within 1% of the landscape's optimum (median over the seeds that got there, in the largest budget).

    python bench/hpo_efficiency.py --seeds 5 --budgets 25 50 100 --parallel 1
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from orchestrator.search.landscapes import OPTIMUM, paper_landscape  # noqa: E402
from orchestrator.search.searchers import make_searcher  # noqa: E402
from orchestrator.search.space import Category, Choice, Int, Log, SearchSpace, paper_space  # noqa: E402

ALGOS = ("nomad", "nomad-async", "tpe", "optuna-tpe", "random", "default")


def suggest(trial, space: SearchSpace, ordered: bool = False) -> dict:
    """An Optuna trial's point of ``space`` (the benches' Optuna anchors): categories by their labels (Optuna takes
    scalars; category.py), choices as categoricals (``ordered``: as indices, so that the sampler sees their
    order), integers and log-uniform reals as such."""
    point = {}
    for dim in space.dims:
        if isinstance(dim, Category):
            point[dim.name] = dim.canonical_label(trial.suggest_categorical(dim.name, list(dim.labels)))
        elif isinstance(dim, Choice) and ordered:
            point[dim.name] = dim.values[trial.suggest_int(dim.name, 0, len(dim.values) - 1)]
        elif isinstance(dim, Choice):
            point[dim.name] = trial.suggest_categorical(dim.name, list(dim.values))
        elif isinstance(dim, Int):
            point[dim.name] = trial.suggest_int(dim.name, dim.low, dim.high)
        elif isinstance(dim, Log):
            point[dim.name] = trial.suggest_float(dim.name, dim.low, dim.high, log=True)
    return point


class OptunaTpe:
    """Optuna's TPESampler behind the same ask/tell shape as our searchers (bench only)."""

    def __init__(self, space: SearchSpace, seed: int):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        self.trials = {}
        self.finished = False

    def ask_point(self):
        trial = self.study.ask()
        point = suggest(trial, self.space)
        self.trials[trial.number] = trial
        return trial.number, point

    def tell(self, trial_id: int, value: float | None) -> None:
        self.study.tell(self.trials.pop(trial_id), value)

    def close(self) -> None:
        pass


def _searcher(algo: str, space: SearchSpace, budget: int, parallel: int, seed: int):
    if algo == "optuna-tpe":
        return OptunaTpe(space, seed)
    if algo == "nomad-async":
        return make_searcher("nomad", space, budget=budget, parallel=parallel, seed=seed,
                             options={"profile": "async"})
    return make_searcher(algo, space, budget=budget, parallel=parallel, seed=seed, options={})


def _ask(searcher):
    if not hasattr(searcher, "ask_point"):   # ours: a Suggestion, or None when it has nothing more to propose
        suggestion = searcher.ask()
        return None if suggestion is None else (suggestion.trial_id, suggestion.point)
    return searcher.ask_point()


def incumbent_curve(searcher, landscape, budget: int, parallel: int, noise_rng, noise: float) -> list[float]:
    """Noise-free loss of the incumbent (the best *observed* point) after each evaluation, padded to ``budget``:
    ``parallel`` suggestions in flight, the oldest told first."""
    pending, curve = [], []
    best_seen, best_true = float("inf"), float("inf")
    try:
        while len(curve) < budget:
            while len(pending) < parallel and len(curve) + len(pending) < budget:
                asked = _ask(searcher)
                if asked is None:
                    break
                pending.append(asked)
            if not pending:
                break   # the searcher has nothing more to propose
            trial_id, point = pending.pop(0)
            true = landscape(point)
            seen = true + float(noise_rng.normal(0.0, noise))
            searcher.tell(trial_id, seen)
            if seen < best_seen:
                best_seen, best_true = seen, true
            curve.append(best_true)
    finally:
        searcher.close()
    return curve + [best_true] * (budget - len(curve))


def run(algo: str, budget: int, parallel: int, seed: int, noise: float) -> list[float]:
    """Noise-free loss of the incumbent after each evaluation (padded to ``budget``)."""
    space = paper_space()
    return incumbent_curve(_searcher(algo, space, budget, parallel, seed), paper_landscape, budget, parallel,
                           np.random.default_rng([seed, 2312_00949]), noise)


def _evals_to_target(curve: list[float], target: float) -> int | None:
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--parallel", type=int, default=1, help="evaluations pending at once")
    parser.add_argument("--noise", type=float, default=0.005, help="sd of the evaluation noise")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    budgets = sorted(args.budgets)
    target = OPTIMUM * 1.01

    print(f"paper_landscape, optimum {OPTIMUM}, noise sd {args.noise}, parallel {args.parallel}, "
          f"seeds 0..{args.seeds - 1}; best found = true loss of the incumbent, mean +- sd")
    header = f"{'algo':<12}" + "".join(f"{'budget ' + str(b):>18}" for b in budgets)
    print(header + f"{'evals to 1% (hits)':>22}{'time s':>9}")
    for algo in args.algos:
        start = time.perf_counter()
        row, last = [], []
        for budget in budgets:
            finals = []
            for seed in range(args.seeds):
                curve = run(algo, budget, args.parallel, seed, args.noise)
                finals.append(curve[-1])
                if budget == budgets[-1]:
                    last.append(curve)
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            row.append(f"{statistics.mean(finals):.4f} +- {sd:.4f}")
        hits = [n for n in (_evals_to_target(c, target) for c in last) if n is not None]
        reach = f"{statistics.median(hits):.0f}" if hits else f">{budgets[-1]}"
        reach += f" ({len(hits)}/{len(last)})"
        print(f"{algo:<12}" + "".join(f"{cell:>18}" for cell in row)
              + f"{reach:>22}{time.perf_counter() - start:>9.1f}")


if __name__ == "__main__":
    main()
