"""Downstream scores of a study's best adapters: one submitit job per adapter, tracked, resumable.

    python -m orchestrator evaluate --study llama2-nomad --top 10 --include-default
    python -m orchestrator evaluate --study tiny-nomad --top 2 --tasks mmlu,humaneval --limit 2 --data-dir DIR
    python -m orchestrator evaluate --study tiny-nomad --top 3 --harness lm-eval --tasks hellaswag

Picks the K successful trials of lowest validation loss (and, with --include-default, the trial at the
search space's default point), submits one evaluation job per adapter (evaluation.job.EvaluationJob, with the
study's resources but one task and at most one GPU: the evaluator runs one process on one device), logs each
job's scores into the trial's child run (evaluation.tracking.log_scores) and the poster's table into the
study's parent run (eval/poster_table.md, top{K}_mean_mmlu, default_mmlu, ...).

Resumable like the study: every decision is appended (and fsynced) to `<study folder>/evaluate.jsonl`
before it is acted on. A rerun does not redo a finished evaluation (same trial, same settings), re-attaches
jobs still running by their job id, and logs to MLflow what a crash left unlogged. A failed evaluation job is
recorded (tag eval_status=failed on the child run) and the others go on. Only this process writes MLflow.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from evaluation.job import EvaluationJob
from evaluation.tracking import INSTRUCTEVAL
from jobs import tracking_store
from orchestrator.config import ConfigError, load_config
from orchestrator.study.runner import Item, JobSet, fold, locked_run
from orchestrator.study.journal import Journal, StudyState
from slurm.dispatch import Dispatcher, Outcome, RetryPolicy, Task
from slurm.executors import Resources, snapshot_code


CLI_SETTINGS = ("harness", "tasks", "limit", "data_dir", "include_path", "seed", "humaneval_cut", "decoding",
                "temperature", "top_p", "seeds", "dtype", "merge", "batch_size")


def settings_of(args, study_config: dict | None = None) -> dict:
    """The evaluation settings: the study YAML's `evaluation:` section (InstructEval's protocol by default),
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
    merged = {**((study_config or {}).get("evaluation") or {}), **given}
    heldout = (study_config or {}).get("objective")
    if isinstance(heldout, dict):  # a held-out study: its test scores leave out the dev items its trials saw
        merged.update(split="test", dev_sizes=dict(heldout["tasks"]), split_seed=int(heldout.get("seed", 0)))
    if merged.get("harness") == "lm-eval" and not merged.get("tasks"):
        raise ConfigError("--harness lm-eval needs --tasks: lm-eval task names, comma-separated")
    merged.setdefault("tasks", ",".join(INSTRUCTEVAL))
    try:
        return evaluation_settings(merged)
    except ProtocolError as e:
        raise ConfigError(str(e)) from None


def select(state: StudyState, top: int, include_default: bool, log=print) -> dict[int, list[str]]:
    """{trial: roles}: the `top` successful trials of lowest loss ("top"), and the default point's ("default")."""
    ok = sorted((t for t in state.finished if t.status == "ok"), key=lambda t: (t.value, t.trial))
    chosen = {t.trial: ["top"] for t in ok[:top]}
    if len(ok) < top:
        log(f"note: the study has {len(ok)} successful trial(s), fewer than --top {top}: evaluating those")
    if include_default:
        config = load_config(None, **{k: v for k, v in state.config.items() if k != "executor_resolved"})
        space = config.search_space()
        default = space.key(space.default_point())
        at_default = [t for t in ok if space.key(t.point) == default]
        if at_default:
            chosen.setdefault(at_default[0].trial, []).append("default")
        else:
            log(f"note: no successful trial of this study is at the default point {space.default_point()}: the "
                "default adapter was never trained here, so it is skipped. Train it with a one-evaluation study, "
                f"python -m orchestrator --algo default --study {config.study}-default (same --config), and "
                "evaluate that study")
    return chosen


