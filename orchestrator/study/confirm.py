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

The chosen point's adapter (its original trial's) becomes `<model>@champion`, its version tagged with the
mean, sd, N, seeds and rule. MLflow: a `confirm` run under the study's parent run, one child run per retrain,
the table as confirm_table.md there and in the study's parent run. Resumable like a study: every retrain is
journaled (confirm.jsonl) before its job is submitted; a rerun re-attaches running jobs and redoes nothing.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

from jobs.contract import RESULT_FILE, TrialResult
from jobs.entry import FinetuneTrial
from orchestrator.config import ConfigError, load_config
from orchestrator.study.runner import Item, JobSet, fold, locked_run
from orchestrator.study.journal import Journal
from orchestrator.tracking.outbox import Outbox
from orchestrator.study.progress import point_text
from orchestrator.tracking.tracker import artifact_location
from slurm.dispatch import Dispatcher, Outcome, Task
from slurm.executors import snapshot_code

RULES = ("mean", "upper")
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def upper_bound(values: list[float]) -> float:
    """The upper end of the 95% confidence interval of the mean (Student's t); +inf with one value."""
    if len(values) < 2:
        return math.inf
    t = T95.get(len(values) - 1, 1.96)
    return statistics.mean(values) + t * statistics.stdev(values) / math.sqrt(len(values))


