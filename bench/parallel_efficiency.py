"""Wall time to a good adapter with K GPU slots: a discrete-event simulation of parallel studies.

    python bench/parallel_efficiency.py                      # 10 seeds, K = 1 4 8 16, budget 100 (long)
    python bench/parallel_efficiency.py --seeds 3 --k 1 4 --algos nomad tpe random --landscapes paper

No sleeping: simulated time jumps from one trial end to the next. The real searchers are driven through
``make_searcher(...).ask()/tell()`` exactly as the study loop drives them: whenever a slot is free,
``ask()`` (None = nothing to propose now: the slot idles until the next result); each result is told
when its trial ends. Trial durations (in units of a mean trial length): a rank-dependent mean (0.6 at
r = 4 up to 1.4 at r = 512, like a LoRA fine-tune whose cost grows with the rank) times lognormal
noise (sigma 0.3); 5% of the trials fail after 5-50% of their duration (told as failures). Landscapes
(``Landscape``: the true loss, its optimum, the evaluation noise or a measured seed's draw, constraints):
``paper`` (``orchestrator.search.landscapes.paper_landscape``, noise-free) and ``two_basins`` (a decoy basin and
a deeper, narrower one; evaluation noise sd 0.005); bench/search_quality.py adds the measured, constrained and
noisy ones and runs ``simulate`` on them. Each seed fixes the durations, failures and noise. Besides the figures
below, each ``Outcome`` keeps the incumbent's true loss after 25/50/100 evaluations, the infeasible evaluations,
the true loss of the trial each champion rule would register (``champions``) and the trials told.

Per (landscape, algo, K), over the seeds:
- t1%: simulated wall time until the incumbent (the point with the best *observed* value) is truly
  within 1% of the optimum, median [25%-75%] (inf when not reached within the budget), and hits;
- evals: evaluations told until then (median); x1: the K=1 median time over this K's (the speed-up);
- best@T: true loss of the incumbent at T = budget/K trial lengths (equal wall time), median;
- util: busy slot-time / (K x time until the budget was handed out), median and min: how well the
  searcher keeps slots busy (the tail after the last hand-out is nobody's choice); util_all: the
  same over the whole study, to the last result.

Anchors in the same run: Optuna's TPESampler with constant_liar=True (univariate ``optuna-tpe`` and
multivariate ``optuna-tpe-mv``) and GPSampler (``optuna-gp``, which accounts for running trials), each
with r and dropout encoded as categories and as ordered integer indices: the better encoding (by
median t1%, then best@T) is reported, named in the row. ``nomad-paper`` is NOMAD with profile
``paper`` at every K; ``nomad`` is the searcher's default profile for that K (``paper`` at K=1).
``nomad-async`` forces the recommended profile at every K (the targets compare it with itself).
"""
from __future__ import annotations

import argparse
import heapq
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")   # GPSampler's torch: one thread per simulation
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from hpo_efficiency import suggest  # noqa: E402  (the Optuna anchors' points, as in the other benches)
from orchestrator.search.landscapes import (OPTIMUM, TWO_BASINS_OPTIMUM, paper_landscape,  # noqa: E402
                                            two_basins)
from orchestrator.search.searchers import make_searcher  # noqa: E402
from orchestrator.search.space import SearchSpace, paper_space  # noqa: E402

OURS = {"nomad": {}, "nomad-async": {"profile": "async"}, "nomad-paper": {"profile": "paper"},
        "tpe": {}, "tpe-optuna": {"sampler": "optuna"}, "random": {}}
ANCHORS = ("optuna-tpe", "optuna-tpe-mv", "optuna-gp")
ALGOS = tuple(OURS) + ANCHORS
FAIL_P, SIGMA = 0.05, 0.3
MARKS = (25, 50, 100)     # evaluations at which the incumbent's true loss is read


