"""Downstream scores of a study's best adapters: one job per adapter, on the trial runner, tracked, resumable.

    python -m orchestrator evaluate --study llama2-nomad --top 10 --include-default
    python -m orchestrator evaluate --study tiny-nomad --top 2 --tasks mmlu,humaneval --limit 2 --data-dir DIR
    python -m orchestrator evaluate --study tiny-nomad --top 3 --harness lm-eval --tasks hellaswag

Picks the study's K best trials by its champion rule (orchestrator/search/champion.py: feasible trials only;
with two objectives the rule's pick first, then the front) and, with --include-default, the trial at the search
space's default point; submits one evaluation job per adapter (evaluation.job.EvaluationJob, with the study's
resources but one task and at most one GPU: the evaluator runs one process on one device), logs each job's
scores into the trial's child run and the poster's table into the study's parent run (eval/poster_table.md,
top{K}_mean_mmlu, default_mmlu, ...), all through the tracker's durable outbox (evaluate-outbox.jsonl).

Resumable like the study: every decision is appended (and fsynced) to `<study folder>/evaluate.jsonl` before it
is acted on; the jobs run on the study's trial runner (orchestrator/study/runner.py), so a rerun does not redo a
finished evaluation (same trial, same settings), re-attaches jobs still running, adopts jobs a crash left
unjournaled, and replays MLflow writes a crash left queued. A failed evaluation is recorded (tag
eval_status=failed on the child run) and the others go on; when every one failed, the command exits 1.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from evaluation.job import EvaluationJob
from evaluation.tracking import INSTRUCTEVAL
from jobs.contract import OK, EvaluationResult
from orchestrator.config import ConfigError, StudyConfig
from orchestrator.search.champion import top
from orchestrator.search.criteria import Judge
from orchestrator.study.jobset import JobSet
from orchestrator.study.journal import Journal
from orchestrator.study.lock import locked
from orchestrator.study.runner import Item, fold_items
from slurm.dispatch import Task
from slurm.executors import Resources

CLI_SETTINGS = ("harness", "tasks", "limit", "data_dir", "include_path", "seed", "humaneval_cut", "decoding",
                "temperature", "top_p", "seeds", "dtype", "merge", "batch_size")
RESULT_FILE = "job_result.json"


def settings_of(args, config: StudyConfig) -> dict:
    """The evaluation settings: the study's `evaluation:` section (InstructEval's protocol by default),
    overridden by the flags given on the command line; validated (ConfigError naming the field)."""
    from evaluation.spec import ProtocolError, evaluation_settings

    given = {k: getattr(args, k, None) for k in CLI_SETTINGS}
    given = {k: v for k, v in given.items() if v is not None}
    if getattr(args, "greedy", False):
        given["decoding"] = "greedy"
    if isinstance(given.get("seeds"), str):
        try:
            given["seeds"] = [int(x) for x in given["seeds"].split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r} is invalid: write comma-separated integers, e.g. 0,1,2") \
                from None
    merged = {**config.evaluation_settings(), **given}
    if config.heldout:  # a held-out study: its test scores leave out the dev items its trials saw
        merged.update(split="test", dev_sizes=dict(config.heldout.tasks), split_seed=int(config.heldout.seed))
    if merged.get("harness") == "lm-eval" and "tasks" not in given:
        raise ConfigError("--harness lm-eval needs --tasks: lm-eval task names, comma-separated")
    merged["tasks"] = merged.get("tasks") or ",".join(INSTRUCTEVAL)
    try:
        return evaluation_settings(merged)
    except ProtocolError as e:
        raise ConfigError(str(e)) from None


def select(state, config: StudyConfig, k: int, include_default: bool, log=print) -> dict[int, list[str]]:
    """{trial: roles}: the study's `k` best trials by its champion rule ("top"), and the default point's."""
    ok = [t for t in state.finished if t.ok]
    best = top(state.finished, Judge(config), k)
    chosen = {t.trial: ["top"] for t in best}
    if len(best) < k:
        log(f"note: the study has {len(best)} successful trial(s) its champion rule ranks, fewer than --top {k}: "
            "evaluating those")
    if include_default:
        space = config.space
        default = space.key(space.default_point())
        at_default = sorted((t for t in ok if space.key(t.point) == default), key=lambda t: t.trial)
        if at_default:
            chosen.setdefault(at_default[0].trial, []).append("default")
        else:
            log(f"note: no successful trial of this study is at the default point {space.default_point()}: the "
                "default adapter was never trained here, so it is skipped. Train it with a one-evaluation study, "
                f"python -m orchestrator --algo default --study {config.study}-default (same --config), and "
                "evaluate that study")
    return chosen


def eval_resources(resources: Resources) -> Resources:
    """The study's resources for one evaluation process: one task, at most one GPU."""
    res = resources.to_dict()
    res["gpus_per_node"] = min(1, int(res.get("gpus_per_node") or 0))
    res["tasks_per_node"], res["nodes"] = 1, 1
    return Resources.from_dict(res)


