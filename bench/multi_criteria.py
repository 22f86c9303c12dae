"""Constraints and two objectives: our searchers against Optuna's, on landscapes with known answers.

    python bench/multi_criteria.py                     # 10 seeds, budget 100 (a few minutes)
    python bench/multi_criteria.py --seeds 2 --parts constrained

The landscape is the paper's (``orchestrator.search.landscapes.paper_landscape``: loss falls with rank and
alpha, a diagonal valley in lr, dropout 1 untrained; noise-free), with a LoRA fine-tune's costs that
grow with the rank, dropout adding a little (it keeps a mask per activation):

    peak_memory_gb = 14 + 14 r / 128 + 3 [dropout > 0]          train_hours = 0.5 + 0.5 r / 128 + 0.15 [dropout > 0]

(``--dropout-gb 0``: the 3 GB of dropout dropped, a sensitivity check of the constrained part.)

- constrained: minimize val_loss s.t. peak_memory_gb <= 30 (pb) and train_hours <= 1.2 (eb). Ranks 256
  and 512 are out (eb), rank 128 only without dropout (pb): the feasible optimum is r = 128, alpha
  64, dropout 0, lr at the bottom of the valley (loss 0.95429; the unconstrained one, 0.92, is
  infeasible), and rank 128 with any dropout is a near-optimal infeasible trap. Per searcher: the best
  *feasible* loss after 25/50/100 evaluations and the infeasible evaluations spent in 100 (median
  [min-max] over seeds). Anchors: Optuna's TPESampler with constraint values (``Trial.set_constraint``,
  Optuna 5's form of ``constraints_func``, which it deprecates; same sampler code path) and random.
  ``tpe`` is NNI's TPE telling an infeasible trial as a penalty (its default), ``tpe-fail`` as a failure.
- bi-objective: minimize (val_loss, train_hours), no constraint. The Pareto front is one point per rank
  (dropout 0, alpha 64, the valley's lr): 8 points, hypervolume HV* against the reference point
  ``REFERENCE`` = (1.10, 2.60) (``orchestrator.search.criteria.hypervolume``). Per searcher: HV of the
  evaluated points after 50/100, as a fraction of HV*. ``nomad`` is NOMAD's DMultiMADS (profile
  paper), ``nomad-2n`` the same with DIRECTION_TYPE ORTHO 2N; ``tpe`` is our two-objective tpe
  (Optuna's multivariate TPESampler); anchors: Optuna's NSGA-II (population 20) and MOTPE (TPESampler
  defaults), and random. ``nomad`` runs our DMultiMADS defaults (ORTHO N+1 NEG, middle-point search);
  ``nomad-nomid`` without the middle-point search (NOMAD's own default), ``nomad-2n`` with ORTHO 2N.

Every searcher runs one evaluation at a time (parallel 1), the budget's results told in order; the
figures after 25 and 50 evaluations are read from the 100-evaluation run (the searchers' paths do not
depend on the budget). Targets (printed MET / NOT MET): NOMAD's median best feasible at 50 no worse
than Optuna's median; NOMAD spends fewer infeasible evaluations than random (medians); NOMAD's median
hypervolume within 2% of the best anchor's (NSGA-II, MOTPE) at 50 and at 100.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from orchestrator.search.criteria import hypervolume, pareto_front  # noqa: E402
from orchestrator.search.landscapes import paper_landscape  # noqa: E402
from orchestrator.search.searchers import make_searcher  # noqa: E402
from orchestrator.search.searchers.optuna_tpe import optuna_distributions  # noqa: E402
from orchestrator.search.space import paper_space  # noqa: E402

MEMORY_MAX, HOURS_MAX = 30.0, 1.2
REFERENCE = (1.10, 2.60)
RANKS = (4, 8, 16, 32, 64, 128, 256, 512)
CONSTRAINED = ("nomad-paper", "nomad-async", "optuna-tpe", "tpe", "tpe-fail", "random")
BI_OBJECTIVE = ("nomad", "nomad-nomid", "nomad-2n", "tpe", "optuna-nsga2", "optuna-motpe", "random")
DROPOUT_GB = 3.0    # memory a dropout mask adds (--dropout-gb): 0 removes the pb region next to the optimum


# ------------------------------------------------------------------------------------------- landscape
def peak_memory_gb(p: dict, dropout_gb: float = DROPOUT_GB) -> float:
    return 14.0 + 14.0 * p["r"] / 128 + dropout_gb * (p["dropout"] > 0)


def train_hours(p: dict) -> float:
    return 0.5 + 0.5 * p["r"] / 128 + 0.15 * (p["dropout"] > 0)


def constraint_values(p: dict, dropout_gb: float = DROPOUT_GB) -> list[float]:
    """NOMAD's convention, c <= 0 satisfied, in the order (pb memory, eb hours)."""
    return [peak_memory_gb(p, dropout_gb) - MEMORY_MAX, train_hours(p) - HOURS_MAX]


