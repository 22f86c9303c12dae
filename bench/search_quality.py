"""Search quality on every landscape: our searchers against Optuna's TPE and GP, K = 1, 4, 8 slots, many seeds.

    nice -n 19 python bench/search_quality.py --cache /tmp/studies.jsonl           # the whole suite (hours)
    python bench/search_quality.py --seeds 3 --landscapes paper --k 1 4 --algos nomad-async optuna-tpe-mv

Every study runs in bench/parallel_efficiency.py's discrete-event simulator (``simulate``: K slots, trial
lengths growing with the rank, 5% failures, the real searchers driven through ask/tell), budget 100. Landscapes
(``suite()``):

- ``paper``, ``two_basins`` (orchestrator/search/landscapes.py; two_basins with noise sd 0.005, as in
  parallel_efficiency.py), ``measured`` (the mean over seeds of real tiny fine-tunes, nearest measured point,
  bench/data/tiny_landscape.json), ``constrained`` (bench/multi_criteria.py's: paper's loss, peak memory <= 30 GB
  as pb, train hours <= 1.2 as eb; feasible optimum 0.95429);
- their noisy variants (``-noisy``): Gaussian noise of sd ``NOISE`` (analytic ones; the measured table's seed
  spread, relative to the loss, is about the same), and for ``measured-noisy`` one of the point's measured seeds
  drawn at random, i.e. the noise of a real fine-tune.

Searchers: ``nomad-async`` (the recommended NOMAD profile), ``tpe`` (NNI's TPE, the study's ``tpe``),
``random``; anchors in the same run: Optuna's TPESampler with constant liar, univariate (``optuna-tpe``) and
multivariate (``optuna-tpe-mv``), and GPSampler (``optuna-gp``; with constraints both read
``Trial.set_constraint``). The TPE anchors run with r and dropout as categories and as ordered indices and the
better is kept (as parallel_efficiency.py does); the GP with ``GP_ENCODING`` only (it costs ~40 CPU-s a study).
Per landscape and K, over the seeds (median, [25%-75%] where shown):

- ``t1%``: simulated wall time (mean trial lengths) until the incumbent (best observed feasible loss) is truly
  within 1% of the optimum; ``hits``: studies that got there; ``evals``: evaluations told by then; ``x1``: this
  K's speed-up over the same searcher's K=1;
- ``@25 @50 @100``: true loss of the incumbent after that many evaluations (constrained: best feasible);
- ``infeas``: evaluations that violated a constraint; ``util``: busy slot-time / (K x time to the last hand-out);
- ``reg best`` / ``reg mean``: true loss of the trial the study would register at the end, by the lowest
  observed loss or by the noise-aware rule (orchestrator/search/model_mean.py).

Then every target of issue 24 that the run's cells allow, met or MISSED. ``--cache FILE`` (JSON lines) keeps each
study's outcome (keyed by algo, landscape, K, seed, encoding, budget and ``SIM_VERSION``): the simulation is
deterministic given the seed, so a re-run reads the same figures instead of recomputing them; our searchers'
outcomes are keyed by a hash of their code too. ``--precompute`` only fills the cache (run several at once, one
per landscape, then merge their files). ``--anchor-rows REPORT`` takes the anchors' cells that the cache lacks from
an earlier report (bench/data/search_quality_output.txt): the anchors do not depend on our code, so after a change
of our searchers only their cells need simulating (minutes, not the GP's hours).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel_efficiency as pe  # noqa: E402  (sets OMP_NUM_THREADS and the repository's path)

from orchestrator.search.landscapes import OPTIMUM, TWO_BASINS_OPTIMUM, measured_table, paper_landscape, two_basins  # noqa: E402,E501

NOISE = 0.01          # sd of the noisy variants' evaluation noise (about 1% of the loss)
GP_ENCODING = False   # Optuna's GP with r and dropout as categories (False) or ordered indices (True)
SIM_VERSION = 1       # bump when the simulator or a landscape changes: cached anchor outcomes are then stale
OURS = ("nomad-async", "tpe", "tpe-optuna", "random")
ALGOS = OURS + pe.ANCHORS
MARKS = pe.MARKS


def suite() -> dict[str, pe.Landscape]:
    """The landscapes by name (the measured ones need bench/data/tiny_landscape.json)."""
    import multi_criteria as mc
    table = measured_table()
    optimum, _ = mc.feasible_optimum()
    constraints = {"constraints": mc.constraint_values, "kinds": ("pb", "eb")}
    return {
        "paper": pe.Landscape(paper_landscape, OPTIMUM),
        "paper-noisy": pe.Landscape(paper_landscape, OPTIMUM, NOISE),
        "two_basins": pe.Landscape(two_basins, TWO_BASINS_OPTIMUM, 0.005),
        "two_basins-noisy": pe.Landscape(two_basins, TWO_BASINS_OPTIMUM, NOISE),
        "measured": pe.Landscape(table, table.optimum),
        "measured-noisy": pe.Landscape(table, table.optimum, draw=table),
        "constrained": pe.Landscape(paper_landscape, optimum, **constraints),
        "constrained-noisy": pe.Landscape(paper_landscape, optimum, NOISE, **constraints),
    }


def read_cache(path: Path) -> dict:
    """A cache file's outcomes by key: JSON lines ``{"key": ..., "outcome": ...}`` (what ``Cache`` appends), or
    one JSON object of key -> outcome (the first version's format)."""
    text = path.read_text()
    if text.startswith("{") and not text.startswith('{"key"'):
        return json.loads(text)
    data = {}
    for line in text.splitlines():
        if line.strip():
            row = json.loads(line)
            data[row["key"]] = row["outcome"]
    return data


class Cache:
    """Outcomes of studies in a JSON-lines file (deterministic given their key), one line appended per study:
    rewriting one JSON object after each study cost O(n^2) writes once it held a suite's thousand studies."""

    def __init__(self, path: Path | None, only: bool = False, extra: list = ()):
        self.path, self.only, self.rechampion = path, only, False
        self.data = read_cache(path) if path and path.exists() else {}
        for other in extra:   # more cache files to read (written by --precompute runs side by side)
            self.data.update(read_cache(Path(other)))

    def get(self, key: str) -> pe.Outcome | None:
        """The cached outcome; with ``rechampion``, its champions recomputed from its trials (after a change of
        the champion rules)."""
        row = self.data.get(key)
        if not row:
            return None
        outcome = pe.Outcome(**row)
        if self.rechampion:
            outcome.champion = pe.champions(pe.paper_space(), [tuple(t) for t in outcome.told])
        return outcome

    def put(self, key: str, outcome: pe.Outcome) -> None:
        if self.path:
            self.data[key] = dataclasses.asdict(outcome)
            with self.path.open("a") as file:
                file.write(json.dumps({"key": key, "outcome": self.data[key]}) + "\n")


def data_tag(name: str) -> str:
    """What a landscape's outcomes depend on beyond its name: the measured table's runs."""
    return f"@{sum(len(v) for v in measured_table().seeds)}runs" if name.startswith("measured") else ""


@functools.lru_cache(maxsize=1)
def code_tag() -> str:
    """A hash of our searchers' code (docstrings and comments left out): their cached outcomes are reused only
    while it is unchanged."""
    root = Path(__file__).resolve().parents[1] / "orchestrator" / "search"
    digest = hashlib.sha256()
    for path in sorted(root.glob("searchers/*.py")) + [root / "space.py", root / "landscapes.py"]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                    isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()[:10]


def run_studies(algo: str, name: str, land: pe.Landscape, k: int, budget: int, seeds: list, ordered: bool,
                cache: Cache) -> list:
    """The outcomes of these seeds' studies, from the cache or simulated (``cache.only``: cached ones only)."""
    out = []
    for seed in seeds:
        version = SIM_VERSION if algo in pe.ANCHORS else f"{SIM_VERSION}-{code_tag()}"
        key = f"{algo}|{name}{data_tag(name)}|{k}|{budget}|{seed}|{ordered}|{version}"
        outcome = cache.get(key)
        if outcome is None and cache.only:
            continue
        if outcome is None:
            outcome = pe.simulate(algo, land, k, budget, seed, ordered)
            cache.put(key, outcome)
        out.append(outcome)
    return out


def summarize(outcomes: list) -> dict:
    row = pe.summarize(outcomes)
    row["marks"] = [statistics.median(o.at_marks[i] for o in outcomes) for i in range(len(outcomes[0].at_marks))]
    row["infeasible"] = statistics.median(o.infeasible for o in outcomes)
    row["champion"] = {rule: statistics.median(o.champion[rule] for o in outcomes) for rule in ("best", "mean")}
    return row


def variants(algo: str) -> list:
    """The encodings an algo runs with: both for the TPE anchors, GP_ENCODING for the GP, ours their own."""
    return [False, True] if algo in ("optuna-tpe", "optuna-tpe-mv") else [GP_ENCODING] if algo == "optuna-gp" \
        else [False]


def run_cell(algo: str, name: str, land: pe.Landscape, k: int, budget: int, seeds: list, cache: Cache) -> dict:
    """Summary over the seeds; a TPE anchor runs both encodings and keeps the better (t1%, then true@100)."""
    start = time.perf_counter()
    best = None
    for ordered in variants(algo):
        outcomes = run_studies(algo, name, land, k, budget, seeds, ordered, cache)
        if not outcomes:
            continue
        row = summarize(outcomes)
        row["name"] = algo + ("/ord" if ordered else "/cat") * (algo in pe.ANCHORS)
        if best is None or (row["t"], row["marks"][-1]) < (best["t"], best["marks"][-1]):
            best = row
    if best is not None:
        best["secs"] = time.perf_counter() - start
    return best


def report_rows(path: Path) -> dict:
    """The anchors' rows of an earlier report (this script's output, e.g. bench/data/search_quality_output.txt):
    {(landscape, algo, K): row} with the figures a row prints (no equal-time mark, no minimum utilisation).
    The anchors do not depend on our code, so a report after a change of our searchers can take their rows from
    the last one instead of hours of Optuna studies (the cache is not committed: 18 MB)."""
    rows, lines = {}, path.read_text().splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == HEADER.split()]
    for line in lines[header[0] + 1:] if header else []:
        parts = line.split()
        if not parts:
            break   # the table ends at the first blank line
        if len(parts) != 13 + len(MARKS) or parts[1].split("/")[0] not in pe.ANCHORS:
            continue
        name, algo, k, t, span, hits, evals, _, *rest = parts
        marks, (infeasible, util, best, mean, secs) = rest[:len(MARKS)], rest[len(MARKS):]
        t25, t75 = span.strip("[]").rsplit("-", 1)
        got, n = hits.split("/")
        rows[name, algo.split("/")[0], int(k)] = {
            "name": algo, "t": float(t), "t25": float(t25), "t75": float(t75), "hits": int(got), "n": int(n),
            "evals": float(evals), "marks": [float(m) for m in marks], "infeasible": float(infeasible),
            "util": float(util), "champion": {"best": float(best), "mean": float(mean)}, "secs": float(secs)}
    return rows


