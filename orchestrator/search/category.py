"""Categorical and boolean hyperparameters: a ``category`` entry of the search space (orchestrator/search/space.py).

    space:
      target_modules: {category: [[q_proj, v_proj], attention, all-linear], default: all-linear}
      use_dora:       {category: [false, true], default: false}

The values are any YAML scalars (strings, booleans, numbers) or lists of strings, in an order the user chooses.
Each searcher encodes them its own way:

- NOMAD (no categorical variables): an integer variable, the 1-based index in the declared order. MADS moves
  between neighbouring indices, so list the values in an order where neighbours are alike (by capacity:
  [q_proj, v_proj] < attention < all-linear; false < true). The order is part of the space: another order is
  another space for NOMAD (its mesh neighbours change), the same one for the others.
- TPE (NNI) and Optuna: a categorical choice over the values' labels (below), without order.
- random: uniform over the values.

A value's label names it in keys, journals and TPE's parameters: a string is itself, a boolean is true/false,
a number its repr, a list of strings its items joined by "+" (q_proj+v_proj). Labels must be distinct.
Points carry the values themselves (a list stays a list, so it reaches FinetuneSpec.target_modules as is).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np


def label(v: Any) -> str:
    """The text naming a categorical value (see the module docstring)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v):
        return "+".join(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return repr(float(v)) if isinstance(v, (float, np.floating)) else repr(int(v))
    return json.dumps(v, sort_keys=True, default=str)


def _frozen(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _thawed(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@dataclass(frozen=True)
class Category:
    """Values in a declared order; NOMAD index i (1-based) <-> values[i-1]; TPE a choice over their labels."""
    name: str
    values: tuple      # lists stored as tuples (a frozen space); points get them back as lists
    default: Any

    @property
    def labels(self) -> tuple:
        return tuple(label(v) for v in self.values)

    def _at(self, i: int) -> Any:
        return _thawed(self.values[i])

    def contains(self, v: Any) -> bool:
        return label(v) in self.labels

    def canonical(self, v: Any) -> Any:
        if not self.contains(v):
            raise ValueError(f"{self.name}={v!r} is not one of the categories {list(self.labels)}")
        return self._at(self.labels.index(label(v)))

    def nomad(self) -> tuple[str, float, float]:
        return "I", 1, len(self.values)

    def to_nomad(self, v: Any) -> int:
        return self.labels.index(label(self.canonical(v))) + 1

    def from_nomad(self, x: float) -> Any:
        return self._at(int(min(max(round(x), 1), len(self.values))) - 1)

    def tpe(self) -> tuple[str, dict]:
        return self.name, {"_type": "choice", "_value": list(self.labels)}

    def to_tpe(self, v: Any) -> str:
        return label(self.canonical(v))

    def from_tpe(self, params: dict) -> Any:
        return self.canonical_label(params[self.name])

    def canonical_label(self, text: str) -> Any:
        """The value named by a label (TPE's and Optuna's parameters are labels)."""
        return self._at(self.labels.index(text))

    def sample(self, rng: np.random.Generator) -> Any:
        return self._at(int(rng.integers(len(self.values))))

    def key(self, v: Any) -> str:
        return label(self.canonical(v))

    def to_yaml(self) -> dict:
        return {"category": [_thawed(v) for v in self.values], "default": _thawed(self.default)}


def parse_category(name: str, where: str, raw: Any, default: Any, error: type) -> Category:
    """A `category:` entry; `error` (SpaceError) names the key, the bad value and the fix."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise error(f"{where}: 'category' needs a non-empty list of values, got {raw!r}; "
                    "write e.g. category: [[q_proj, v_proj], attention, all-linear]")
    for v in raw:
        ok = isinstance(v, (str, bool, int, float)) or (
            isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v))
        if not ok:
            raise error(f"{where}: category value {v!r} is not a string, boolean, number or list of strings")
    labels = [label(v) for v in raw]
    if len(set(labels)) != len(labels):
        raise error(f"{where}: categories {list(raw)!r} repeat a value; list each once")
    if label(default) not in labels:
        raise error(f"{where}: default {default!r} is not one of the categories {labels}; pick one of them")
    values = tuple(_frozen(v) for v in raw)
    return Category(name, values, values[labels.index(label(default))])