def _read_result(record: dict) -> EvaluationResult:
    return EvaluationResult.from_dict({k: record.get(k) for k in ("status", "reason", "scores")})


def load_evaluations(journal: Journal):
    """evaluate.jsonl folded: its executor, items (each with its trial, run id, roles and evaluation spec) and
    dispatch batches."""
    return fold_items(journal, "evaluation", _read_result)


class Evaluator:
    def __init__(self, args, log=print):
        self.args, self.log = args, log
        self.js = JobSet.open(args, name="evaluate", item_event="evaluation", read_result=_read_result,
                              task_of=self._task, log=log, what="evaluation",
                              on_submitted=lambda job, a: log(f"{self._label(job.key)}: evaluation job {a.job_id}"),
                              resources_of=lambda config: eval_resources(config.resources))
        self.folder, self.study, self.config, self.set = self.js.folder, self.js.study, self.js.config, self.js.set
        self.journal, self.tracker = self.js.journal, self.js.tracker

    def run(self) -> dict:
        with self.js.finishing("the evaluations"):
            self.js.snapshot()
            wanted = self._plan()
            self.js.runner.adopt([e.job for e in wanted if e.status is None], self.set.batches, self.set.jobs)
            self.js.runner.run(self._collect, self.args.poll_s)
            for e in wanted:
                if e.status == OK and not e.logged:
                    self._log(e)
            table = self._poster(wanted)
        return {**table, "evaluations": {e.key: e.status for e in wanted}}

    def _task(self, job) -> Task:
        e = self.set.items[job.key]
        out = e.data["spec"]["out"]
        return Task(e.key, EvaluationJob(), (e.data["spec"],), attempt=job.attempt, folder=out,
                    result_file=str(Path(out) / RESULT_FILE), result_type=EvaluationResult)

    def _label(self, key: str) -> str:
        return f"trial {self.set.items[key].data['trial']}"

    # ------------------------------------------------------------------------------------------- plan
    def _plan(self) -> list[Item]:
        from evaluation.spec import EvaluationSpec

        settings = settings_of(self.args, self.config)
        # the settings (the protocol among them) name an evaluation: other settings, another evaluation
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        wanted = []
        for trial, roles in sorted(select(self.study, self.config, self.args.top, self.args.include_default,
                                          self.log).items()):
            key = f"trial-{trial:04d}-{digest}"
            if key not in self.set.items:
                t = self.study.trials[trial]
                adapter = Path(t.out or "") / "adapter"
                spec = EvaluationSpec.from_dict({
                    **settings, "base": self.config.trial.base_model, "tracking_uri": self.config.tracking(),
                    "adapter": str(adapter) if adapter.is_dir() else f"runs:/{t.run_id}/adapter",
                    "out": str((self.folder / "evaluations" / key).resolve())}).to_dict()
                record = {"key": key, "trial": trial, "run_id": t.run_id, "roles": roles, "spec": spec}
                self.journal.append("evaluation", **record)
                self.set.items[key] = Item(key, record)
            e = self.set.items[key]
            if e.status == "failed" and self.args.retry_failed:
                self.journal.append("retry", key=key, fresh=True)
                e.status, e.reason, e.result, e.logged = None, None, None, False
                e.job.job_id, e.job.retries, e.job.attempt = None, 0, e.job.attempt + 1
            if e.status is not None:
                self.log(f"trial {trial}: evaluated already ({e.status}), not redone")
            wanted.append(e)
        return wanted

    # ------------------------------------------------------------------------------------------- results
    def _collect(self, job, attempt, outcome) -> None:
        e = self.set.items[job.key]
        result = outcome.result
        self.journal.append("result", key=e.key, status=result.status, reason=result.reason, scores=result.scores)
        e.status, e.reason, e.result = result.status, result.reason, result
        if result.ok:
            self._log(e)
            self.log(f"{self._label(e.key)}: "
                     f"{', '.join(f'{k} {100 * v:.2f}' for k, v in result.scores.items() if v is not None)}")
        else:
            self.log(f"{self._label(e.key)}: evaluation FAILED: {result.reason}")
            if e.data.get("run_id"):
                self.tracker.tag(f"run:{e.data['run_id']}", run_id=e.data["run_id"], eval_status="failed",
                                 eval_failure_reason=(result.reason or "")[:5000])
        self.tracker.flush()

    def _log(self, e: Item) -> None:
        spec = e.data["spec"]
        path = Path(spec["out"]) / "scores.json"
        scores = e.result.scores if e.result is not None else {}
        result = json.loads(path.read_text()) if path.exists() else {"scores": scores}
        if spec["harness"] == "lm-eval":
            result.setdefault("harness", "lm-eval")
        if e.data.get("run_id"):
            self.tracker.log_scores(e.data["run_id"], result, tags={
                "eval_status": "ok", "eval_default": str("default" in e.data["roles"]).lower(), "eval_key": e.key,
                "eval_job_id": e.job.job_id, "eval_settings": json.dumps(settings_from_spec(spec), default=str)})
            self.tracker.flush()
        self.journal.append("logged", key=e.key)  # queued durably: the outbox writes it, after a crash too
        e.logged = True

    def _poster(self, wanted: list[Item]) -> dict:
        from evaluation.tracking import collect, markdown, poster_table
        from jobs.tracking_store import client

        failed = [e for e in wanted if e.status != OK]
        if not self.tracker.wait(3600, idle_s=600):  # the scores must be in the store before it is read
            raise ConfigError(f"MLflow took no write for 10 minutes ({self.tracker.status()}): rerun the same "
                              "command when the tracking store is back")
        table = poster_table(collect(client(self.config.tracking()), [self.study.parent_run_id]), self.args.top) \
            if self.study.parent_run_id else {"top": self.args.top, "scores": [], "rows": []}
        if table["rows"]:
            self.tracker.log_poster(self.study.parent_run_id, table)
            self.log(markdown(table))
        self.log(f"evaluations: {len(wanted) - len(failed)} ok, {len(failed)} failed"
                 + (f" ({', '.join(self._label(e.key) for e in failed)}: see the reasons above)" if failed else ""))
        return table


def settings_from_spec(spec: dict) -> dict:
    from evaluation.spec import settings_keys
    return {k: spec.get(k) for k in settings_keys() if k in spec}


def evaluate_study(args, log=print) -> dict:
    if not isinstance(args.top, int) or args.top < 1:
        raise ConfigError(f"--top {args.top!r} is invalid: give the number of best trials to evaluate (>= 1)")
    return locked(args.workdir, args.study, "evaluate.lock", "the evaluation", lambda: Evaluator(args, log).run())


def main(args) -> int:
    """`python -m orchestrator evaluate` (see the module docstring): 0 done, 1 every evaluation failed."""
    try:
        done = evaluate_study(args, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: evaluation jobs go on; rerun the same command to re-attach them", file=sys.stderr)
        return 130
    statuses = list(done["evaluations"].values())
    if statuses and all(s != OK for s in statuses):
        print(f"error: every evaluation of study {args.study!r} failed (see the reasons above)", file=sys.stderr)
        return 1
    return 0
