"""GPU-hours saved by pruning hopeless trials: our searchers in an event simulation of a study on K slots.

    python bench/gpu_hours.py                                   # nomad + tpe, 9 seeds, budget 60, 4 slots
    python bench/gpu_hours.py --seeds 2 --budget 20 --algos tpe --pruners none asha       # a quick look
    python bench/gpu_hours.py --told fail --algos nomad         # NOMAD told a failure for pruned trials

Each trial is a LoRA fine-tune whose intermediate validation losses come from a learning-curve model
(`LearningCurves`): the final loss is orchestrator.search.landscapes.paper_landscape (the paper's landscape), the
curve falls from the untrained loss along the cosine schedule at a speed set by the effective learning
rate (alpha / r scaling included), so a bad lr is visibly bad early, fast but mediocre points can lead
early and slow good ones catch up late; reports carry the noise of a validation subset, a persistent
per-run offset (seed) and the final value the noise of the full validation set. Cost (`CostModel`): the
paper's 4 GPUs per trial, 1 h of training at r = 4 growing to 2 h at r = 512, plus setup, the
intermediate validation passes, the final one and the cancellation latency of a pruned job.

The real searchers (`make_searcher("nomad"|"tpe", paper_space(), ...)`, ask/tell) drive `simulate`: K slots,
every report is handed to the pruner (`orchestrator.search.pruners`, or Optuna's MedianPruner /
SuccessiveHalvingPruner through `OptunaPruner`, the anchor), a pruned trial stops at once (its GPU time
so far plus the cancellation is charged) and the searcher is told `told_value` (--told overrides).

Per algorithm and seed, the unpruned study (--budget trials) is the reference: its final best (the
noise-free loss of the incumbent, which is chosen by observed value) and the GPU-hours (all jobs, running
ones included) it had spent when it first held that incumbent. Each pruned study of the same seed may run
up to --budget-factor times more trials within the unpruned study's total GPU-hours. Three figures of the
GPU-hours a pruned study needs to be as good as the unpruned one (saving = 1 - pruned / unpruned):

- to the unpruned best: per seed, until its incumbent is at least as good as that seed's unpruned best
  (not within the compute: a miss, -inf); median over seeds. Strict, and noisy: two incumbents closer
  than the evaluation noise are a coin flip for the study that picks them.
- within --tolerance (default: the noise sd of the objective): the same, to the unpruned best + tolerance.
- median curve: the median over seeds of the incumbent after h GPU-hours; the GPU-hours at which the
  pruned study's median curve first reaches the unpruned median curve's final value.

Target (issue 12): a saving >= 40% with at least one pruner, for nomad and tpe, with a median final best no
worse than the unpruned one; each figure prints MET or NOT MET.

A study on real curves plugs in here: any object with `outcome(point, seed) -> TrialOutcome` (reports at
fractions of training with their times, the final value, the GPU count), `n_reports` and `cost.cancel_h`
can replace `LearningCurves` in `simulate` and `compare`, e.g. one that runs or looks up curves measured
on the tiny preset.
"""
from __future__ import annotations

import argparse
import heapq
import json
import logging
import math
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed

from orchestrator.search.landscapes import UNTRAINED, paper_landscape  # noqa: E402
from orchestrator.search.pruners import Decision, make_pruner, told_value  # noqa: E402
from orchestrator.search.searchers import Suggestion, make_searcher  # noqa: E402
from orchestrator.search.space import paper_space  # noqa: E402

PRUNERS = {  # name -> (kind, config); "optuna-*" are Optuna's own pruners on the same reports
    "none": ("ours", None),
    "median": ("ours", {"kind": "median", "n_startup_trials": 5, "warmup": 0.25}),
    "asha": ("ours", {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3}),
    # margin = twice the subset noise sd of LearningCurves (0.01); 0.01 and 0.03 were tried too
    "asha-margin": ("ours", {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3, "margin": 0.02}),
    "optuna-median": ("optuna", {"kind": "median", "n_startup_trials": 5, "warmup": 0.25}),
    "optuna-sha": ("optuna", {"kind": "asha", "min_fraction": 0.125, "reduction_factor": 3}),
}