def _f(x: float, digits: int = 1) -> str:
    return "inf" if math.isinf(x) else f"{x:.{digits}f}"


HEADER = (f"{'landscape':<17} {'algo':<17} {'K':>2} {'t1%':>6} {'[25%-75%]':>13} {'hits':>5} {'evals':>5} {'x1':>5} "
          + "".join(f"{'@' + str(m):>7}" for m in MARKS) + f" {'infeas':>6} {'util':>5} {'reg best':>8} "
          f"{'reg mean':>8} {'secs':>6}")


def print_row(name: str, k: int, row: dict, base: dict | None) -> None:
    finite = base and not math.isinf(row["t"]) and not math.isinf(base["t"])
    speed = base["t"] / row["t"] if finite else math.nan
    print(f"{name:<17} {row['name']:<17} {k:>2} {_f(row['t']):>6} {'[' + _f(row['t25']) + '-' + _f(row['t75']) + ']':>13} "
          f"{row['hits']:>2}/{row['n']:<2} {_f(row['evals'], 0):>5} {speed:>5.2f} "
          + "".join(f"{m:>7.4f}" for m in row["marks"])
          + f" {row['infeasible']:>6g} {row['util']:>5.2f} {row['champion']['best']:>8.4f} "
            f"{row['champion']['mean']:>8.4f} {row['secs']:>6.0f}", flush=True)