@dataclass(frozen=True)
class Landscape:
    """What a simulated study evaluates: ``true(point)`` the noise-free loss (None: the evaluation fails),
    ``optimum`` the best true feasible loss, ``noise`` the sd of Gaussian noise on each evaluation, or
    ``draw(point, rng)`` the observed loss itself (a measured landscape: one seed's value), and
    ``constraints(point)`` the constraint values (<= 0 satisfied) of kinds ``kinds``."""
    true: Callable[[dict], float | None]
    optimum: float
    noise: float = 0.0
    draw: Callable[[dict, np.random.Generator], float | None] | None = None
    constraints: Callable[[dict], list] | None = None
    kinds: tuple = ()

    def observe(self, point: dict, true: float | None, rng: np.random.Generator) -> float | None:
        if self.draw is not None:
            return self.draw(point, rng)
        if true is None or not self.noise:
            return true
        return true + float(rng.normal(0.0, self.noise))


LANDSCAPES = {"paper": Landscape(paper_landscape, OPTIMUM),
              "two_basins": Landscape(two_basins, TWO_BASINS_OPTIMUM, 0.005)}


def duration(point: dict, rng: np.random.Generator) -> tuple[float, bool]:
    """(simulated duration, failed?) of one trial: mean grows with log2(rank), lognormal noise."""
    mean = 0.6 + 0.8 * math.log2(point["r"] / 4.0) / 7.0
    length = mean * float(rng.lognormal(-SIGMA ** 2 / 2, SIGMA))
    if rng.random() < FAIL_P:
        return length * float(rng.uniform(0.05, 0.5)), True
    return length, False


class OptunaAnchor:
    """An Optuna sampler behind our ask/tell shape (bench only); ``ordered`` encodes choices as indices.
    Constraint values go to ``Trial.set_constraint``, which Optuna's TPE and GP samplers read."""

    def __init__(self, kind: str, space: SearchSpace, seed: int, ordered: bool):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        if kind == "optuna-gp":
            sampler = optuna.samplers.GPSampler(seed=seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True,
                                                 multivariate=kind == "optuna-tpe-mv")
        self.study = optuna.create_study(sampler=sampler)
        self.space, self.ordered, self.trials, self.finished = space, ordered, {}, False
        self._state = optuna.trial.TrialState

    def ask(self):
        trial = self.study.ask()
        point = suggest(trial, self.space, self.ordered)
        self.trials[trial.number] = trial
        return _Asked(trial.number, point)

    def tell(self, trial_id: int, value: float | None, constraints: list | None = None) -> None:
        trial = self.trials.pop(trial_id)
        if value is None:
            self.study.tell(trial, state=self._state.FAIL)
            return
        for j, c in enumerate(constraints or ()):
            trial.set_constraint(str(j), c)
        self.study.tell(trial, value)

    def close(self) -> None:
        pass


@dataclass
class _Asked:
    trial_id: int
    point: dict


@dataclass
class Outcome:
    t_hit: float          # simulated time to within 1% (inf: never)
    evals_hit: float      # evaluations told until then (inf: never)
    best_at: float        # true loss of the incumbent at the equal-wall-time mark
    util: float           # busy / (K x time to the last hand-out)
    util_all: float       # busy / (K x time to the last result)
    at_marks: list = field(default_factory=list)   # true loss of the incumbent after MARKS evaluations
    infeasible: int = 0   # evaluations that violated a constraint
    champion: dict = field(default_factory=dict)   # rule -> true loss of the trial it would register
    told: list = field(default_factory=list)       # (point, true, observed or None, feasible) in told order


def build(algo: str, space: SearchSpace, budget: int, k: int, seed: int, kinds: tuple, ordered: bool):
    if algo in OURS:
        return make_searcher(algo.split("-")[0], space, budget=budget, parallel=k, seed=seed,
                             options=dict(OURS[algo]), constraints=kinds)
    return OptunaAnchor(algo, space, seed, ordered)


def champions(space: SearchSpace, told: list) -> dict:
    """The true loss of the trial each champion rule registers: ``best`` (lowest observed feasible loss),
    ``mean`` (orchestrator.search.model_mean: the noise-aware rule)."""
    from orchestrator.search.model_mean import rank_by_model_mean
    ok = [t for t in told if t[2] is not None and t[3]]
    if not ok:
        return {"best": math.inf, "mean": math.inf}
    best = min(ok, key=lambda t: t[2])[1]
    order = rank_by_model_mean([t[0] for t in told], [t[2] for t in told], space, [t[3] for t in told])
    return {"best": best, "mean": told[order[0]][1]}