# ------------------------------------------------------------------------------------- trial model
@dataclass(frozen=True)
class CostModel:
    """Wall-clock hours of a trial's phases; GPU-hours = gpus x hours."""
    gpus: int = 4
    setup_h: float = 0.1          # scheduling aside: load the model and data, build the adapter
    train_h_r4: float = 1.0       # 2 epochs at r = 4 ...
    train_h_r512: float = 2.0     # ... and at r = 512 (log-linear in between)
    report_eval_h: float = 0.01   # one intermediate validation pass on the fixed subset
    final_eval_h: float = 0.08    # the full validation pass at the end
    cancel_h: float = 0.02        # decision -> job gone (the loop's poll + scancel)

    def train_h(self, r: int) -> float:
        return self.train_h_r4 + (self.train_h_r512 - self.train_h_r4) * math.log2(r / 4) / 7


@dataclass(frozen=True)
class TrialOutcome:
    """What a trial job does: `reports` [(fraction, val_loss)], `times` hours from job start at which each
    report is known, `final` the objective (None = failed) known at `end_h`, `true_final` its noise-free
    value (for scoring the bench only), `gpus` per job."""
    reports: list
    times: list
    final: float | None
    true_final: float
    end_h: float
    gpus: int


def lr_progress(t: float, warmup: float = 0.03) -> float:
    """Share of the cosine schedule's (with linear warmup) total learning rate spent by fraction t."""
    if t < warmup:
        area = t * t / (2 * warmup)
    else:
        x = (t - warmup) / (1 - warmup)
        area = warmup / 2 + 0.5 * (t - warmup) + 0.5 * (1 - warmup) / math.pi * math.sin(math.pi * x)
    return area / (warmup / 2 + 0.5 * (1 - warmup))


@dataclass(frozen=True)
class LearningCurves:
    """Simulated learning curves shaped like paper_landscape at the end (see the module docstring)."""
    n_reports: int = 8              # validation passes at fractions 1/n, 2/n, ..., 1
    subset_sd: float = 0.01         # noise of a validation pass on the subset
    run_sd: float = 0.004           # run-to-run (seed) offset, grows along the curve
    final_sd: float = 0.002         # noise of the full validation pass
    speed_at_optimum: float = 5.0   # curve speed k at the best effective lr ...
    speed_slope: float = 0.8        # ... times 10 ** (slope * decades of effective lr from it)
    cost: CostModel = field(default_factory=CostModel)

    def speed(self, hp: dict) -> float:
        eff = math.log10(hp["lr"]) + 0.5 * math.log10(hp["alpha"] / 64) - 0.25 * math.log10(hp["r"] / 512)
        return min(30.0, max(0.05, self.speed_at_optimum * 10 ** (self.speed_slope * (eff - math.log10(5e-4)))))

    def true_loss(self, hp: dict, t: float) -> tuple[float, float]:
        """(noise-free loss at fraction t, share of the way from the untrained loss to the final one)."""
        final = paper_landscape(hp)
        k = self.speed(hp)
        progress = (1 - math.exp(-k * lr_progress(t))) / (1 - math.exp(-k))
        return UNTRAINED - (UNTRAINED - final) * progress, progress

    def outcome(self, point: dict, seed: int) -> TrialOutcome:
        # the same point has the same curve in every study of a seed: pruners are compared on equal curves
        key = zlib.crc32(json.dumps(point, sort_keys=True).encode())
        rng = np.random.default_rng([seed, key])
        offset = float(rng.normal(0, self.run_sd))
        train, c = self.cost.train_h(point["r"]), self.cost
        reports, times = [], []
        for i in range(1, self.n_reports + 1):
            t = i / self.n_reports
            loss, progress = self.true_loss(point, t)
            reports.append((t, loss + offset * progress + float(rng.normal(0, self.subset_sd))))
            times.append(c.setup_h + train * t + c.report_eval_h * i)
        true_final = paper_landscape(point)
        final = true_final + offset + float(rng.normal(0, self.final_sd))
        return TrialOutcome(reports, times, final, true_final, times[-1] + c.final_eval_h, c.gpus)


