"""The study configuration: a preset, overlaid by a YAML file, overlaid by the command line; validated here.

    python -m orchestrator --algo nomad --config my-study.yaml --budget 50

A study YAML (every key optional; `preset` picks the base, `tiny` by default):

    preset: paper             # tiny | paper
    study: llama2-nomad       # name: experiment in MLflow, folder under workdir
    algo: nomad               # nomad | tpe | random | default
    budget: 100               # evaluations
    parallel: 4               # evaluations in flight
    seed: 0
    executor: auto            # auto | slurm | local | debug
    workdir: runs             # the study's folder is workdir/study
    tracking_uri: null        # default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db
    register_as: null         # registered model name; default "<study>-adapter"; "" registers nothing
    objective: null           # "pkg.module:function": tune any Python blackbox instead of the fine-tune; or
                              # {metric: heldout, tasks: {mmlu: 300, bbh: 150, drop: 150, humaneval: 40},
                              #  weight_val_loss: 0.0, seed: 0}: the fine-tune scored on dev subsets
    constraints: []           # [{metric: peak_memory_gb, max: 40, kind: pb}, ...] (orchestrator/search/criteria.py)
    objectives: null          # two metrics at once, e.g. [val_loss, train_hours]: a Pareto front
    champion_rule: null       # with two objectives: knee (default) or "min val_loss s.t. train_hours <= 1.5"
    pareto_reference: null    # the hypervolume's reference point, e.g. [6.0, 0.5] (default: the worst values x 1.1)
    warm_start: []            # earlier studies (same space, trial settings, objective) whose results the searcher
                              # learns first, counted against no budget (orchestrator/study/warm.py)
    poll_s: 5                 # seconds between job-state polls (one sacct + one squeue call for all jobs)
    space: {...}              # the search space (orchestrator/search/space.py); the paper's by default
    searcher_options: {}      # nomad: {profile: paper|async} (default: paper at parallel 1, async above), and
                              # with profile paper NOMAD parameters (e.g. {DIRECTION_TYPE: ORTHO 2N}); tpe: NNI options
    trial: {...}              # fine-tune settings (jobs/spec.py FinetuneSpec fields) for every evaluation
    resources: {...}          # SLURM resources per evaluation (slurm/executors.py Resources fields)
    retries: {max_retries: 2, on: [submission, node_fail, preempted], max_attempts: 10, max_hours: null}
    pruner: null              # stop hopeless trials early: {kind: asha, min_fraction: 0.125} or {kind: median, ...}
                              # (orchestrator/search/pruners.py); trials then report validation at fractions of training
    evaluation: {...}         # the downstream protocol of `orchestrator evaluate` (evaluation/spec.py fields:
                              # tasks, limit, humaneval_cut, decoding, dtype, merge, seed...); InstructEval's by default

`StudyConfig` holds typed values (`space` a SearchSpace, `resources` a Resources, `retries` a RetryPolicy) and
validates itself on construction, however it is built; `to_dict()` gives the plain form the journal keeps.
A bad value raises ConfigError naming the key, the value and the fix; the CLI prints it and exits 2.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from jobs import tracking_store
from jobs.spec import PRESETS as TRIAL_PRESETS
from jobs.spec import FinetuneSpec, SpecError
from orchestrator.search.searchers import ALGOS
from orchestrator.search.space import Choice, Fixed, Int, Log, SearchSpace, SpaceError, paper_space
from slurm.dispatch import RetryPolicy
from slurm.executors import KINDS as EXECUTORS
from slurm.executors import Resources, ResourcesError

DEFAULT_TRACKING_URI = tracking_store.DEFAULT_TRACKING_URI
RESUMABLE = ("budget", "poll_s")  # what `--resume` may change; any other differing flag is refused


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the bad value and the fix."""


STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: a small study of the tiny model on this machine, minutes on 2 CPU cores.
    "tiny": dict(algo="nomad", budget=8, parallel=2, executor="auto", poll_s=1.0,
                 trial=dict(TRIAL_PRESETS["tiny"], epochs=1.0),
                 resources=dict(cpus_per_task=1, timeout_min=30)),
    # The paper: Llama-2-7b on the Alpaca/Dolly mix, 100 evaluations, each on 4 GPUs of one node.
    "paper": dict(algo="nomad", budget=100, parallel=1, executor="auto", poll_s=30.0,
                  trial=dict(TRIAL_PRESETS["paper"]),
                  resources=dict(gpus_per_node=4, cpus_per_task=8, mem_gb=256, timeout_min=240)),
}