def simulate(algo: str, landscape: str | Landscape, k: int, budget: int, seed: int,
             ordered: bool = False) -> Outcome:
    """One study: K slots, ``budget`` evaluations; returns its figures. The incumbent is the trial with the
    best *observed* feasible loss (a failed or infeasible trial never is); "within 1%" compares its *true*
    loss with the landscape's optimum."""
    land = LANDSCAPES[landscape] if isinstance(landscape, str) else landscape
    space = paper_space()
    searcher = build(algo, space, budget, k, seed, land.kinds, ordered)
    rng = np.random.default_rng([seed, 20231201])
    running: list = []        # heap of (end, trial_id, point, true value, observed value or None, constraints)
    spans: list = []          # (start, end) of every trial
    told: list = []           # (point, true, observed or None, feasible) in the order told
    now = 0.0
    best_seen, best_true, best_at = math.inf, math.inf, None
    t_hit = evals_hit = math.inf
    at_marks, infeasible = [], 0
    try:
        while True:
            while len(running) < k and len(spans) < budget and not searcher.finished:
                asked = searcher.ask()
                if asked is None:
                    break
                true = land.true(asked.point)
                seen = land.observe(asked.point, true, rng)
                cs = land.constraints(asked.point) if land.constraints else None
                length, failed = duration(asked.point, rng)
                heapq.heappush(running, (now + length, asked.trial_id, asked.point, true,
                                         None if failed else seen, cs))
                spans.append((now, now + length))
            if not running:
                break
            end, trial_id, point, true, seen, cs = heapq.heappop(running)
            if best_at is None and end > budget / k:
                best_at = best_true        # the incumbent at the equal-wall-time mark
            now = end
            if land.constraints:
                searcher.tell(trial_id, seen, None if seen is None else cs)
            else:
                searcher.tell(trial_id, seen)
            feasible = cs is None or all(c <= 0 for c in cs)
            infeasible += not feasible
            told.append((point, true, seen, feasible))
            if seen is not None and feasible and seen < best_seen:
                best_seen, best_true = seen, true
                if true <= land.optimum * 1.01 and math.isinf(t_hit):
                    t_hit, evals_hit = now, len(told)
            if len(told) in MARKS:
                at_marks.append(best_true)
    finally:
        searcher.close()
    if len(spans) < budget and not searcher.finished:
        raise RuntimeError(f"{algo} K={k} seed={seed}: stalled after {len(spans)} trials")
    at_marks += [best_true] * (sum(m <= budget for m in MARKS) - len(at_marks))
    last = max(start for start, _ in spans)
    busy_until_last = sum(min(end, last) - start for start, end in spans)
    util = busy_until_last / (k * last) if last > 0 else 1.0
    return Outcome(t_hit, evals_hit, best_true if best_at is None else best_at, util,
                   sum(end - start for start, end in spans) / (k * now), at_marks, infeasible,
                   champions(space, told), told)


def _q(values: list[float], q: float) -> float:
    return float(np.percentile(values, q, method="lower" if q < 50 else "higher"))


def _fmt(x: float, digits: int = 1) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


def summarize(outcomes: list[Outcome]) -> dict:
    hits = [o.t_hit for o in outcomes]
    return {"t": statistics.median(hits), "t25": _q(hits, 25), "t75": _q(hits, 75),
            "hits": sum(not math.isinf(h) for h in hits), "n": len(hits),
            "evals": statistics.median(o.evals_hit for o in outcomes),
            "best": statistics.median(o.best_at for o in outcomes),
            "util": statistics.median(o.util for o in outcomes), "util_min": min(o.util for o in outcomes),
            "util_all": statistics.median(o.util_all for o in outcomes)}


def run_cell(algo: str, landscape: str, k: int, budget: int, seeds: list[int]) -> dict:
    """Summary over the seeds; an Optuna anchor runs both encodings and keeps the better."""
    start = time.perf_counter()
    variants = [False, True] if algo in ANCHORS else [False]
    best = None
    for ordered in variants:
        row = summarize([simulate(algo, landscape, k, budget, seed, ordered) for seed in seeds])
        row["name"] = algo + ("/ord" if ordered else "/cat") * (algo in ANCHORS)
        if best is None or (row["t"], row["best"]) < (best["t"], best["best"]):
            best = row
    best["secs"] = time.perf_counter() - start
    return best