# ----------------------------------------------------------------------------------- Optuna anchor
class OptunaPruner:
    """Optuna's MedianPruner / SuccessiveHalvingPruner behind our `decide(trial, curves)`, on an in-memory
    Optuna study fed the same reports (step = report index). Stateful (SHA keeps rung values), so it must
    see every record in time order, as `simulate` gives them."""

    def __init__(self, config: dict, n_reports: int):
        import optuna
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.n = n_reports
        if config["kind"] == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=config.get("n_startup_trials", 5),
                                                 n_warmup_steps=round(config.get("warmup", 0.0) * n_reports))
        else:  # steps are 1..n: min_resource = min_fraction * n reports
            pruner = optuna.pruners.SuccessiveHalvingPruner(
                min_resource=max(1, round(config["min_fraction"] * n_reports)),
                reduction_factor=config.get("reduction_factor", 3))
        self.kind = "optuna-" + config["kind"]
        self.study = optuna.create_study(direction="minimize", pruner=pruner)
        self.trials: dict = {}   # our trial id -> (optuna trial, records reported)

    def decide(self, trial: int, curves: dict) -> Decision | None:
        curve = curves[trial]
        if trial not in self.trials:
            self.trials[trial] = [self.study.ask(), 0]
        entry = self.trials[trial]
        for fraction, value in curve[entry[1]:]:
            entry[0].report(value, round(fraction * self.n))
        entry[1] = len(curve)
        fraction, value = curve[-1]
        if fraction >= 1.0 - 1e-9:
            self.study.tell(entry[0], value)   # completed
            return None
        if not entry[0].should_prune():
            return None
        import optuna
        self.study.tell(entry[0], state=optuna.trial.TrialState.PRUNED)
        return Decision(trial, self.kind, len(curve) - 1, fraction, value, value, math.nan, 0, "optuna pruned")


def build_pruner(name: str, n_reports: int):
    kind, config = PRUNERS[name]
    return OptunaPruner(config, n_reports) if kind == "optuna" else make_pruner(config)


# ------------------------------------------------------------------------------------- simulation
@dataclass
class Trace:
    """One simulated study: its trials and the incumbent's history [(GPU-hours spent, true loss)]."""
    trials: int = 0
    pruned: int = 0
    gpu_hours: float = 0.0
    best_true: float = math.inf
    history: list = field(default_factory=list)
    points: list = field(default_factory=list)   # in the order they were asked

    def hours_to(self, target: float) -> float:
        """GPU-hours spent (all jobs, running ones included) when the incumbent first got to `target`."""
        return next((h for h, v in self.history if v <= target + 1e-12), math.inf)


class Scripted:
    """A searcher that proposes given points in order and ignores what it is told: the same trials as another
    study, to measure what pruning alone saves on them."""
    finished = False

    def __init__(self, points: list):
        self.points, self.next = list(points), 0

    def ask(self) -> Suggestion | None:
        if self.next >= len(self.points):
            self.finished = True
            return None
        self.next += 1
        return Suggestion(self.next - 1, self.points[self.next - 1])

    def tell(self, trial_id: int, value) -> None:
        pass

    def close(self) -> None:
        pass


def simulate(algo: str, pruner, source, *, budget: int, parallel: int, seed: int, cap: float = math.inf,
             told: str | None = None, searcher=None) -> Trace:
    """A study on `parallel` slots in simulated time: ask when a slot is free (until `budget` trials or
    `cap` GPU-hours spent), every report goes to `pruner`, results are told as they come. `searcher`:
    one already built (e.g. Scripted) instead of make_searcher(algo, ...)."""
    if searcher is None:
        searcher = make_searcher(algo, paper_space(), budget=budget, parallel=parallel, seed=seed, options={})
    events, seq = [], 0          # (hours, seq, kind, trial, report index)
    running = {}                 # trial -> [start, outcome, end]
    curves, trace, spent_done, now = {}, Trace(), 0.0, 0.0
    best_seen = math.inf

    def spent(at: float) -> float:
        return spent_done + sum(o.gpus * (at - start) for start, o, _ in running.values())

    try:
        while True:
            while len(running) < parallel and spent(now) < cap and not searcher.finished:
                s = searcher.ask()
                if s is None:
                    break
                outcome = source.outcome(s.point, seed)
                trace.points.append(s.point)
                running[s.trial_id] = [now, outcome, now + outcome.end_h]
                curves[s.trial_id] = []
                trace.trials += 1
                for i, t in enumerate(outcome.times):
                    heapq.heappush(events, (now + t, seq := seq + 1, "report", s.trial_id, i))
                heapq.heappush(events, (now + outcome.end_h, seq := seq + 1, "end", s.trial_id, -1))
            if not events:
                break
            now, _, kind, trial, i = heapq.heappop(events)
            if trial not in running or (kind == "end" and now != running[trial][2]):
                continue  # an event of a trial already pruned, or its superseded end
            start, outcome, _ = running[trial]
            if kind == "report":
                curves[trial].append(outcome.reports[i])
                decision = pruner.decide(trial, curves) if pruner is not None else None
                if decision is not None:
                    trace.pruned += 1
                    searcher.tell(trial, told_value(algo, decision, told))
                    running[trial][2] = now + source.cost.cancel_h
                    heapq.heappush(events, (running[trial][2], seq := seq + 1, "end", trial, -1))
                continue
            del running[trial]
            spent_done += outcome.gpus * (now - start)
            if len(curves[trial]) < len(outcome.reports):
                continue  # pruned: told at the decision
            searcher.tell(trial, outcome.final)
            if outcome.final is not None and outcome.final < best_seen:
                best_seen, trace.best_true = outcome.final, outcome.true_final
                trace.history.append((spent(now), trace.best_true))
    finally:
        searcher.close()
    trace.gpu_hours = spent_done
    return trace