@dataclass
class StudyConfig:
    study: str
    algo: str = "nomad"
    budget: int = 8
    parallel: int = 1
    seed: int = 0
    executor: str = "auto"
    workdir: str = "runs"
    tracking_uri: str | None = None
    register_as: str | None = None
    objective: str | dict | None = None
    poll_s: float = 5.0
    preset: str = "tiny"
    space: SearchSpace = field(default_factory=paper_space)
    searcher_options: dict = field(default_factory=dict)
    trial: dict = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    evaluation: dict = field(default_factory=dict)
    pruner: dict | None = None
    constraints: list = field(default_factory=list)
    objectives: list | None = None
    champion_rule: str | None = None
    pareto_reference: list | None = None
    warm_start: list = field(default_factory=list)

    def __post_init__(self):
        self.space = _typed("space", self.space, SearchSpace, lambda d: SearchSpace.from_dict(d) if d else paper_space(),
                            SpaceError)
        self.resources = _typed("resources", self.resources, Resources, Resources.from_dict,
                                (ResourcesError, TypeError))
        self.retries = _typed("retries", self.retries, RetryPolicy, RetryPolicy.from_dict, (ValueError, TypeError))
        validate(self)

    @property
    def folder(self) -> Path:
        return Path(self.workdir) / self.study

    @property
    def function(self) -> str | None:
        """The Python objective ("pkg.module:function") when the study tunes one instead of fine-tunes."""
        return self.objective if isinstance(self.objective, str) else None

    @property
    def heldout(self) -> dict | None:
        """The held-out objective's settings (tasks, weight_val_loss, seed) when the study has one."""
        return self.objective if isinstance(self.objective, dict) else None

    def search_space(self) -> SearchSpace:
        return self.space

    def trial_spec(self, point: dict, out: str) -> FinetuneSpec:
        """The fine-tune spec of one evaluation: the study's trial settings with the point applied."""
        data = dict(self.trial.get("data") or {})
        data.setdefault("cache_dir", str(self.folder / "data"))
        return FinetuneSpec.from_dict({**self.trial, **point, "data": data, "out": out})

    def tracking(self) -> str:
        return tracking_store.resolve(self.tracking_uri)

    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        # the paper's space is written {} so that a resume rebuilds paper_space() with its NOMAD order
        d["space"] = {} if self.space == paper_space() else space_to_dict(self.space)
        d["resources"], d["retries"] = self.resources.to_dict(), self.retries.to_dict()
        return d


def _typed(key: str, value: Any, cls: type, parse, errors) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r}: {value!r} is invalid: must be a mapping")
    try:
        return parse(value)
    except errors as e:
        raise ConfigError(f"config key {key!r}: {e}") from None


def space_to_dict(space: SearchSpace) -> dict:
    """The YAML form of a search space (SearchSpace.from_dict reads it back)."""
    out = {}
    for dim in space.dims:
        if isinstance(dim, Choice):
            out[dim.name] = {"choice": list(dim.values), "default": dim.default}
        elif isinstance(dim, Int):
            out[dim.name] = {"int": [dim.low, dim.high], "default": dim.default}
        elif isinstance(dim, Log):
            out[dim.name] = {"log": [dim.low, dim.high], "default": dim.default}
    for f in space.fixed:
        if isinstance(f, Fixed):
            out[f.name] = {"fixed": f.value}
    return out


def load_config(path: str | None = None, **cli) -> StudyConfig:
    """Preset < YAML file < command-line values (None = not given). Raises ConfigError."""
    from_file = _read_yaml(path) if path else {}
    preset = cli.get("preset") or from_file.get("preset") or "tiny"
    if preset not in STUDY_PRESETS:
        raise ConfigError(f"preset={preset!r} is unknown: use one of {', '.join(STUDY_PRESETS)}")
    merged = copy.deepcopy(STUDY_PRESETS[preset])
    for source in (from_file, {k: v for k, v in cli.items() if v is not None}):
        for key, value in source.items():
            if key in ("trial", "resources") and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            else:
                merged[key] = value
    merged["preset"] = preset
    merged.setdefault("study", f"{preset}-{merged.get('algo', 'nomad')}")
    merged.pop("executor_resolved", None)  # what a journaled config adds (the executor it resolved to)
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}: valid keys are {', '.join(sorted(known))}")
    return StudyConfig(**merged)