def check_targets(table: dict, name: str, ks: list, mine: str = "nomad-async") -> list:
    """Issue 24's targets on one landscape: (met, text) for each the run's cells allow."""
    out = []

    def cell(algo, k):
        return table.get((name, algo, k))

    for k in ks:
        anchors = [cell(a, k) for a in pe.ANCHORS if cell(a, k)]
        if not anchors or not cell(mine, k):
            continue
        top = min(anchors, key=lambda row: (row["t"], -row["hits"], row["marks"][-1]))
        me = cell(mine, k)
        # both medians inf (half the studies or more missed): the one with more hits is ahead
        ahead = me["t"] < top["t"] or (me["t"] == top["t"] and me["hits"] / me["n"] >= top["hits"] / top["n"])
        out.append((ahead, f"{name} K={k}: {mine} median t1% {_f(me['t'], 2)} ({me['hits']}/{me['n']}) "
                                         f"<= best anchor {top['name']} {_f(top['t'], 2)} ({top['hits']}/{top['n']})"))
        gp = cell("optuna-gp", k)
        if name.startswith("two_basins") and gp:
            out.append((me["hits"] / me["n"] >= gp["hits"] / gp["n"],   # fractions: cells may have fewer GP seeds
                        f"{name} K={k}: {mine} hits {me['hits']}/{me['n']} >= optuna-gp's {gp['hits']}/{gp['n']}"))
        tpe = cell("optuna-tpe", k)
        if name.startswith("constrained") and tpe and 50 in MARKS:
            i = MARKS.index(50)
            out.append((me["infeasible"] <= tpe["infeasible"],
                        f"{name} K={k}: {mine} median infeasible {me['infeasible']:g} <= constrained "
                        f"{tpe['name']}'s {tpe['infeasible']:g}"))
            out.append((me["marks"][i] <= tpe["marks"][i] + 1e-4,
                        f"{name} K={k}: {mine} median best feasible @50 {me['marks'][i]:.5f} <= {tpe['name']}'s "
                        f"{tpe['marks'][i]:.5f}"))
    base = cell(mine, 1)
    for k, limit in ((4, 0.30), (8, 0.22)):
        if base and cell(mine, k):
            ratio = cell(mine, k)["t"] / base["t"] if not math.isinf(base["t"]) else math.nan
            out.append((ratio <= limit, f"{name}: {mine} t1% K={k} / K=1 = {_f(cell(mine, k)['t'], 2)} / "
                                        f"{_f(base['t'], 2)} = {ratio:.3f} <= {limit}"))
    return out


