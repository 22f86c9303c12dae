"""A robust champion: retrain a study's best points with new seeds, register the best on average.

    python -m orchestrator confirm --study tiny-nomad --top 3 --seeds 3            # mean rule
    python -m orchestrator confirm --study tiny-nomad --top 3 --seeds 5 --rule upper   # risk-averse

A study's best point is the best of single runs: with one seed per point, the ranking of near points is as
much the seeds' as the hyperparameters' (the paper's MMLU 46.24 vs 46.08 are within run-to-run noise). This
retrains each of the `--top` K successful trials with N new seeds (the trial seed + 1 ... + N: the data order,
the LoRA initialisation and dropout change) as jobs beside the study, and ranks the points by:

- `mean` (default): the mean validation loss over the N new runs (the original run, chosen for being
  lowest, is left out of the statistics: it is biased low, the winner's curse);
- `upper`: the upper 95% confidence bound of that mean (mean + t(0.975, N-1) sd / sqrt(N)): the point whose
  loss is most surely low, for when a bad surprise costs more than a small gain.

The `--top` K points are the study's best by its champion rule (orchestrator/search/champion.py: feasible
trials only; two objectives: the rule's pick, then the front). The chosen point's adapter (its original trial's)
becomes `<model>@champion`, its version tagged with the mean, sd, N, seeds and rule. MLflow: a `confirm` run
under the study's parent run (ended FINISHED, FAILED or KILLED on every path out), one child run per retrain,
the table as confirm_table.md there and in the study's parent run, all through the tracker's durable outbox
(confirm-outbox.jsonl). Resumable like a study: every retrain is journaled (confirm.jsonl) before its job is
submitted and runs on the study's trial runner; a rerun re-attaches running jobs, redoes nothing, and queues
again whatever MLflow write a kill left unqueued (a retrain's run, its result).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from jobs.contract import OK, RESULT_FILE, TrialResult
from jobs.entry import FinetuneTrial
from orchestrator.config import ConfigError
from orchestrator.reports.text import point_text
from orchestrator.search.champion import top
from orchestrator.search.criteria import Judge
from orchestrator.study.jobset import JobSet
from orchestrator.study.journal import Journal
from orchestrator.study.lock import locked
from orchestrator.study.runner import Item, fold_items
from slurm.dispatch import Task

RULES = ("mean", "upper")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
RUN = "confirm"


def upper_bound(values: list[float]) -> float:
    """The upper end of the 95% confidence interval of the mean (Student's t); +inf with one value."""
    if len(values) < 2:
        return math.inf
    t = T95.get(len(values) - 1, 1.96)
    return statistics.mean(values) + t * statistics.stdev(values) / math.sqrt(len(values))


def _read_result(record: dict) -> TrialResult:
    return TrialResult.from_dict({k: record.get(k) for k in ("status", "reason", "value")})


def load_retrains(journal: Journal):
    return fold_items(journal, "retrain", _read_result)


def _fine_tunes_only(config) -> None:
    if config.function is not None:
        raise ConfigError(f"study {config.study!r} tuned an objective function: confirm retrains fine-tunes only")


class Confirmer:
    def __init__(self, args, log=print):
        self.args, self.log = args, log
        folder = Path(args.workdir) / args.study
        code = folder / "code" if (folder / "code").is_dir() else None  # the study's own: the same code retrains
        self.js = JobSet.open(args, name="confirm", item_event="retrain", read_result=_read_result,
                              task_of=self._task, log=log, what="retrain", code=code,
                              start={"top": args.top, "seeds": args.seeds}, check=_fine_tunes_only,
                              on_retry=lambda job, o: log(f"{job.key}: {o.reason}; attempt {job.attempt + 1} "
                                                          "submitted"))
        self.folder, self.study, self.config, self.set = self.js.folder, self.js.study, self.js.config, self.js.set
        self.journal, self.tracker = self.js.journal, self.js.tracker

    def run(self) -> dict:
        with self.js.finishing("the retrains"):
            self.js.snapshot()
            with self.tracker.run(RUN, f"{self.config.study}-confirm", parent_id=self.study.parent_run_id,
                                  tags={"role": "confirm", "study": self.config.study, "rule": self.args.rule}):
                chosen = self._plan()
                todo = [i for i in self.set.items.values() if i.status is None]
                self.js.runner.adopt([i.job for i in todo], self.set.batches, self.set.jobs)
                self.js.runner.run(self._done, self.args.poll_s)
                table = self._table(chosen)
                self._publish(table)
        return table

    # ------------------------------------------------------------------------------------------- plan
    def _plan(self) -> list:
        chosen = top(self.study.finished, Judge(self.config), self.args.top)
        if not chosen:
            raise ConfigError(f"study {self.args.study!r} has no successful trial to confirm: run it first")
        base_seed = int(self.config.trial.seed)
        for t in chosen:
            for k in range(1, self.args.seeds + 1):
                seed = base_seed + k
                key = f"trial-{t.trial:04d}-seed-{seed}"
                if key in self.set.items:
                    continue
                out = str((self.folder / "confirm" / key).resolve())
                spec = self.config.trial_spec(t.point, out).to_dict() | {"seed": seed}
                record = {"key": key, "trial": t.trial, "seed": seed, "spec": spec}
                self.journal.append("retrain", **record)
                self.set.items[key] = Item(key, record)
        for item in self.set.items.values():  # every journaled retrain has its run, and a finished one its result
            self._open_run(item)
            if item.status is not None:
                self._finish_run(item)
        self.tracker.flush()
        return chosen

    def _open_run(self, item: Item) -> None:
        t = self.study.trials[item.data["trial"]]
        self.tracker.open_run(item.key, item.key, {"role": "retrain", "trial": str(t.trial),
                                                   "seed": str(item.data["seed"])},
                              parent=RUN, params={**t.point, "seed": item.data["seed"]})

    def _finish_run(self, item: Item) -> None:
        result = item.result
        self.tracker.finish_run(item.key, result.status, result.value, {}, result.reason,
                                      item.data["spec"]["out"])

    def _task(self, job) -> Task:
        item = self.set.items[job.key]
        out = item.data["spec"]["out"]
        return Task(item.key, FinetuneTrial(), (item.data["spec"],), attempt=job.attempt, folder=out,
                    result_file=str(Path(out) / RESULT_FILE))

    def _done(self, job, attempt, outcome) -> None:
        item = self.set.items[job.key]
        result = outcome.result
        self.journal.append("result", key=item.key, status=result.status, reason=result.reason, value=result.value)
        item.status, item.reason, item.result = result.status, result.reason, result
        said = f"val_loss {result.value:.4f}" if result.ok else f"FAILED: {result.reason}"
        self.log(f"trial {item.data['trial']} seed {item.data['seed']}: {said}")
        self._finish_run(item)
        self.tracker.flush()

    # ------------------------------------------------------------------------------------------- the result
    def _table(self, chosen: list) -> dict:
        rows = []
        for t in chosen:
            values = [i.result.value for i in self.set.items.values()
                      if i.data["trial"] == t.trial and i.status == OK and i.result.value is not None]
            mean = statistics.mean(values) if values else math.inf
            sd = statistics.stdev(values) if len(values) > 1 else None
            rows.append({"trial": t.trial, "point": t.point, "original": t.value, "n": len(values), "mean": mean,
                         "sd": sd, "upper": upper_bound(values), "values": values, "run_id": t.run_id})
        key = "mean" if self.args.rule == "mean" else "upper"
        rows.sort(key=lambda r: (r[key], r["mean"]))
        return {"rule": self.args.rule, "seeds": self.args.seeds, "rows": rows,
                "champion": rows[0] if rows and math.isfinite(rows[0]["mean"]) else None}

    def _publish(self, table: dict) -> None:
        names = list(self.config.space.names)
        lines = ["| rank | trial | point | original | mean | sd | upper 95% | n |", "|---|---|---|---|---|---|---|---|"]
        for k, r in enumerate(table["rows"], 1):
            sd = f"{r['sd']:.4f}" if r["sd"] is not None else "-"
            lines.append(f"| {k} | {r['trial']} | {point_text(r['point'], names)} | {r['original']:.4f} | "
                         f"{r['mean']:.4f} | {sd} | {r['upper']:.4f} | {r['n']} |")
        text = "\n".join(lines) + f"\n\nrule: {table['rule']}; {table['seeds']} new seeds per point (the original run " \
                                  "is left out of the mean and sd)\n"
        self.log(text)
        self.tracker.log_text(RUN, text, "confirm_table.md")
        if self.study.parent_run_id:
            self.tracker.log_text(RUN, text, "confirm_table.md", run_id=self.study.parent_run_id)
        self.tracker.log_dict(RUN, table, "confirm_table.json")
        champion = table["champion"]
        name = self.config.register_name if self.args.register_as is None else (self.args.register_as or None)
        if champion is None or name is None:
            self.log("champion: none registered" + (" (no point has a successful retrain)" if champion is None
                                                    else " (--register-as '')"))
            return
        tags = {"confirm_rule": table["rule"], "confirm_mean": f"{champion['mean']:.6f}",
                "confirm_sd": f"{champion['sd']:.6f}" if champion["sd"] is not None else "-",
                "confirm_n": str(champion["n"]), "confirm_seeds": json.dumps(list(champion["values"])),
                "trial": str(champion["trial"]), "val_loss": str(champion["original"])}
        self.tracker.register(name, RUN, tags, run_id=champion["run_id"],
                              mark=f"confirm-register:{name}:{champion['trial']}")
        if not any(r.get("name") == name and r.get("trial") == champion["trial"] for r in self.set.registered):
            self.journal.append("registered", name=name, trial=champion["trial"], uri=f"models:/{name}@champion",
                                mean=champion["mean"], sd=champion["sd"])
        self.log(f"champion: trial {champion['trial']} (mean {champion['mean']:.4f} over {champion['n']} seeds) as "
                 f"models:/{name}@champion")


def confirm_study(args, log=print) -> dict:
    for name, low in (("top", 1), ("seeds", 2)):
        value = getattr(args, name)
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name} {value!r} is invalid: give an integer >= {low}")
    return locked(args.workdir, args.study, "confirm.lock", "the confirmation", lambda: Confirmer(args, log).run())


def main(args) -> int:
    try:
        confirm_study(args, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: retrain jobs go on; rerun the same command to re-attach them", file=sys.stderr)
        return 130
    return 0