class Confirmer:
    def __init__(self, args, log=print):
        from orchestrator.tracking.tracker import load_study

        self.args, self.log = args, log
        self.folder = Path(args.workdir) / args.study
        self.study = load_study(self.folder)
        saved = {k: v for k, v in self.study.config.items() if k != "executor_resolved"}
        self.config = load_config(None, **saved)
        if self.config.function is not None:
            raise ConfigError(f"study {args.study!r} tuned an objective function: confirm retrains fine-tunes only")
        self.journal = Journal(self.folder / "confirm.jsonl")
        recorded, self.items, self.batches = fold(self.journal, item_event="retrain")
        kind = recorded or args.executor or self.study.config.get("executor_resolved") or "auto"
        self.code = self.folder / "code" if (self.folder / "code").is_dir() else self.folder / "confirm-code"
        self.dispatcher = Dispatcher(kind, self.folder / "confirm-submitit", self.config.resources,
                                     job_name=f"{args.study}-confirm", code_dir=self.code,
                                     record=self.journal.append)
        if recorded is None:
            self.journal.append("start", executor=self.dispatcher.kind, top=args.top, seeds=args.seeds)
        self.jobs = JobSet(self.dispatcher, self.journal, self.config.retries, self._task, log=log, what="retrain")
        from jobs import tracking_store
        uri = tracking_store.resolve(args.tracking_uri or self.config.tracking_uri)
        self.outbox = Outbox(self.folder / "confirm-outbox.jsonl", uri, self.config.study,
                             self.study.study_uid or "", artifact_location=artifact_location(uri, self.config.study),
                             log=log)

    def run(self) -> dict:
        if self.dispatcher.kind in ("slurm", "local"):
            snapshot_code(self.code)  # the study's own snapshot when it has one: the same code retrains
        self.outbox.start()
        chosen = self._plan()
        todo = [i for i in self.items.values() if i.status is None]
        self.jobs.run(todo, self.items, self.batches, self._done, self.args.poll_s,
                      label=lambda i: f"trial {i.data['trial']} seed {i.data['seed']}")
        table = self._table(chosen)
        self._publish(table)
        drained = self.outbox.close(wait_s=3600, idle_s=600)
        if not drained:
            raise ConfigError(f"MLflow took no write for 10 minutes: the confirmation is journaled; run the same "
                              f"command again when the tracking store is back ({self.outbox.status()})")
        return table

    # ------------------------------------------------------------------------------------------- plan
    def _plan(self) -> list:
        ok = sorted((t for t in self.study.finished if t.status == "ok"), key=lambda t: (t.value, t.trial))
        if not ok:
            raise ConfigError(f"study {self.args.study!r} has no successful trial to confirm: run it first")
        chosen = ok[:self.args.top]
        if not self.outbox.has("create:confirm"):
            self.outbox.put("create_run", mark="create:confirm", key="confirm", name=f"{self.config.study}-confirm",
                            parent_id=self.study.parent_run_id,
                            tags={"role": "confirm", "study": self.config.study, "rule": self.args.rule})
        base_seed = int(self.config.trial.get("seed", 42))
        for t in chosen:
            for k in range(1, self.args.seeds + 1):
                seed = base_seed + k
                key = f"trial-{t.trial:04d}-seed-{seed}"
                if key in self.items:
                    continue
                out = str((self.folder / "confirm" / key).resolve())
                spec = self.config.trial_spec(t.point, out).to_dict() | {"seed": seed}
                record = {"key": key, "trial": t.trial, "seed": seed, "spec": spec}
                self.journal.append("retrain", **record)
                self.items[key] = Item(key, record)
                self.outbox.put("create_run", mark=f"create:{key}", key=key, parent="confirm", name=key,
                                tags={"role": "retrain", "trial": str(t.trial), "seed": str(seed)})
                self.outbox.put("log_batch", key=key, params={**{k2: str(v) for k2, v in t.point.items()},
                                                             "seed": str(seed)})
        self.outbox.flush()
        return chosen

    def _task(self, item: Item) -> Task:
        out = item.data["spec"]["out"]
        return Task(item.key, FinetuneTrial(), (item.data["spec"],), attempt=item.attempt, folder=out,
                    result_file=str(Path(out) / RESULT_FILE))

    def _done(self, item: Item, outcome: Outcome) -> None:
        result = TrialResult.from_dict(outcome.result) if outcome.status == "done" else \
            TrialResult.failed(outcome.reason or "the job failed")
        self.journal.append("result", key=item.key, status=result.status, reason=result.reason, value=result.value)
        item.status, item.reason, item.result = result.status, result.reason, {"value": result.value}
        said = f"val_loss {result.value:.4f}" if result.ok else f"FAILED: {result.reason}"
        self.log(f"trial {item.data['trial']} seed {item.data['seed']}: {said}")
        metrics = [["val_loss", result.value, _now_ms(), 0]] if result.ok else []
        self.outbox.put("log_batch", key=item.key, metrics=metrics, tags={"status": result.status})
        if Path(item.data["spec"]["out"], RESULT_FILE).exists():
            self.outbox.put("log_artifact", key=item.key, path=str(Path(item.data["spec"]["out"]) / RESULT_FILE))
        self.outbox.put("set_status", key=item.key, status="FINISHED" if result.ok else "FAILED", end_time=_now_ms())
        self.outbox.flush()

    # ------------------------------------------------------------------------------------------- the result
    def _table(self, chosen: list) -> dict:
        rows = []
        for t in chosen:
            values = [i.result["value"] for i in self.items.values()
                      if i.data["trial"] == t.trial and i.status == "ok" and i.result.get("value") is not None]
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
        self.outbox.put("log_text", key="confirm", text=text, file="confirm_table.md")
        self.outbox.put("log_text", key="confirm", run_id=self.study.parent_run_id, text=text,
                        file="confirm_table.md")
        self.outbox.put("log_text", key="confirm", text=json.dumps(table, indent=2, default=str),
                        file="confirm_table.json")
        champion = table["champion"]
        if champion is None or self.args.register_as == "":
            return
        name = self.args.register_as or self.config.register_as or f"{self.config.study}-adapter"
        tags = {"confirm_rule": table["rule"], "confirm_mean": f"{champion['mean']:.6f}",
                "confirm_sd": f"{champion['sd']:.6f}" if champion["sd"] is not None else "-",
                "confirm_n": str(champion["n"]), "confirm_seeds": json.dumps([v for v in champion["values"]]),
                "trial": str(champion["trial"]), "val_loss": str(champion["original"])}
        self.outbox.put("register", mark=f"confirm-register:{name}:{champion['trial']}", key="confirm",
                        run_id=champion["run_id"], name=name, alias="champion", artifact_path="adapter", tags=tags)
        self.outbox.put("set_status", key="confirm", status="FINISHED", end_time=_now_ms())
        self.journal.append("registered", name=name, trial=champion["trial"], uri=f"models:/{name}@champion",
                            mean=champion["mean"], sd=champion["sd"])
        self.log(f"champion: trial {champion['trial']} (mean {champion['mean']:.4f} over {champion['n']} seeds) as "
                 f"models:/{name}@champion")


def _now_ms() -> int:
    import time
    return int(time.time() * 1000)


def confirm_study(args, log=print) -> dict:
    for name, low in (("top", 1), ("seeds", 2)):
        value = getattr(args, name)
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name} {value!r} is invalid: give an integer >= {low}")
    return locked_run(args.workdir, args.study, "confirm.lock", "the confirmation",
                      lambda: Confirmer(args, log).run())


def main(args) -> int:
    try:
        confirm_study(args, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: retrain jobs go on; rerun the same command to re-attach them", file=sys.stderr)
        return 130
    return 0
