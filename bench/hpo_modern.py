"""HPO efficiency on the modern space: best value found vs evaluations, our searchers against Optuna's TPE and GP.

The space is ``modern_space()`` (11 dimensions: r, alpha_ratio, dropout, lr, target_modules, use_rslora,
use_dora, epochs, warmup_ratio, weight_decay, effective_batch; three of them categorical or boolean) and the
objective ``orchestrator.search.landscapes.modern_landscape`` (categorical effects and interactions: rsLoRA x
rank x lr, all-linear x lr, DoRA x rank, epochs x dropout x weight decay, warm-up x lr, batch x lr), with
Gaussian evaluation noise. Our searchers run as a study runs them (``make_searcher``: NOMAD encodes the
categories as integer indices, NNI's TPE and random natively); Optuna's ``TPESampler`` and ``GPSampler`` (the
outside peers, default settings, driven through Optuna's ask/tell API) see the categories as categorical.

"Best found" is the noise-free loss of the incumbent (the point with the best *observed* value: what a user
would pick), mean +- sd over the seeds. "evals to 1%": evaluations until that incumbent is within 1% of the
landscape's optimum (median over the seeds that got there, in the largest budget). The last table says, per
budget, whether each of our searchers' mean is at least as good as each Optuna sampler's (met) or not.

    python bench/hpo_modern.py --seeds 5 --budgets 25 50 100
    python bench/hpo_modern.py --seeds 2 --budgets 25 --algos nomad tpe optuna-tpe     # a quick look
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from hpo_efficiency import incumbent_curve, suggest  # noqa: E402  (the same loop as the paper space's bench)
from orchestrator.search.landscapes import modern_landscape, modern_optimum  # noqa: E402
from orchestrator.search.searchers import make_searcher  # noqa: E402
from orchestrator.search.space import SearchSpace, modern_space  # noqa: E402

OURS = ("nomad", "nomad-async", "tpe", "random", "default")
PEERS = ("optuna-tpe", "optuna-gp")
# NOMAD plans with its budget (MAX_BB_EVAL; the async start's length): one run per budget. The others never see
# it, so their runs at a smaller budget are the first evaluations of the largest one: one run serves all budgets.
BUDGET_AWARE = ("nomad", "nomad-async")


class OptunaPeer:
    """An Optuna sampler behind the same ask/tell shape as our searchers (bench only)."""

    def __init__(self, space: SearchSpace, seed: int, kind: str):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed) if kind == "optuna-tpe" else \
            optuna.samplers.GPSampler(seed=seed)
        self.space, self.trials = space, {}
        self.study = optuna.create_study(sampler=sampler)

    def ask_point(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GPSampler is "experimental" in Optuna's words
            trial = self.study.ask()
            point = suggest(trial, self.space)
        self.trials[trial.number] = trial
        return trial.number, point

    def tell(self, trial_id: int, value: float) -> None:
        self.study.tell(self.trials.pop(trial_id), value)

    def close(self) -> None:
        pass


def _searcher(algo: str, space: SearchSpace, budget: int, parallel: int, seed: int):
    if algo in PEERS:
        return OptunaPeer(space, seed, algo)
    options = {"profile": "async"} if algo == "nomad-async" else {}
    return make_searcher(algo.removesuffix("-async"), space, budget=budget, parallel=parallel, seed=seed,
                         options=options)


def run(algo: str, budget: int, parallel: int, seed: int, noise: float) -> list[float]:
    """Noise-free loss of the incumbent after each evaluation (padded to ``budget``)."""
    space = modern_space()
    return incumbent_curve(_searcher(algo, space, budget, parallel, seed), modern_landscape, budget, parallel,
                           np.random.default_rng([seed, 22]), noise)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--parallel", type=int, default=1, help="evaluations pending at once")
    parser.add_argument("--noise", type=float, default=0.005, help="sd of the evaluation noise")
    parser.add_argument("--algos", nargs="+", default=list(OURS + PEERS), choices=OURS + PEERS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    budgets = sorted(args.budgets)
    optimum, where = modern_optimum()
    target = optimum * 1.01
    print(f"modern_landscape, optimum {optimum:.4f} at {where}")
    print(f"default point {modern_landscape(modern_space().default_point()):.4f}; noise sd {args.noise}, "
          f"parallel {args.parallel}, seeds 0..{args.seeds - 1}; best found = true loss of the incumbent, mean +- sd")
    print(f"{'algo':<12}" + "".join(f"{'budget ' + str(b):>18}" for b in budgets) + f"{'evals to 1% (hits)':>22}"
          f"{'time s':>9}")
    means = {}
    for algo in args.algos:
        start, row, last = time.perf_counter(), [], []
        shared = {} if algo in BUDGET_AWARE else \
            {seed: run(algo, budgets[-1], args.parallel, seed, args.noise) for seed in range(args.seeds)}
        for budget in budgets:
            finals = []
            for seed in range(args.seeds):
                curve = shared[seed][:budget] if shared else run(algo, budget, args.parallel, seed, args.noise)
                finals.append(curve[-1])
                if budget == budgets[-1]:
                    last.append(curve)
            means[algo, budget] = statistics.mean(finals)
            sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
            row.append(f"{statistics.mean(finals):.4f} +- {sd:.4f}")
        hits = [next((i + 1 for i, v in enumerate(c) if v <= target), None) for c in last]
        hits = [n for n in hits if n is not None]
        reach = (f"{statistics.median(hits):.0f}" if hits else f">{budgets[-1]}") + f" ({len(hits)}/{len(last)})"
        print(f"{algo:<12}" + "".join(f"{cell:>18}" for cell in row) + f"{reach:>22}"
              f"{time.perf_counter() - start:>9.1f}", flush=True)
    peers = [p for p in PEERS if p in args.algos]
    if peers:
        print("\nours vs Optuna (mean best found; met = ours <= the peer's)")
        for algo in (a for a in args.algos if a in OURS and a != "default"):
            cells = [f"{'met' if means[algo, b] <= means[p, b] else 'not met'} vs {p} at {b} "
                     f"({means[algo, b] - means[p, b]:+.4f})" for p in peers for b in budgets]
            print(f"{algo:<12}" + "; ".join(cells))


if __name__ == "__main__":
    main()
