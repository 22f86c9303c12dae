"""The study configuration: a preset, overlaid by a YAML file, overlaid by the command line; validated here.

    python -m orchestrator --algo nomad --config my-study.yaml --budget 50

A study YAML (every key optional; `preset` picks the base, `tiny` by default):

    preset: paper             # tiny | paper
    study: llama2-nomad       # name: experiment in MLflow, folder under workdir
    algo: nomad               # nomad | tpe | random | default
    budget: 100               # evaluations; or {evaluations: 100, gpu_hours: 500}, or {gpu_hours: 500} (at most
                              # MAX_EVALUATIONS evaluations): GPU-hours of every attempt, read from SLURM accounting
                              # (elapsed x GPUs allocated; CPU-hours for jobs without GPUs); no trial is submitted
                              # whose expected cost would pass it (orchestrator/study/spend.py)
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
    champion_rule: null       # with two objectives: knee (default) or "min val_loss s.t. train_hours <= 1.5";
                              # with one: mean (the best by a noise-aware model's mean, not the lowest loss)
    pareto_reference: null    # the hypervolume's reference point, e.g. [6.0, 0.5] (default: the worst values x 1.1)
    warm_start: []            # earlier studies (same space, trial settings, objective) whose results the searcher
                              # learns first, counted against no budget (orchestrator/study/warm.py)
    poll_s: 5                 # seconds between job-state polls (one sacct + one squeue call for all jobs)
    space: {...}              # the search space (orchestrator/search/space.py); the paper's by default; or a
                              # named one: paper, modern (r, alpha_ratio, dropout, lr, target_modules, rsLoRA,
                              # DoRA, epochs, warm-up, weight decay, effective batch)
    searcher_options: {}      # nomad: {profile: paper|async} (default: paper at parallel 1, async above), and
                              # with profile paper NOMAD parameters (e.g. {DIRECTION_TYPE: ORTHO 2N}); tpe: NNI options
    trial: {...}              # fine-tune settings (jobs/spec.py FinetuneSpec fields) for every evaluation
    resources: {...}          # SLURM resources per evaluation (slurm/executors.py Resources fields)
    retries: {max_retries: 2, on: [submission, node_fail, preempted], max_attempts: 10, max_hours: null,
              outage_hours: 6}      # how long submissions wait for an unreachable scheduler (then: stop, resumable)
    pruner: null              # stop hopeless trials early: {kind: asha, min_fraction: 0.125} or {kind: median, ...}
                              # (orchestrator/search/pruners.py); trials then report validation at fractions of training
    evaluation: {...}         # the downstream protocol of `orchestrator evaluate` (evaluation/spec.py fields:
                              # tasks, limit, humaneval_cut, decoding, dtype, merge, seed...); InstructEval's by default

`StudyConfig` is typed data, validated once, on construction, however it is built (from the YAML's plain
values or from typed ones), without side effects: nothing is mutated, nothing is started. Each section is the
typed object its consumer uses: `space` a SearchSpace, `trial` a jobs.spec.FinetuneSpec (the trial settings; each
trial's spec is it with the point applied), `evaluation` an evaluation.spec.EvaluationSpec (the protocol),
`resources` a Resources, `retries` a RetryPolicy, `pruner` a pruner (orchestrator/search/pruners.py),
`constraints` Constraints, `objectives` a tuple of metric names, `champion_rule` a ChampionRule, `objective` a
"pkg.module:function" string or a HeldoutObjective. The searcher options are the algorithm's own mapping,
checked when the searcher is built (NOMAD's parameters can only be checked by NOMAD itself).
`to_dict()` gives the plain form the journal keeps and `StudyConfig.from_journal(record)` reads it back: the one
way every command reads a study's configuration. A bad value raises ConfigError naming the key, the value and
the fix; the CLI prints it and exits 2.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from evaluation.spec import EvaluationSpec, ProtocolError, settings_keys
from jobs import tracking_store
from jobs.spec import PRESETS as TRIAL_PRESETS
from jobs.spec import FinetuneSpec, SpecError
from orchestrator.search import pruners
from orchestrator.search.criteria import ChampionRule, Constraint, CriteriaError, parse_constraints, parse_objectives
from orchestrator.search.searchers import ALGOS, MULTI_OBJECTIVE
from orchestrator.search.space import (Category, Choice, Fixed, Int, Log, SearchSpace, SpaceError, named_space,
                                       paper_space)
from slurm.backend import KINDS as EXECUTORS
from slurm.dispatch import RetryPolicy
from slurm.executors import Resources, ResourcesError

DEFAULT_TRACKING_URI = tracking_store.DEFAULT_TRACKING_URI
RESUMABLE = ("budget", "poll_s", "gpu_hours")  # what `--resume` may change; any other differing flag is refused
MAX_EVALUATIONS = 1000  # the evaluations of a study whose budget is in GPU-hours alone
DEFAULT_REPORTS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)  # median stopping's default report points
JOURNAL_ONLY = ("executor_resolved",)  # what journals before StudyConfig.from_journal added to the config


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


@dataclass(frozen=True)
class HeldoutObjective:
    """`objective: {metric: heldout, tasks: {mmlu: 300, ...}, weight_val_loss: 0.0, seed: 0}`: each trial's
    adapter scored on fixed seeded dev subsets of the benchmarks (evaluation/job.py HeldoutTrial)."""
    tasks: dict
    weight_val_loss: float = 0.0
    seed: int = 0
    metric: str = "heldout"

    @classmethod
    def from_dict(cls, h: dict, data_dir: str | None) -> "HeldoutObjective":
        from evaluation.tasks import NAMES, benchmark_size

        unknown = sorted(set(h) - {"metric", "tasks", "weight_val_loss", "seed"})
        _check(not unknown, "objective", unknown, "a held-out objective takes metric, tasks, weight_val_loss and seed")
        _check(h.get("metric", "heldout") == "heldout", "objective.metric", h.get("metric"), "use heldout")
        tasks = h.get("tasks")
        _check(isinstance(tasks, dict) and bool(tasks) and all(k in NAMES and _is_int(v) and v >= 1
                                                             for k, v in tasks.items()),
               "objective.tasks", tasks, f"a mapping of task ({', '.join(NAMES)}) to a dev subset size >= 1")
        weight = h.get("weight_val_loss", 0.0)
        _check(_is_number(weight) and weight >= 0, "objective.weight_val_loss", weight,
               "a number >= 0 (the share of validation loss in the objective)")
        _check(_is_int(h.get("seed", 0)), "objective.seed", h.get("seed"), "an integer (the dev draw's seed)")
        for task, n in tasks.items():
            size = benchmark_size(task, data_dir)
            _check(n < size, f"objective.tasks.{task}", n, f"the {task} dev subset must leave test items: the "
                   f"benchmark has {size}{' here (' + data_dir + ')' if data_dir else ''}; lower it")
        return cls(dict(tasks), float(weight), h.get("seed", 0))

    def to_dict(self) -> dict:
        return {"metric": "heldout", "tasks": dict(self.tasks), "weight_val_loss": self.weight_val_loss,
                "seed": self.seed}


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
    objective: str | HeldoutObjective | None = None
    poll_s: float = 5.0
    preset: str = "tiny"
    space: SearchSpace = field(default_factory=paper_space)
    searcher_options: dict = field(default_factory=dict)
    trial: FinetuneSpec = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    retries: RetryPolicy = field(default_factory=RetryPolicy)
    evaluation: EvaluationSpec = field(default_factory=dict)
    pruner: object = None
    constraints: tuple = ()
    objectives: tuple = ()
    champion_rule: ChampionRule | None = None
    pareto_reference: tuple | None = None
    warm_start: tuple = ()
    gpu_hours: float | None = None   # the budget in GPU-hours (CPU-hours without GPUs), None: evaluations only

    def __post_init__(self):
        self._budget_mapping()
        _validate_scalars(self)
        if isinstance(self.space, str):  # a named space: paper, modern
            try:
                self.space = named_space(self.space)
            except SpaceError as e:
                raise ConfigError(f"config key 'space': {str(e).removeprefix('space: ')}") from None
        self.space = _typed("space", self.space, SearchSpace,
                            lambda d: SearchSpace.from_dict(d) if d else paper_space(), SpaceError)
        self.resources = _typed("resources", self.resources, Resources, Resources.from_dict,
                                (ResourcesError, TypeError))
        self.retries = _typed("retries", self.retries, RetryPolicy, RetryPolicy.from_dict, (ValueError, TypeError))
        self.evaluation = _typed("evaluation", self.evaluation, EvaluationSpec, _evaluation, ProtocolError)
        self.trial = _typed("trial", self.trial, FinetuneSpec, self._trial_template, SpecError)
        if isinstance(self.objective, dict):
            self.objective = HeldoutObjective.from_dict(self.objective, self.evaluation.data_dir)
        if not isinstance(self.pruner, (type(None), *pruners.PRUNERS.values())):
            self.pruner = _parse("pruner", lambda: pruners.make_pruner(self.pruner), pruners.PrunerError)
        _typed_criteria(self)
        _check(isinstance(self.searcher_options, dict), "searcher_options", self.searcher_options, "must be a mapping")
        _check(not self.searcher_options or self.algo not in ("random", "default"), "searcher_options",
               self.searcher_options, f"algo {self.algo} takes no options: remove them")
        _check(isinstance(self.warm_start, (list, tuple)) and all(isinstance(n, str) and n for n in self.warm_start),
               "warm_start", self.warm_start, "a list of earlier study names")
        self.warm_start = tuple(self.warm_start)
        if self.function is None:
            self._check_space_against_trial()
        if self.pruner is not None:
            self._check_pruner()

    # ------------------------------------------------------------------------------------------- reading
    @property
    def folder(self) -> Path:
        return Path(self.workdir) / self.study

    @property
    def function(self) -> str | None:
        """The Python objective ("pkg.module:function") when the study tunes one instead of fine-tunes."""
        return self.objective if isinstance(self.objective, str) else None

    @property
    def heldout(self) -> HeldoutObjective | None:
        """The held-out objective when the study has one."""
        return self.objective if isinstance(self.objective, HeldoutObjective) else None

    @property
    def register_name(self) -> str | None:
        """The registered model's name: register_as, else "<study>-adapter"; None when nothing is registered
        (register_as "", or a study of an objective function: no adapter)."""
        if self.register_as == "" or self.function is not None:
            return None
        return self.register_as or f"{self.study}-adapter"

    def trial_spec(self, point: dict, out: str) -> FinetuneSpec:
        """The fine-tune spec of one evaluation: the study's trial settings with the point applied (and the
        pruner's report points, the study's data cache)."""
        changes = {**point, "out": out}
        if self.trial.data.cache_dir is None:
            changes["data"] = {**dataclasses.asdict(self.trial.data), "cache_dir": str(self.folder / "data")}
        if self.pruner is not None and not self.trial.eval_fractions:
            changes["eval_fractions"] = self.report_fractions()
        return self.trial.replace(**changes)

    def report_fractions(self) -> list[float]:
        """Where trials report intermediate validation for the pruner: the trial settings' eval_fractions, else
        the pruner's rungs (median stopping: its default points past the warm-up)."""
        if self.trial.eval_fractions:
            return list(self.trial.eval_fractions)
        rungs = getattr(self.pruner, "rungs", None)
        return sorted(rungs) if rungs else [f for f in DEFAULT_REPORTS if f >= self.pruner.warmup - 1e-9]

    def evaluation_settings(self) -> dict:
        """The downstream protocol as the plain mapping evaluation specs are built from."""
        return {k: getattr(self.evaluation, k) for k in settings_keys()}

    def tracking(self) -> str:
        return tracking_store.resolve(self.tracking_uri)

    # ------------------------------------------------------------------------------------------- the plain form
    def to_dict(self) -> dict:
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        # the paper's space is written {} so that a resume rebuilds paper_space() with its NOMAD order
        d["space"] = {} if self.space == paper_space() else space_to_dict(self.space)
        d["resources"], d["retries"] = self.resources.to_dict(), self.retries.to_dict()
        d["trial"] = {k: v for k, v in self.trial.to_dict().items() if k != "out"}
        d["evaluation"] = self.evaluation_settings()
        d["objective"] = self.heldout.to_dict() if self.heldout else self.objective
        d["pruner"] = pruners.config(self.pruner)
        d["constraints"] = [{"metric": k.metric, k.sense: k.bound, "kind": k.kind} for k in self.constraints]
        d["objectives"] = list(self.objectives) or None
        d["champion_rule"] = self.champion_rule.text if self.champion_rule else None
        d["pareto_reference"] = list(self.pareto_reference) if self.pareto_reference else None
        d["warm_start"] = list(self.warm_start)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "StudyConfig":
        """From the plain form (to_dict's, or a journal's), naming an unknown key."""
        data = {k: v for k, v in data.items() if k not in JOURNAL_ONLY}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}: valid keys are {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_journal(cls, config: dict, **changes) -> "StudyConfig":
        """A study's configuration as its journal's start record keeps it (the one way commands read it), with
        `changes` (what a resume may change, a command's --tracking-uri...) applied; None values are ignored."""
        return cls.from_dict({**config, **{k: v for k, v in changes.items() if v is not None}})

    # ------------------------------------------------------------------------------------------- checks
    def _budget_mapping(self) -> None:
        """`budget: {evaluations: N, gpu_hours: H}` (either or both) into budget (evaluations) and gpu_hours."""
        if not isinstance(self.budget, dict):
            return
        unknown = sorted(set(self.budget) - {"evaluations", "gpu_hours"})
        _check(not unknown and self.budget, "budget", self.budget,
               "a number of evaluations, or {evaluations: N, gpu_hours: H} (either or both)")
        budget = dict(self.budget)
        self.budget = budget.get("evaluations", MAX_EVALUATIONS if "gpu_hours" in budget else None)
        if "gpu_hours" in budget:
            _check(self.gpu_hours in (None, budget["gpu_hours"]), "budget.gpu_hours", budget["gpu_hours"],
                   "give the GPU-hour budget once")
            self.gpu_hours = budget["gpu_hours"]

    def _trial_template(self, trial: dict) -> FinetuneSpec:
        return FinetuneSpec.from_dict({**trial, "out": trial.get("out") or str(self.folder / "trials")})

    def _check_space_against_trial(self) -> None:
        """Every value the space can give is accepted by the fine-tune."""
        default = self.space.default_point()
        try:
            self.trial.replace(**default)
        except SpecError as e:
            raise ConfigError(f"config key 'trial' (or a search-space name): {e}") from None
        for dim in self.space.dims:
            extremes = (dim.values[0], dim.values[-1]) if isinstance(dim, Choice) else \
                [dim.canonical(v) for v in dim.values] if isinstance(dim, Category) else (dim.low, dim.high)
            for value in extremes:
                try:
                    self.trial.replace(**{**default, dim.name: value})
                except SpecError as e:
                    raise ConfigError(f"config key 'space.{dim.name}': value {value!r} is not accepted by the "
                                      f"fine-tune ({e}); narrow the range") from None

    def _check_pruner(self) -> None:
        if self.function is not None:
            raise ConfigError("config key 'pruner': an --objective study cannot be pruned (only fine-tunes report "
                              "intermediate validation losses): drop pruner or the objective")
        _parse("pruner", lambda: self.pruner.check_reports(self.report_fractions()), pruners.PrunerError)


def _validate_scalars(c: StudyConfig) -> None:
    _check(isinstance(c.study, str) and bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", c.study)),
           "study", c.study, "use letters, digits, '.', '_' or '-' (it names a folder and an experiment)")
    _check(c.algo in ALGOS, "algo", c.algo, f"use one of {', '.join(ALGOS)}")
    _check(_is_int(c.budget) and c.budget >= 1, "budget", c.budget, "an integer >= 1 (evaluations)")
    _check(c.gpu_hours is None or (_is_number(c.gpu_hours) and c.gpu_hours > 0), "budget.gpu_hours", c.gpu_hours,
           "a number of GPU-hours > 0 (CPU-hours for jobs without GPUs)")
    _check(_is_int(c.parallel) and c.parallel >= 1, "parallel", c.parallel, "an integer >= 1")
    _check(_is_int(c.seed) and 0 <= c.seed < 2**31, "seed", c.seed, "an integer in [0, 2**31)")
    _check(c.executor in EXECUTORS, "executor", c.executor, f"use one of {', '.join(EXECUTORS)}")
    _check(_is_number(c.poll_s) and 0.05 <= c.poll_s <= 3600, "poll_s", c.poll_s,
           "seconds between polls, in [0.05, 3600]")
    _check(c.objective is None or isinstance(c.objective, (dict, HeldoutObjective)) or (
        isinstance(c.objective, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", c.objective) is not None),
        "objective", c.objective,
        "write package.module:function, or a held-out objective {metric: heldout, tasks: {mmlu: 300}}")
    _check(isinstance(c.workdir, str) and bool(c.workdir), "workdir", c.workdir, "a folder path")
    _check(c.tracking_uri is None or (isinstance(c.tracking_uri, str) and bool(c.tracking_uri.strip())),
           "tracking_uri", c.tracking_uri, "an MLflow tracking URI (sqlite:///path.db, http://host:port) or null")
    _check(c.register_as in (None, "") or (isinstance(c.register_as, str) and bool(re.fullmatch(
        r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", c.register_as))), "register_as", c.register_as,
        "a registered model name of letters, digits, '.', '_' or '-', '' (register nothing) or null")
    for key in ("trial", "evaluation"):
        _check(isinstance(getattr(c, key), (dict, FinetuneSpec, EvaluationSpec)), key, getattr(c, key),
               "must be a mapping")


def _typed_criteria(c: StudyConfig) -> None:
    """Constraints, two objectives, the champion rule and the hypervolume's reference, parsed once, together."""
    if not (isinstance(c.constraints, tuple) and all(isinstance(k, Constraint) for k in c.constraints)):
        c.constraints = _parse("constraints", lambda: parse_constraints(c.constraints), CriteriaError)
    c.objectives = tuple(_parse("objectives", lambda: parse_objectives(c.objectives), CriteriaError)) \
        if not (isinstance(c.objectives, tuple) and len(c.objectives) in (0, 2)) else c.objectives
    if c.objectives and c.algo not in MULTI_OBJECTIVE:
        raise ConfigError(f"config key 'objectives': algo {c.algo} cannot search two objectives: use nomad "
                          "(DMultiMADS), tpe (Optuna's multi-objective TPE) or random")
    if c.champion_rule is not None and not isinstance(c.champion_rule, ChampionRule):
        if c.champion_rule == "mean":   # one objective, noise-aware: orchestrator/search/model_mean.py
            if c.objectives:
                raise ConfigError("config key 'champion_rule': mean ranks one objective by a model's mean; with "
                                  "two objectives write knee or e.g. 'min val_loss s.t. train_hours <= 1.5'")
            c.champion_rule = ChampionRule("mean", "mean")
        elif not c.objectives:
            raise ConfigError("config key 'champion_rule': it picks among a Pareto front: give objectives too "
                              "(with one objective the only rule is mean: the noise-aware champion)")
        else:
            c.champion_rule = _parse("champion_rule", lambda: ChampionRule.of(c.champion_rule), CriteriaError)
    if c.pareto_reference is not None:
        _check(isinstance(c.pareto_reference, (list, tuple)) and len(c.pareto_reference) == 2 and all(
            _is_number(v) for v in c.pareto_reference), "pareto_reference", c.pareto_reference,
            "two finite numbers, one per objective, e.g. [6.0, 0.5]")
        c.pareto_reference = tuple(float(v) for v in c.pareto_reference)


def _evaluation(mapping: dict) -> EvaluationSpec:
    unknown = sorted(set(mapping) - set(settings_keys()))
    if unknown:
        raise ProtocolError(f"evaluation: unknown key {unknown[0]!r}: valid keys are {', '.join(settings_keys())}")
    return EvaluationSpec(**mapping)


def _typed(key: str, value: Any, cls: type, parse, errors) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key {key!r}: {value!r} is invalid: must be a mapping")
    try:
        return parse(value)
    except errors as e:
        raise ConfigError(f"config key {key!r}: {str(e).removeprefix(key + ': ')}") from None


def _parse(key: str, parse, errors):
    try:
        return parse()
    except errors as e:
        text = str(e)
        raise ConfigError(f"config key {key!r}: {text.split(': ', 1)[1] if text.startswith(key) else text}") \
            from None


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
        elif isinstance(dim, Category):
            out[dim.name] = dim.to_yaml()
    for f in space.fixed:
        if isinstance(f, Fixed):
            out[f.name] = {"fixed": f.value}
    return out


def load_config(path: str | None = None, **cli) -> StudyConfig:
    """Preset < YAML file < command-line values (None = not given). Raises ConfigError."""
    from_file = read_yaml(path) if path else {}
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
    return StudyConfig.from_dict(merged)


def read_yaml(path: str) -> dict:
    """A study YAML's mapping; ConfigError (one line) for a missing, unreadable, binary or invalid file."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file: give the path of a study YAML") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder: give the path of a study YAML") from None
    except PermissionError:
        raise ConfigError(f"--config {path}: cannot be read (permission denied): check its mode") from None
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"--config {path}: is not a text file (not UTF-8): give the path of a study YAML") \
            from None
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


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


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