def print_row(landscape: str, k: int, row: dict, base: dict | None) -> None:
    finite = base and not math.isinf(row["t"]) and not math.isinf(base["t"])
    speed = base["t"] / row["t"] if finite else math.nan
    spread = f"[{_fmt(row['t25'])}-{_fmt(row['t75'])}]"
    print(f"{landscape:<10} {row['name']:<18} {k:>3} {_fmt(row['t']):>6} {spread:>13} "
          f"{row['hits']:>2}/{row['n']:<2} {_fmt(row['evals'], 0):>5} {speed:>6.2f} {row['best']:>8.4f} "
          f"{row['util']:>5.2f} ({row['util_min']:.2f}) {row['util_all']:>8.2f} {row['secs']:>7.1f}",
          flush=True)


def check_targets(table: dict, landscape: str, ks: list[int]) -> None:
    """Print every target of issue 9 that this run's cells allow, met or MISSED."""
    def cell(algo, k):
        return table.get((landscape, algo, k))

    def say(ok: bool, text: str) -> None:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")

    print(f"targets on {landscape}:")
    for algo in ("nomad", "tpe", "random"):
        for k in (k for k in ks if k in (4, 8, 16)):
            if cell(algo, k):
                say(cell(algo, k)["util"] >= 0.95, f"util {algo} K={k}: {cell(algo, k)['util']:.3f} >= 0.95")
    base = cell("nomad-async", 1)
    for k, limit in ((4, 0.30), (8, 0.18)):
        if base and cell("nomad-async", k):
            ratio = cell("nomad-async", k)["t"] / base["t"]
            say(ratio <= limit, f"nomad-async t1% K={k} / K=1 = {_fmt(cell('nomad-async', k)['t'], 2)} / "
                                f"{_fmt(base['t'], 2)} = {ratio:.3f} <= {limit}")
    for k in ks:
        anchors = [cell(a, k) for a in ANCHORS if cell(a, k)]
        if anchors and cell("nomad-async", k):
            top = min(anchors, key=lambda row: (row["t"], row["best"]))
            mine = cell("nomad-async", k)["t"]
            say(mine <= top["t"], f"nomad-async t1% K={k} {_fmt(mine, 2)} <= best anchor {top['name']} "
                                  f"{_fmt(top['t'], 2)}")
    anchors = [cell(a, 1) for a in ANCHORS if cell(a, 1)]
    if anchors and cell("nomad-async", 1):
        top = min(anchors, key=lambda row: row["evals"])
        mine = cell("nomad-async", 1)["evals"]
        say(mine <= top["evals"], f"nomad-async evals to 1% at K=1 {_fmt(mine, 0)} <= best anchor "
                                  f"{top['name']} {_fmt(top['evals'], 0)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds (0..N-1)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8, 16], help="slot counts")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--landscapes", nargs="+", default=list(LANDSCAPES), choices=list(LANDSCAPES))
    parser.add_argument("--budget", type=int, default=100, help="evaluations per study")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    seeds = list(range(args.seeds))
    print(f"budget {args.budget}, seeds 0..{args.seeds - 1}, times in mean trial lengths; equal wall time "
          f"mark = budget/K; t1% = time to within 1% of the optimum, median [25%-75%]")
    print(f"{'landscape':<10} {'algo':<18} {'K':>3} {'t1%':>6} {'spread':>13} {'hits':>5} {'evals':>5} "
          f"{'x1':>6} {'best@T':>8} {'util (min)':>12} {'util_all':>8} {'secs':>7}")
    table = {}
    for landscape in args.landscapes:
        for algo in args.algos:
            for k in args.k:
                table[landscape, algo, k] = run_cell(algo, landscape, k, args.budget, seeds)
                print_row(landscape, k, table[landscape, algo, k], table.get((landscape, algo, 1)))
    for landscape in args.landscapes:
        check_targets(table, landscape, args.k)


if __name__ == "__main__":
    main()