def best_at(r: int, dropout: float = 0.0, alpha: int = 64) -> dict:
    """The lowest loss at (r, dropout, alpha): lr at the bottom of the valley (the loss is quadratic in
    log10 lr there), clipped to the space."""
    log_lr = math.log10(5e-4) - 0.5 * math.log10(alpha / 64) + 0.25 * math.log10(r / 512)
    return {"r": r, "alpha": alpha, "dropout": dropout, "lr": 10 ** min(-3.0, max(-6.0, log_lr))}


def feasible_optimum(dropout_gb: float = DROPOUT_GB) -> tuple[float, dict]:
    """The best feasible loss, by enumeration (alpha 64 is best at every rank; lr from best_at)."""
    space = paper_space()
    candidates = [best_at(r, d, a) for r in RANKS for d in space.dims[2].values for a in (1, 32, 64)]
    ok = [p for p in candidates if all(c <= 0 for c in constraint_values(p, dropout_gb))]
    best = min(ok, key=paper_landscape)
    return paper_landscape(best), best


def true_front() -> dict:
    return pareto_front({r: (paper_landscape(best_at(r)), train_hours(best_at(r))) for r in RANKS})


# ------------------------------------------------------------------------------------------- Optuna anchors
class OptunaAnchor:
    """An Optuna sampler behind our ask/tell shape (bench only): constraints through set_constraint."""

    def __init__(self, sampler, n_objectives: int):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dists = optuna_distributions(paper_space())
        self.study = optuna.create_study(directions=["minimize"] * n_objectives, sampler=sampler)
        self.trials: dict = {}

    def ask(self):
        trial = self.study.ask(self.dists)
        self.trials[trial.number] = trial
        return trial.number, dict(trial.params)

    def tell(self, trial_id: int, value, constraints=None) -> None:
        trial = self.trials.pop(trial_id)
        for j, c in enumerate(constraints or ()):
            trial.set_constraint(str(j), c)
        self.study.tell(trial, value if not isinstance(value, tuple) else list(value))

    def close(self) -> None:
        pass


class Ours:
    """make_searcher's searcher with the anchors' (trial id, point) ask."""

    def __init__(self, searcher):
        self.searcher = searcher

    def ask(self):
        s = self.searcher.ask()
        return None if s is None else (s.trial_id, s.point)

    def tell(self, trial_id, value, constraints=None):
        self.searcher.tell(trial_id, value, constraints=constraints)

    def close(self):
        self.searcher.close()


def build(algo: str, seed: int, budget: int, n_objectives: int, kinds: tuple):
    import optuna
    warnings.simplefilter("ignore")   # Optuna's experimental / deprecation notes
    if algo == "optuna-tpe":
        return OptunaAnchor(optuna.samplers.TPESampler(seed=seed), 1)
    if algo == "optuna-nsga2":
        return OptunaAnchor(optuna.samplers.NSGAIISampler(seed=seed, population_size=20), 2)
    if algo == "optuna-motpe":
        return OptunaAnchor(optuna.samplers.TPESampler(seed=seed), 2)
    name, options = {"nomad-paper": ("nomad", {"profile": "paper"}), "nomad-async": ("nomad", {"profile": "async"}),
                     "nomad-2n": ("nomad", {"DIRECTION_TYPE": "ORTHO 2N"}),
                     "nomad-nomid": ("nomad", {"DMULTIMADS_MIDDLEPOINT_SEARCH": False}),
                     "tpe-fail": ("tpe", {"infeasible": "failure"})}.get(algo, (algo, {}))
    return Ours(make_searcher(name, paper_space(), budget=budget, parallel=1, seed=seed, options=options,
                              n_objectives=n_objectives, constraints=kinds))


def drive(searcher, budget: int, evaluate) -> list:
    """One evaluation at a time; the (point, value, constraints) in evaluation order."""
    out = []
    try:
        while len(out) < budget:
            asked = searcher.ask()
            if asked is None:
                break
            trial_id, point = asked
            value, constraints = evaluate(point)
            searcher.tell(trial_id, value, constraints)
            out.append((point, value, constraints))
    finally:
        searcher.close()
    return out


# ------------------------------------------------------------------------------------------- the two parts
def constrained_run(algo: str, seed: int, budget: int, marks: list[int], dropout_gb: float) -> dict:
    kinds = ("pb", "eb")
    runs = drive(build(algo, seed, budget, 1, kinds), budget,
                 lambda p: (paper_landscape(p), constraint_values(p, dropout_gb)))
    best, curve = math.inf, []
    for _, value, cs in runs:
        if all(c <= 0 for c in cs):
            best = min(best, value)
        curve.append(best)
    curve += [best] * (budget - len(curve))
    infeasible = sum(1 for _, _, cs in runs if any(c > 0 for c in cs))
    return {"best": [curve[m - 1] for m in marks], "infeasible": infeasible, "n": len(runs)}


