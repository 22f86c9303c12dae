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
    register_as: null         # registered model name; default "<study>-adapter"
    objective: null           # "pkg.module:function": tune any Python blackbox instead of the fine-tune
    poll_s: 5                 # seconds between job-state polls (one sacct call for all jobs)
    space: {...}              # the search space (orchestrator/space.py); the paper's by default
    searcher_options: {}      # NOMAD parameters (e.g. {DIRECTION_TYPE: ORTHO 2N}) or TPE options
    trial: {...}              # fine-tune settings (jobs/spec.py FinetuneSpec fields) for every evaluation
    resources: {...}          # SLURM resources per evaluation (slurm/executors.py Resources fields)
    retries: {max_retries: 2, on: [submission, node_fail, preempted]}

A bad value raises ConfigError naming the key, the value and the fix; the CLI prints it and exits 2.
"""
from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from jobs.spec import PRESETS as TRIAL_PRESETS
from jobs.spec import FinetuneSpec, SpecError
from orchestrator.searchers import ALGOS
from orchestrator.space import SearchSpace, SpaceError, paper_space
from slurm.executors import KINDS as EXECUTORS
from slurm.executors import Resources, ResourcesError

RETRYABLE = ("submission", "node_fail", "preempted")
DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


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
    objective: str | None = None
    poll_s: float = 5.0
    preset: str = "tiny"
    space: dict = field(default_factory=dict)
    searcher_options: dict = field(default_factory=dict)
    trial: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    retries: dict = field(default_factory=lambda: {"max_retries": 2, "on": list(RETRYABLE)})

    @property
    def folder(self) -> Path:
        return Path(self.workdir) / self.study

    def search_space(self) -> SearchSpace:
        return SearchSpace.from_dict(self.space) if self.space else paper_space()

    def trial_spec(self, point: dict, out: str) -> FinetuneSpec:
        """The fine-tune spec of one evaluation: the study's trial settings with the point applied."""
        data = dict(self.trial.get("data") or {})
        data.setdefault("cache_dir", str(self.folder / "data"))
        return FinetuneSpec.from_dict({**self.trial, **point, "data": data, "out": out})

    def tracking(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


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
    known = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}: valid keys are {', '.join(sorted(known))}")
    config = StudyConfig(**merged)
    validate(config)
    return config


def _read_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file: give the path of a study YAML") from None
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
    _check(isinstance(c.poll_s, (int, float)) and 0.05 <= c.poll_s <= 3600, "poll_s", c.poll_s,
           "seconds between polls, in [0.05, 3600]")
    _check(c.objective is None or (isinstance(c.objective, str) and ":" in c.objective), "objective",
           c.objective, "write package.module:function")
    for key in ("space", "searcher_options", "trial", "resources", "retries"):
        _check(isinstance(getattr(c, key), dict), key, getattr(c, key), "must be a mapping")
    try:
        space = c.search_space()
    except SpaceError as e:
        raise ConfigError(f"config key 'space': {e}") from None
    try:
        Resources.from_dict(c.resources)
    except (ResourcesError, TypeError) as e:
        raise ConfigError(f"config key 'resources': {e}") from None
    if c.objective is None:
        try:
            c.trial_spec(space.default_point(), out=str(c.folder / "trials" / "check"))
        except SpecError as e:
            raise ConfigError(f"config key 'trial' (or a search-space name): {e}") from None
    retries = c.retries
    _check(set(retries) <= {"max_retries", "on"}, "retries", retries, "keys are max_retries and on")
    _check(_is_int(retries.get("max_retries", 0)) and retries.get("max_retries", 0) >= 0, "retries.max_retries",
           retries.get("max_retries"), "an integer >= 0")
    _check(set(retries.get("on", [])) <= set(RETRYABLE), "retries.on", retries.get("on"),
           f"a list drawn from {', '.join(RETRYABLE)}")