class Evaluator:
    def __init__(self, args, log=print):
        from orchestrator.tracking.tracker import load_study

        self.args, self.log = args, log
        self.folder = Path(args.workdir) / args.study
        self.study = load_study(self.folder)
        self.journal = Journal(self.folder / "evaluate.jsonl")
        recorded, self.evals, self.batches = load_evaluations(self.journal)
        cfg = self.study.config
        kind = recorded or args.executor or cfg.get("executor_resolved") or "auto"  # re-attach needs the same
        self.dispatcher = Dispatcher(kind, self.folder / "evaluate-submitit", eval_resources(cfg["resources"]),
                                     job_name=f"{args.study}-eval", code_dir=self.folder / "evaluate-code",
                                     record=self.journal.append)
        self.kind = self.dispatcher.kind
        if self.kind == "local":  # local jobs share this machine: honour cpus_per_task as their thread count
            os.environ.setdefault("LORA_HPO_THREADS", str(eval_resources(cfg["resources"]).cpus_per_task))
        if recorded is None:
            self.journal.append("start", executor=self.kind)
        self.jobs = JobSet(self.dispatcher, self.journal, RetryPolicy.from_dict(cfg.get("retries")), self._task,
                           log=log, what="evaluation")
        self.uri = tracking_store.resolve(args.tracking_uri or cfg.get("tracking_uri"))
        self.client = tracking_store.client(self.uri)

    def run(self) -> dict:
        if self.kind in ("slurm", "local"):
            snapshot_code(self.folder / "evaluate-code")  # jobs import this copy; a rerun keeps it
        wanted = self._plan()
        self.jobs.run([e for e in wanted if e.status is None], self.evals, self.batches, self._collect,
                      self.args.poll_s, label=lambda e: f"trial {e.data['trial']}")
        for e in wanted:
            if e.status == "ok" and not e.logged:
                self._log(e)
        return self._poster()

    def _task(self, e: Item) -> Task:
        out = e.data["spec"]["out"]
        return Task(e.key, EvaluationJob(), (e.data["spec"],), attempt=e.attempt, folder=out,
                    result_file=str(Path(out) / "job_result.json"))

    # ------------------------------------------------------------------------------------------- plan
    def _plan(self) -> list[Item]:
        from evaluation.spec import EvaluationSpec

        settings = settings_of(self.args, self.study.config)
        # the settings (the protocol among them) name an evaluation: other settings, another evaluation
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        cfg = self.study.config
        base = (cfg.get("trial") or {}).get("base_model") or "tiny"
        wanted = []
        for trial, roles in sorted(select(self.study, self.args.top, self.args.include_default, self.log).items()):
            key = f"trial-{trial:04d}-{digest}"
            if key not in self.evals:
                t = self.study.trials[trial]
                adapter = Path(t.out or "") / "adapter"
                spec = EvaluationSpec.from_dict({
                    **settings, "base": base, "tracking_uri": self.uri,
                    "adapter": str(adapter) if adapter.is_dir() else f"runs:/{t.run_id}/adapter",
                    "out": str((self.folder / "evaluations" / key).resolve())}).to_dict()
                record = {"key": key, "trial": trial, "run_id": t.run_id, "roles": roles, "spec": spec}
                self.journal.append("evaluation", **record)
                self.evals[key] = Item(key, record)
            e = self.evals[key]
            if e.status == "failed" and self.args.retry_failed:
                self.journal.append("retry", key=key, fresh=True)
                e.status, e.reason, e.job_id, e.attempt, e.retries = None, None, None, e.attempt + 1, 0
            if e.status is not None:
                self.log(f"trial {trial}: evaluated already ({e.status}), not redone")
            wanted.append(e)
        return wanted

    # ------------------------------------------------------------------------------------------- results
    def _collect(self, e: Item, outcome: Outcome) -> None:
        status, reason, scores = outcome_of(outcome)
        self.journal.append("result", key=e.key, status=status, reason=reason, scores=scores)
        e.status, e.reason, e.result = status, reason, {"scores": scores}
        trial, run_id = e.data["trial"], e.data.get("run_id")
        if status == "ok":
            self._log(e)
            self.log(f"trial {trial}: {', '.join(f'{k} {100 * v:.2f}' for k, v in scores.items() if v is not None)}")
        else:
            self.log(f"trial {trial}: evaluation FAILED: {reason}")
            if run_id:
                self.client.set_tag(run_id, "eval_status", "failed")
                self.client.set_tag(run_id, "eval_failure_reason", (reason or "")[:5000])

    # ------------------------------------------------------------------------------------------- MLflow
    def _log(self, e: Item) -> None:
        from evaluation.tracking import log_scores

        spec = e.data["spec"]
        path = Path(spec["out"]) / "scores.json"
        result = json.loads(path.read_text()) if path.exists() else {"scores": e.result.get("scores", {})}
        if spec["harness"] == "lm-eval":
            result.setdefault("harness", "lm-eval")
        log_scores(self.client, e.data.get("run_id"), result, tags={
            "eval_status": "ok", "eval_default": str("default" in e.data["roles"]).lower(), "eval_key": e.key,
            "eval_job_id": e.job_id, "eval_settings": json.dumps(settings_from_spec(spec), default=str)})
        self.journal.append("logged", key=e.key)
        e.logged = True

    def _poster(self) -> dict:
        from evaluation.tracking import collect, log_poster, markdown, poster_table

        table = poster_table(collect(self.client, [self.study.parent_run_id]), self.args.top)
        if table["rows"]:
            log_poster(self.client, self.study.parent_run_id, table)
            self.log(markdown(table))
        return table


def settings_from_spec(spec: dict) -> dict:
    from evaluation.spec import settings_keys
    return {k: spec.get(k) for k in settings_keys() if k in spec}


def eval_resources(resources: dict) -> Resources:
    """The study's resources for one evaluation process: one task, at most one GPU."""
    res = dict(resources or {})
    res["gpus_per_node"] = min(1, int(res.get("gpus_per_node") or 0))
    res["tasks_per_node"], res["nodes"] = 1, 1
    return Resources.from_dict(res)


def outcome_of(outcome: Outcome) -> tuple[str, str | None, dict]:
    """(status, reason, scores) of a settled evaluation job."""
    if outcome.status != "done":
        return "failed", outcome.reason, {}
    result = outcome.result
    if not isinstance(result, dict) or result.get("status") != "ok":
        reason = result.get("reason") if isinstance(result, dict) else f"job returned {type(result).__name__}"
        return "failed", reason or "the evaluation reported a failure", {}
    return "ok", None, dict(result.get("scores") or {})


def load_evaluations(journal: Journal) -> tuple[str | None, dict[str, Item], dict[str, list]]:
    """(executor kind, {key: Item}, {batch: keys}) folded from evaluate.jsonl; an item's data holds its trial,
    run id, roles and evaluation spec."""
    return fold(journal, item_event="evaluation")


def evaluate_study(args, log=print) -> dict:
    if not isinstance(args.top, int) or args.top < 1:
        raise ConfigError(f"--top {args.top!r} is invalid: give the number of best trials to evaluate (>= 1)")
    return locked_run(args.workdir, args.study, "evaluate.lock", "the evaluation",
                      lambda: Evaluator(args, log).run())


def main(args) -> int:
    """`python -m orchestrator evaluate` (see the module docstring)."""
    try:
        evaluate_study(args, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: evaluation jobs go on; rerun the same command to re-attach them", file=sys.stderr)
        return 130
    return 0