def precompute(names: list, ks: list, seeds: list, budget: int, cache: Cache, algos: list) -> None:
    """Fill the cache K by K (all landscapes at K=1 first), in the order of ``algos``."""
    lands = suite()
    for k in ks:
        for algo in algos:
            for name in names:
                for ordered in variants(algo):
                    start = time.perf_counter()
                    outcomes = run_studies(algo, name, lands[name], k, budget, seeds, ordered, cache)
                    hits = sum(not math.isinf(o.t_hit) for o in outcomes)
                    print(f"cached {algo} {name} K={k} ordered={ordered}: {hits}/{len(outcomes)} hits, "
                          f"{time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (to split a long run)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=pe.ALGOS)
    parser.add_argument("--landscapes", nargs="+", default=None, help="a subset of suite()'s names")
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--cache", type=Path, default=None, help="JSON file of the anchor studies' outcomes")
    parser.add_argument("--precompute", action="store_true", help="only fill --cache with the studies")
    parser.add_argument("--read", nargs="*", default=[], help="more cache files to read (not written)")
    parser.add_argument("--cached-only", action="store_true",
                        help="report the cached studies only (a cell shows how many seeds it has)")
    parser.add_argument("--rechampion", action="store_true", help="recompute cached studies' champions")
    parser.add_argument("--anchor-rows", type=Path, default=None,
                        help="take the anchors' cells that the cache lacks from this earlier report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    lands = suite()
    names = args.landscapes or list(lands)
    unknown = sorted(set(names) - set(lands))
    if unknown:
        parser.error(f"--landscapes {unknown} unknown; valid: {list(lands)}")
    earlier = report_rows(args.anchor_rows) if args.anchor_rows else {}
    if args.anchor_rows and not earlier:
        parser.error(f"--anchor-rows {args.anchor_rows}: no anchor row found; give a report of this script")
    cache = Cache(args.cache, args.cached_only, args.read)
    cache.rechampion = args.rechampion
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    if args.precompute:
        return precompute(names, args.k, seeds, args.budget, cache, args.algos)
    print(f"budget {args.budget}, seeds 0..{args.seeds - 1}, noise sd {NOISE} (-noisy), times in mean trial "
          f"lengths; medians over seeds")
    if earlier:
        print(f"anchor cells the cache lacks are {args.anchor_rows}'s rows ({len(earlier)} there; secs 0)")
    print(HEADER)
    table = {}
    for name in names:
        for algo in args.algos:
            for k in args.k:
                # an anchor cell of the earlier report: its cached studies if any, never simulated, else that row
                cache.only = args.cached_only or (name, algo, k) in earlier
                row = run_cell(algo, name, lands[name], k, args.budget, seeds, cache) or earlier.get((name, algo, k))
                if row is not None:
                    table[name, algo, k] = row
                    print_row(name, k, row, table.get((name, algo, 1)))
    results = [t for name in names for t in check_targets(table, name, args.k)]
    for name in names:
        for k in args.k:
            if table.get((name, "tpe", k)) and any(table.get((name, a, k)) for a in pe.ANCHORS):
                results += [(ok, "tpe: " + text) for ok, text in check_targets(table, name, [k], mine="tpe")[:1]]
    print("\ntargets (issue 24):")
    for ok, text in results:
        print(f"  [{'met' if ok else 'MISSED'}] {text}")
    print(f"{sum(ok for ok, _ in results)} of {len(results)} met")


if __name__ == "__main__":
    main()
