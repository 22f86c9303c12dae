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
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.job import EvaluationJob
from evaluation.tracking import INSTRUCTEVAL
from jobs import tracking_store
from orchestrator.config import ConfigError, load_config
from orchestrator.journal import Journal, StudyState
from slurm.dispatch import Dispatcher, Outcome, RetryPolicy, Task
from slurm.executors import Resources, snapshot_code


@dataclass
class Evaluation:
    key: str  # trial-NNNN-<settings hash>: one evaluation of one adapter under one set of settings
    trial: int
    run_id: str | None
    roles: list[str]
    spec: dict
    job_id: str | None = None
    status: str | None = None  # None while pending or running; "ok" | "failed" when done
    reason: str | None = None
    scores: dict = field(default_factory=dict)
    logged: bool = False
    attempt: int = 0
    retries: int = 0
    batch: str | None = None


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
        from orchestrator.tracking import load_study

        self.args, self.log = args, log
        self.folder = Path(args.workdir) / args.study
        if not (self.folder / "journal.jsonl").exists():
            raise ConfigError(f"no study {args.study!r} under {args.workdir}: check the name and --workdir")
        self.study = load_study(self.folder)
        self.journal = Journal(self.folder / "evaluate.jsonl")
        recorded, self.evals, self.batches = load_evaluations(self.journal)
        cfg = self.study.config
        kind = recorded or args.executor or cfg.get("executor_resolved") or "auto"  # re-attach needs the same
        self.policy = RetryPolicy.from_dict(cfg.get("retries"))
        self.dispatcher = Dispatcher(kind, self.folder / "evaluate-submitit", eval_resources(cfg["resources"]),
                                     job_name=f"{args.study}-eval", code_dir=self.folder / "evaluate-code",
                                     record=self.journal.append)
        self.kind = self.dispatcher.kind
        if self.kind == "local":  # local jobs share this machine: honour cpus_per_task as their thread count
            os.environ.setdefault("LORA_HPO_THREADS", str(eval_resources(cfg["resources"]).cpus_per_task))
        if recorded is None:
            self.journal.append("start", executor=self.kind)
        self.uri = tracking_store.resolve(args.tracking_uri or cfg.get("tracking_uri"))
        self.client = tracking_store.client(self.uri)

    def run(self) -> dict:
        if self.kind in ("slurm", "local"):
            snapshot_code(self.folder / "evaluate-code")  # jobs import this copy; a rerun keeps it
        wanted = self._plan()
        live = self._start([e for e in wanted if e.status is None])
        while live:
            settled = self.dispatcher.poll(live.values())
            for attempt, outcome in settled:
                e = self.evals[attempt.task.key]
                del live[e.key]
                status, reason, scores = outcome_of(outcome)
                if status == "failed" and self.policy.allows(outcome.retry, e.retries, e.attempt + 1,
                                                             follow=outcome.follow):
                    self.journal.append("retry", key=e.key, kind=outcome.retry, follow=outcome.follow, reason=reason)
                    e.retries += 0 if outcome.follow else 1
                    e.attempt += 1
                    self.log(f"trial {e.trial}: {reason}; evaluation attempt {e.attempt + 1} submitted")
                    live[e.key] = self.dispatcher.submit([self._task(e)])[0]
                    continue
                self._collect(e, status, reason, scores)
            if not settled:
                time.sleep(self.args.poll_s)
        for e in wanted:
            if e.status == "ok" and not e.logged:
                self._log(e)
        return self._poster()

    def _start(self, todo: list) -> dict:
        """Re-attach the evaluations whose job runs, find those a crash left unjournaled, submit the rest."""
        live, fresh = {}, []
        found = {}
        for batch, keys in self.batches.items():
            waiting = [e for e in todo if e.batch == batch]
            if waiting:
                ids = self.dispatcher.recover(batch, [self._task(self.evals[k]) for k in keys])
                if ids:
                    self.journal.append("submitted", batch=batch, jobs=ids)
                found.update(ids)
        for e in todo:
            job_id = e.job_id or found.get(e.key)
            if job_id:
                self.log(f"trial {e.trial}: re-attached to evaluation job {job_id}")
                live[e.key] = self.dispatcher.reattach(self._task(e), job_id)
            else:
                fresh.append(e)
        for e, attempt in zip(fresh, self.dispatcher.submit([self._task(e) for e in fresh])):
            e.job_id = attempt.job_id
            live[e.key] = attempt
            self.log(f"trial {e.trial}: evaluation job {attempt.job_id} submitted ({', '.join(e.roles)})")
        return live

    def _task(self, e: Evaluation) -> Task:
        return Task(e.key, EvaluationJob(), (e.spec,), attempt=e.attempt, folder=e.spec["out"],
                    result_file=str(Path(e.spec["out"]) / "job_result.json"))

    # ------------------------------------------------------------------------------------------- plan
    def _plan(self) -> list[Evaluation]:
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
                self.journal.append("evaluation", key=key, trial=trial, run_id=t.run_id, roles=roles, spec=spec)
                self.evals[key] = Evaluation(key, trial, t.run_id, roles, spec)
            e = self.evals[key]
            if e.status == "failed" and self.args.retry_failed:
                self.journal.append("retry", key=key, fresh=True)
                e.status, e.reason, e.job_id, e.attempt, e.retries = None, None, None, e.attempt + 1, 0
            if e.status is not None:
                self.log(f"trial {trial}: evaluated already ({e.status}), not redone")
            wanted.append(e)
        return wanted

    # ------------------------------------------------------------------------------------------- results
    def _collect(self, e: Evaluation, status: str, reason: str | None, scores: dict) -> None:
        self.journal.append("result", key=e.key, status=status, reason=reason, scores=scores)
        e.status, e.reason, e.scores = status, reason, scores
        if status == "ok":
            self._log(e)
            self.log(f"trial {e.trial}: {', '.join(f'{k} {100 * v:.2f}' for k, v in scores.items() if v is not None)}")
        else:
            self.log(f"trial {e.trial}: evaluation FAILED: {reason}")
            if e.run_id:
                self.client.set_tag(e.run_id, "eval_status", "failed")
                self.client.set_tag(e.run_id, "eval_failure_reason", (reason or "")[:5000])

    # ------------------------------------------------------------------------------------------- MLflow
    def _log(self, e: Evaluation) -> None:
        from evaluation.tracking import log_scores

        path = Path(e.spec["out"]) / "scores.json"
        result = json.loads(path.read_text()) if path.exists() else {"scores": e.scores}
        if e.spec["harness"] == "lm-eval":
            result.setdefault("harness", "lm-eval")
        log_scores(self.client, e.run_id, result, tags={
            "eval_status": "ok", "eval_default": str("default" in e.roles).lower(), "eval_key": e.key,
            "eval_job_id": e.job_id, "eval_settings": json.dumps(settings_from_spec(e.spec), default=str)})
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