def biobjective_run(algo: str, seed: int, budget: int, marks: list[int]) -> dict:
    runs = drive(build(algo, seed, budget, 2, ()), budget,
                 lambda p: ((paper_landscape(p), train_hours(p)), None))
    hv = []
    for m in marks:
        front = pareto_front({k: v for k, (_, v, _) in enumerate(runs[:m])})
        hv.append(hypervolume(front, REFERENCE))
    return {"hv": hv, "n": len(runs)}


def summary(xs: list[float], fmt: str = "{:.4f}") -> str:
    return f"{fmt.format(statistics.median(xs))} [{fmt.format(min(xs))}-{fmt.format(max(xs))}]"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def constrained_part(algos, seeds: int, budget: int, dropout_gb: float) -> None:
    marks = [m for m in (25, 50, 100) if m <= budget]
    optimum, where = feasible_optimum(dropout_gb)
    print(f"\n== constrained: min val_loss s.t. peak_memory_gb <= {MEMORY_MAX} (pb), train_hours <= {HOURS_MAX} (eb); "
          f"feasible optimum {optimum:.5f} at {where}")
    print(f"{'searcher':<13}" + "".join(f"{'best@' + str(m):>26}" for m in marks) + f"{'infeasible evals':>22}"
          f"{'time s':>8}")
    results = {}
    for algo in algos:
        start = time.perf_counter()
        runs = [constrained_run(algo, seed, budget, marks, dropout_gb) for seed in range(seeds)]
        results[algo] = runs
        cells = [summary([r["best"][i] for r in runs]) for i in range(len(marks))]
        print(f"{algo:<13}" + "".join(f"{c:>26}" for c in cells)
              + f"{summary([r['infeasible'] for r in runs], '{:.0f}'):>22}{time.perf_counter() - start:>8.1f}")
    at50 = marks.index(50) if 50 in marks else len(marks) - 1
    med = {a: statistics.median(r["best"][at50] for r in runs) for a, runs in results.items()}
    infeasible = {a: statistics.median(r["infeasible"] for r in runs) for a, runs in results.items()}
    for nomad in [a for a in ("nomad-paper", "nomad-async") if a in results]:
        if "optuna-tpe" in results:
            print(f"target: {nomad} median best feasible at {marks[at50]} ({med[nomad]:.5f}) <= Optuna TPE's "
                  f"({med['optuna-tpe']:.5f}): {verdict(med[nomad] <= med['optuna-tpe'])}")
        if "random" in results:
            print(f"target: {nomad} median infeasible evaluations ({infeasible[nomad]:g}) < random's "
                  f"({infeasible['random']:g}): {verdict(infeasible[nomad] < infeasible['random'])}")


def biobjective_part(algos, seeds: int, budget: int) -> None:
    marks = [m for m in (50, 100) if m <= budget] or [budget]
    front = true_front()
    best_hv = hypervolume(front, REFERENCE)
    print(f"\n== bi-objective: min (val_loss, train_hours); reference point {REFERENCE}; true front "
          f"{len(front)} points, HV* = {best_hv:.5f}; cells: HV / HV*")
    print(f"{'searcher':<13}" + "".join(f"{'HV@' + str(m):>26}" for m in marks) + f"{'time s':>8}")
    med = {}
    for algo in algos:
        start = time.perf_counter()
        runs = [biobjective_run(algo, seed, budget, marks) for seed in range(seeds)]
        med[algo] = [statistics.median(r["hv"][i] / best_hv for r in runs) for i in range(len(marks))]
        cells = [summary([r["hv"][i] / best_hv for r in runs]) for i in range(len(marks))]
        print(f"{algo:<13}" + "".join(f"{c:>26}" for c in cells) + f"{time.perf_counter() - start:>8.1f}")
    anchors = [a for a in ("optuna-nsga2", "optuna-motpe") if a in med]
    for nomad in [a for a in ("nomad", "nomad-2n") if a in med]:
        for i, m in enumerate(marks):
            if anchors:
                top = max(anchors, key=lambda a: med[a][i])
                ok = med[nomad][i] >= 0.98 * med[top][i]
                print(f"target: {nomad} median HV@{m} ({med[nomad][i]:.4f} of HV*) within 2% of the best anchor "
                      f"{top} ({med[top][i]:.4f}): {verdict(ok)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--parts", nargs="+", default=["constrained", "bi-objective"],
                        choices=["constrained", "bi-objective"])
    parser.add_argument("--algos", nargs="+", default=None, help="a subset of the part's searchers")
    parser.add_argument("--dropout-gb", type=float, default=DROPOUT_GB,
                        help="memory a dropout > 0 adds (0: no infeasible region beside the constrained optimum)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(f"seeds 0..{args.seeds - 1}, budget {args.budget}, parallel 1, dropout adds {args.dropout_gb} GB; "
          "cells: median [min-max] over seeds")
    if "constrained" in args.parts:
        constrained_part([a for a in CONSTRAINED if not args.algos or a in args.algos], args.seeds, args.budget,
                         args.dropout_gb)
    if "bi-objective" in args.parts:
        biobjective_part([a for a in BI_OBJECTIVE if not args.algos or a in args.algos], args.seeds, args.budget)


if __name__ == "__main__":
    main()
