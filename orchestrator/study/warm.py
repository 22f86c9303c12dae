"""Warm start: the finished trials of earlier studies fed to a new study's searcher before its first ask.

    python -m orchestrator --config round2.yaml --warm-start round1 [round1b ...]     # or warm_start: in the YAML

The paper warm-started its second NOMAD round from the first. The earlier studies (in the same --workdir) must
share this study's search space, trial settings and objective: their results are then results of this study's
blackbox, told to the searcher without running them again and counted against no budget (NOMAD starts from the
best of them). A mismatch is a one-line error naming what differs. The study's parent run lists the studies and
their parent runs (tag warm_start_from).
"""
from __future__ import annotations


from orchestrator.config import ConfigError, StudyConfig
from orchestrator.jsonl import DamagedFile
from orchestrator.study.journal import TrialState, open_study

COMPARED = ("space", "trial", "objective", "constraints", "objectives")


def warm_sources(config: StudyConfig) -> list[tuple[str, object]]:
    """[(study name, its state)] of the studies to warm start from, checked against `config`."""
    mine = config.to_dict()
    out = []
    for name in config.warm_start:
        if name == config.study:
            raise ConfigError(f"warm_start: {name!r} is this study itself: name earlier studies")
        try:
            state, theirs = open_study(config.workdir, name, warm_start=[])
        except ConfigError as e:
            raise ConfigError(f"warm_start: {e}") from None
        except DamagedFile as e:
            raise ConfigError(f"warm_start: study {name!r} cannot be read: {e}") from None
        theirs = theirs.to_dict()
        for key in COMPARED:
            if _comparable(theirs.get(key), key) != _comparable(mine.get(key), key):
                raise ConfigError(f"warm_start: study {name!r} has another {key} than this one: its results are not "
                                  f"this study's (start from a study with the same {key}, or drop warm_start)")
        out.append((name, state))
    return out


def _comparable(value, key: str):
    if key == "trial" and isinstance(value, dict):  # where each study prepares its data does not change results
        value = {**value, "data": {k: v for k, v in (value.get("data") or {}).items() if k != "cache_dir"}}
    return value


def finished_trials(sources) -> list[TrialState]:
    return [t for _, state in sources for t in sorted(state.finished, key=lambda t: t.trial)
            if t.status in ("ok", "failed", "infeasible")]