def load_evaluations(journal: Journal) -> tuple[str | None, dict[str, Evaluation], dict[str, list]]:
    """(executor kind, {key: Evaluation}, {batch: keys}) folded from evaluate.jsonl."""
    kind, evals, batches = None, {}, {}
    for r in journal.records():
        event = r.get("event")
        if event == "start":
            kind = r["executor"]
        elif event == "evaluation":
            evals[r["key"]] = Evaluation(r["key"], r["trial"], r.get("run_id"), r["roles"], r["spec"])
        elif event == "dispatch":
            batches[r["batch"]] = list(r["keys"])
            for key in r["keys"]:
                e = evals[key]
                e.batch, e.job_id, e.attempt = r["batch"], None, r.get("attempts", {}).get(key, e.attempt)
        elif event == "submitted":
            for key, job_id in (r.get("jobs") or {r["key"]: r["job_id"]}).items():
                evals[key].job_id, evals[key].batch = job_id, None
        elif event == "result":
            e = evals[r["key"]]
            e.status, e.reason, e.scores = r["status"], r.get("reason"), r.get("scores") or {}
        elif event == "retry":
            e = evals[r["key"]]
            if r.get("fresh"):  # --retry-failed: a new evaluation of the same adapter
                e.status, e.reason, e.job_id, e.logged, e.retries = None, None, None, False, 0
            else:
                e.retries += 0 if r.get("follow") else 1
        elif event == "logged":
            evals[r["key"]].logged = True
    return kind, evals, batches


def evaluate_study(args, log=print) -> dict:
    if not isinstance(args.top, int) or args.top < 1:
        raise ConfigError(f"--top {args.top!r} is invalid: give the number of best trials to evaluate (>= 1)")
    from orchestrator.lock import LockError, StudyLock

    folder = Path(args.workdir) / args.study
    if not (folder / "journal.jsonl").exists():
        raise ConfigError(f"no study {args.study!r} under {args.workdir}: check the name and --workdir")
    try:
        with StudyLock(folder / "evaluate.lock", what=f"the evaluation of study {args.study!r}"):
            return Evaluator(args, log).run()
    except LockError as e:
        raise ConfigError(str(e)) from None


def main(args) -> int:
    """`python -m orchestrator evaluate` (see the module docstring)."""
    try:
        evaluate_study(args, log=lambda msg: print(msg, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: evaluation jobs go on; rerun the same command to re-attach them", file=sys.stderr)
        return 130
    return 0