# ------------------------------------------------------------------------------------------ report
def compare(algo: str, names: list[str], source, args) -> dict:
    """{pruner name: [per-seed row]}; a row: trials, pruned, GPU-h, final best, and for the strict target
    (the unpruned best itself) and the one within `args.tolerance`: GPU-h to reach it and the saving."""
    rows = {name: [] for name in names}
    for seed in range(args.seeds):
        base = simulate(algo, None, source, budget=args.budget, parallel=args.parallel, seed=seed)
        for name in names:
            if name == "none":
                trace = base
            else:
                trace = simulate(algo, build_pruner(name, source.n_reports), source,
                                 budget=args.budget * args.budget_factor, parallel=args.parallel, seed=seed,
                                 cap=base.gpu_hours, told=args.told)
            row = {"trials": trace.trials, "pruned": trace.pruned, "gpu_h": trace.gpu_hours, "best": trace.best_true,
                   "history": trace.history}
            same = base if name == "none" else simulate(algo, build_pruner(name, source.n_reports), source,
                                                        budget=args.budget, parallel=args.parallel, seed=seed,
                                                        searcher=Scripted(base.points))
            reach = same.hours_to(base.best_true)
            row["same_saving"] = 1 - reach / base.hours_to(base.best_true) if math.isfinite(reach) else -math.inf
            row["same_gpu_h"] = same.gpu_hours
            for suffix, tol in (("", 0.0), ("_tol", args.tolerance)):
                # the unpruned study's own time to its best, with the same tolerance
                reach0, reach = base.hours_to(base.best_true + tol), trace.hours_to(base.best_true + tol)
                row["reach" + suffix] = reach
                row["saving" + suffix] = 1 - reach / reach0 if math.isfinite(reach) else -math.inf
            rows[name].append(row)
    return rows


def median_curve(rows: list[dict], hours: float) -> float:
    """Median over seeds of the incumbent's true loss after `hours` GPU-hours (inf before a first result)."""
    return statistics.median(next((v for h, v in reversed(r["history"]) if h <= hours), math.inf) for r in rows)


def anytime_saving(rows: dict, name: str, step: float = 1.0) -> tuple[float, float]:
    """(GPU-h, saving): when the median-over-seeds incumbent curve of `name` first reaches the final value of
    the unpruned study's median curve, and 1 - that / the unpruned curve's own time to it."""
    end = max(h for rs in rows.values() for r in rs for h, _ in r["history"])
    grid = [step * i for i in range(int(end / step) + 2)]
    target = median_curve(rows["none"], grid[-1])
    first = {n: next((h for h in grid if median_curve(rows[n], h) <= target + 1e-12), math.inf) for n in ("none", name)}
    return first[name], 1 - first[name] / first["none"] if math.isfinite(first[name]) else -math.inf


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _pct(x: float) -> str:
    return f"{x:.0%}" if math.isfinite(x) else "miss"