def _read_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file: give the path of a study YAML") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder: give the path of a study YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}: invalid YAML{where}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of study keys (study, algo, budget, ...)")
    return data


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r}: {value!r} is invalid: {fix}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(c: StudyConfig) -> None:
    _check(isinstance(c.study, str) and bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", c.study)),
           "study", c.study, "use letters, digits, '.', '_' or '-' (it names a folder and an experiment)")
    _check(c.algo in ALGOS, "algo", c.algo, f"use one of {', '.join(ALGOS)}")
    _check(_is_int(c.budget) and c.budget >= 1, "budget", c.budget, "an integer >= 1 (evaluations)")
    _check(_is_int(c.parallel) and c.parallel >= 1, "parallel", c.parallel, "an integer >= 1")
    _check(_is_int(c.seed) and 0 <= c.seed < 2**31, "seed", c.seed, "an integer in [0, 2**31)")
    _check(c.executor in EXECUTORS, "executor", c.executor, f"use one of {', '.join(EXECUTORS)}")
    _check(isinstance(c.poll_s, (int, float)) and not isinstance(c.poll_s, bool) and 0.05 <= c.poll_s <= 3600,
           "poll_s", c.poll_s, "seconds between polls, in [0.05, 3600]")
    _check(c.objective is None or isinstance(c.objective, dict) or (isinstance(c.objective, str) and re.fullmatch(
        r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", c.objective) is not None), "objective", c.objective,
        "write package.module:function, or a held-out objective {metric: heldout, tasks: {mmlu: 300}}")
    _check(isinstance(c.workdir, str) and bool(c.workdir), "workdir", c.workdir, "a folder path")
    _check(c.tracking_uri is None or (isinstance(c.tracking_uri, str) and bool(c.tracking_uri.strip())),
           "tracking_uri", c.tracking_uri, "an MLflow tracking URI (sqlite:///path.db, http://host:port) or null")
    _check(c.register_as in (None, "") or (isinstance(c.register_as, str) and bool(re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", c.register_as))), "register_as", c.register_as,
        "a registered model name of letters, digits, '.', '_' or '-', '' (register nothing) or null")
    for key in ("searcher_options", "trial", "evaluation"):
        _check(isinstance(getattr(c, key), dict), key, getattr(c, key), "must be a mapping")
    _validate_evaluation(c)
    _validate_pruner(c)
    _check(isinstance(c.warm_start, list) and all(isinstance(n, str) and n for n in c.warm_start), "warm_start",
           c.warm_start, "a list of earlier study names")
    if c.function is None:
        _validate_trial(c)
    if c.heldout is not None:
        c.objective = _validate_heldout(c)
    _validate_criteria(c)
    _validate_searcher(c)


def _validate_trial(c: StudyConfig) -> None:
    """The trial settings, and every value the space can give, are accepted by the fine-tune."""
    out = str(c.folder / "trials" / "check")
    try:
        c.trial_spec(c.space.default_point(), out=out)
    except SpecError as e:
        raise ConfigError(f"config key 'trial' (or a search-space name): {e}") from None
    default = c.space.default_point()
    for dim in c.space.dims:
        extremes = (dim.values[0], dim.values[-1]) if isinstance(dim, Choice) else (dim.low, dim.high)
        for value in extremes:
            try:
                c.trial_spec({**default, dim.name: value}, out=out)
            except SpecError as e:
                raise ConfigError(f"config key 'space.{dim.name}': value {value!r} is not accepted by the fine-tune "
                                  f"({e}); narrow the range") from None


DEFAULT_REPORTS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # median stopping's default report points


def _validate_pruner(c: StudyConfig) -> None:
    """A pruner needs trials that report intermediate validation: its rungs become the trials' report points
    (trial.eval_fractions) unless the trial settings name them."""
    from orchestrator.search.pruners import PrunerError, make_pruner

    try:
        pruner = make_pruner(c.pruner)
    except PrunerError as e:
        raise ConfigError(f"config key 'pruner': {str(e).removeprefix('pruner: ')}") from None
    if pruner is None:
        return
    if c.function is not None:
        raise ConfigError("config key 'pruner': an --objective study cannot be pruned (only fine-tunes report "
                          "intermediate validation losses): drop pruner or the objective")
    reports = c.trial.get("eval_fractions") or list(getattr(pruner, "rungs", None) or
                                                    [f for f in DEFAULT_REPORTS if f >= pruner.warmup - 1e-9])
    try:
        pruner.check_reports(reports)
    except PrunerError as e:
        raise ConfigError(f"config key 'pruner': {str(e).removeprefix('pruner: ')}") from None
    c.trial = {**c.trial, "eval_fractions": sorted(reports)}


def _validate_heldout(c: StudyConfig) -> dict:
    """The held-out objective: dev subsets of the benchmarks (their sizes checked against the benchmarks)."""
    from evaluation.tasks import NAMES, benchmark_size

    h = dict(c.heldout)
    unknown = sorted(set(h) - {"metric", "tasks", "weight_val_loss", "seed"})
    _check(not unknown, "objective", unknown, "a held-out objective takes metric, tasks, weight_val_loss and seed")
    _check(h.get("metric", "heldout") == "heldout", "objective.metric", h.get("metric"), "use heldout")
    tasks = h.get("tasks")
    _check(isinstance(tasks, dict) and bool(tasks) and all(k in NAMES and _is_int(v) and v >= 1
                                                         for k, v in tasks.items()),
           "objective.tasks", tasks, f"a mapping of task ({', '.join(NAMES)}) to a dev subset size >= 1")
    weight = h.get("weight_val_loss", 0.0)
    _check(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
           "objective.weight_val_loss", weight, "a number >= 0 (the share of validation loss in the objective)")
    _check(_is_int(h.get("seed", 0)), "objective.seed", h.get("seed"), "an integer (the dev draw's seed)")
    data_dir = (c.evaluation or {}).get("data_dir")
    for task, n in tasks.items():
        size = benchmark_size(task, data_dir)
        _check(n < size, f"objective.tasks.{task}", n, f"the {task} dev subset must leave test items: the "
               f"benchmark has {size}{' here (' + data_dir + ')' if data_dir else ''}; lower it")
    return {"metric": "heldout", "tasks": dict(tasks), "weight_val_loss": float(weight), "seed": h.get("seed", 0)}


def _validate_criteria(c: StudyConfig) -> None:
    """Constraints, two objectives and the champion rule (orchestrator/search/criteria.py), checked together."""
    from orchestrator.search.criteria import CriteriaError, parse_constraints, parse_objectives, parse_rule

    try:
        parse_constraints(c.constraints)
        objectives = parse_objectives(c.objectives)
        parse_rule(c.champion_rule)
    except CriteriaError as e:
        raise ConfigError(f"config key {str(e).split(':', 1)[0].split('[')[0]!r}: {str(e).split(': ', 1)[1]}") \
            from None
    if objectives and c.algo not in ("nomad", "tpe", "random"):
        raise ConfigError(f"config key 'objectives': algo {c.algo} cannot search two objectives: use nomad "
                          "(DMultiMADS), tpe (Optuna's multi-objective TPE) or random")
    if c.champion_rule and not objectives:
        raise ConfigError("config key 'champion_rule': it picks among a Pareto front: give objectives too")
    if c.pareto_reference is not None:
        _check(isinstance(c.pareto_reference, list) and len(c.pareto_reference) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in c.pareto_reference),
            "pareto_reference", c.pareto_reference, "two numbers, one per objective, e.g. [6.0, 0.5]")


def _validate_evaluation(c: StudyConfig) -> None:
    from evaluation.spec import ProtocolError, evaluation_settings  # torch-free

    try:
        evaluation_settings(c.evaluation)
    except ProtocolError as e:
        raise ConfigError(f"config key 'evaluation': {str(e).removeprefix('evaluation: ')}") from None


def _validate_searcher(c: StudyConfig) -> None:
    """The searcher options are the algorithm's own: build the searcher (nothing runs) to check them."""
    from orchestrator.search.criteria import searcher_criteria
    from orchestrator.search.searchers import make_searcher

    try:
        make_searcher(c.algo, c.space, budget=c.budget, parallel=c.parallel, seed=c.seed,
                      options=c.searcher_options, **searcher_criteria(c)).close()
    except ValueError as e:
        raise ConfigError(f"config key 'searcher_options': {str(e).splitlines()[0]}") from None


def resume_changes(saved: dict, wanted: dict) -> list[str]:
    """Keys whose value `wanted` (flags given with --resume) changes from the journaled config, other than
    RESUMABLE ones."""
    changed = []
    for key, value in wanted.items():
        if value is None or key in RESUMABLE or key not in saved:
            continue
        if saved[key] != value:
            changed.append(key)
    return changed