def print_table(algo: str, rows: dict, args) -> dict:
    """Print one algorithm's table; returns {"strict": met, "tol": met}: met when some pruner saves >= 40%
    (median over seeds) with a median final best no worse than the unpruned one (+ tolerance for "tol")."""
    base_best = _med(rows["none"], "best")
    print(f"\n{algo}: budget {args.budget} (pruned studies: up to {args.budget * args.budget_factor} trials within "
          f"the unpruned study's GPU-hours), {args.parallel} slots, seeds 0..{args.seeds - 1}, medians over seeds")
    print(f"{'':<45}{'- to the unpruned best -':>25}{'- within ' + str(args.tolerance) + ' -':>17}"
          f"{'- median curve -':>17}{'- same trials -':>17}")
    print(f"{'pruner':<15}{'trials':>7}{'pruned':>7}{'GPU-h':>7}{'best':>9}{'GPU-h':>9}{'saving':>8}{'reached':>8}"
          f"{'saving':>9}{'reached':>8}{'GPU-h':>9}{'saving':>8}{'saving':>9}{'kept':>8}"
          f"   saving per seed (to the unpruned best)")
    met = {"strict": False, "tol": False, "curve": False, "same trials": False}
    for name, r in rows.items():
        cells = []
        for suffix in ("", "_tol"):
            cells.append((_med(r, "saving" + suffix), sum(math.isfinite(x["reach" + suffix]) for x in r)))
        curve_h, curve_saving = anytime_saving(rows, name)
        kept = sum(math.isfinite(x["same_saving"]) for x in r)  # the same trials: the best one not pruned
        print(f"{name:<15}{_med(r, 'trials'):>7.0f}{_med(r, 'pruned'):>7.0f}{_med(r, 'gpu_h'):>7.0f}"
              f"{_med(r, 'best'):>9.4f}{_med(r, 'reach'):>9.0f}{_pct(cells[0][0]):>8}{f'{cells[0][1]}/{len(r)}':>8}"
              f"{_pct(cells[1][0]):>9}{f'{cells[1][1]}/{len(r)}':>8}{curve_h:>9.0f}{_pct(curve_saving):>8}"
              f"{_pct(_med(r, 'same_saving')):>9}{f'{kept}/{len(r)}':>8}"
              f"   {' '.join(_pct(x['saving']) for x in r)}")
        if name != "none":
            best = _med(r, "best")
            met["strict"] |= cells[0][0] >= 0.40 and best <= base_best + 1e-12
            met["tol"] |= cells[1][0] >= 0.40 and best <= base_best + args.tolerance
            met["curve"] |= curve_saving >= 0.40 and best <= base_best + 1e-12
            met["same trials"] |= _med(r, "same_saving") >= 0.40  # finite median: the best kept in most seeds
    print(f"target (>= 40% fewer GPU-hours to the unpruned best, same final best, some pruner), {algo}: "
          + "; ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in met.items()))
    return met


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=9, help="seeds 0..N-1 (9)")
    parser.add_argument("--budget", type=int, default=60, help="trials of the unpruned study (60)")
    parser.add_argument("--budget-factor", type=int, default=3,
                        help="a pruned study may run this many times more trials, within the same GPU-hours (3)")
    parser.add_argument("--parallel", type=int, default=4, help="slots: trials running at once (4)")
    parser.add_argument("--algos", nargs="+", default=["nomad", "tpe"], choices=["nomad", "tpe", "random"])
    parser.add_argument("--pruners", nargs="+", default=list(PRUNERS), choices=list(PRUNERS))
    parser.add_argument("--tolerance", type=float,
                        help="second target: within this of the unpruned best (default: the model's noise sd of "
                             "the objective, sqrt(run_sd^2 + final_sd^2))")
    parser.add_argument("--told", choices=["last", "fail"],
                        help="what the searcher hears for a pruned trial (default: orchestrator.search.pruners.TOLD)")
    args = parser.parse_args(argv)
    if min(args.seeds, args.budget, args.budget_factor, args.parallel) < 1:
        parser.error("--seeds, --budget, --budget-factor and --parallel must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    source = LearningCurves()
    if args.tolerance is None:
        args.tolerance = round(math.hypot(source.run_sd, source.final_sd), 4)
    names = ["none"] + [n for n in args.pruners if n != "none"]
    print(f"learning-curve model: {source.n_reports} reports per trial, subset noise sd {source.subset_sd}, "
          f"run sd {source.run_sd}, final sd {source.final_sd}; cost: {source.cost}")
    print("pruners: " + "; ".join(f"{n} = {PRUNERS[n][1]}" + (" (Optuna's)" if PRUNERS[n][0] == "optuna" else "")
                                  for n in names[1:]) + f"; told: {args.told or 'orchestrator.search.pruners.TOLD'}")
    met = {}
    for algo in args.algos:
        start = time.perf_counter()
        met[algo] = print_table(algo, compare(algo, names, source, args), args)
        print(f"({time.perf_counter() - start:.0f} s)")
    print("\nsummary: " + "; ".join(f"{a}: " + ", ".join(f"{k} {'MET' if v else 'NOT MET'}" for k, v in m.items())
                                   for a, m in met.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
