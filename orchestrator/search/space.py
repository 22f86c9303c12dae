"""The hyperparameter search space, declared once as typed data and encoded per algorithm.

The study YAML declares one entry per hyperparameter; each entry has exactly one kind key:

    space:
      r:       {choice: [4, 8, 16, 32, 64, 128, 256, 512], default: 8}
      alpha:   {int: [1, 64], default: 32}
      dropout: {choice: [0, 1.0e-4, 1.0e-3, 1.0e-2, 1.0e-1, 1], default: 0.1}
      lr:      {log: [1.0e-6, 1.0e-3], default: 1.0e-5}
      epochs:  {fixed: 2}
      target_modules: {fixed: [q_proj, v_proj]}

- ``choice``: an ordered list of numbers (strictly increasing). NOMAD sees the 1-based index of the
  value (an integer, so that MADS can move between neighbours); TPE sees a categorical choice.
- ``int``: integers in [low, high]. NOMAD: an integer variable; TPE: uniform on [low, high],
  truncated to an int and clipped (as the paper: ``int(uniform(1, 64))``, so ``high`` itself is
  almost never drawn by TPE).
- ``log`` (alias ``loguniform``): reals in [low, high] with 0 < low < high, searched on log10.
  NOMAD: a real variable log10(value); TPE: uniform on log10 under the name ``<name>_log10``.
- ``fixed``: a value held constant (any YAML value); never searched, passed through decoded points.
- ``category``: values of any kind (strings, booleans, lists of strings) in a declared order, e.g.
  ``target_modules: {category: [[q_proj, v_proj], attention, all-linear], default: all-linear}`` or
  ``use_dora: {category: [false, true], default: false}``. NOMAD: the 1-based index in that order (list
  neighbours that are alike next to each other); TPE and Optuna: a categorical choice; orchestrator/search/category.py.

Named spaces: ``space: paper`` (the default, ``paper_space()``) and ``space: modern`` (``modern_space()``: the
hyperparameters people tune today, below) in the study YAML; ``named_space(name)`` builds them.

Every searched entry needs a ``default``: together they make the starting point (NOMAD's X0, the
``default`` searcher's only point). NOMAD's variables follow the declaration order (MADS's path
depends on it: same seed, other order, other points), except in ``paper_space()``: there NOMAD sees
the authors' NOMAD order (r index, dropout index, alpha, log10 lr), X0 (2 5 32 -5), while points,
keys, TPE and plots keep the order of the paper's table and figures (r, alpha, dropout, lr).
Numbers may be given as strings ("1e-6"), because PyYAML reads ``1e-6`` without a dot as a string.
An invalid space raises :class:`SpaceError` naming the key, the bad value and the fix.

A decoded point is a plain dict of python ints/floats (plus the fixed values), for example
``{"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-05, "epochs": 2}``.

Try it: ``python -c "from orchestrator.search.space import paper_space; print(paper_space().default_point())"``
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.search.category import Category, parse_category

KINDS = ("choice", "int", "log", "loguniform", "fixed", "category")
_TPE_LOG_SUFFIX = "_log10"


class SpaceError(ValueError):
    """An invalid search-space declaration; the message names the key, the bad value and the fix."""


def _number(where: str, value: Any, what: str) -> float | int:
    """A YAML number, also from a numeric string; bools are not numbers here."""
    if isinstance(value, bool):
        raise SpaceError(f"{where}: {what} must be a number, got {value!r}; write a number")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise SpaceError(f"{where}: {what} must be finite, got {value!r}; write a finite number")
        return value
    if isinstance(value, str):
        try:
            return _number(where, float(value), what)
        except ValueError:
            pass
    raise SpaceError(f"{where}: {what} must be a number, got {value!r}; write a number such as 1.0e-5")


def _pair(where: str, value: Any, kind: str) -> tuple[Any, Any]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SpaceError(f"{where}: '{kind}' needs [low, high], got {value!r}; write e.g. {kind}: [1, 64]")
    return value[0], value[1]


@dataclass(frozen=True)
class Choice:
    """An ordered list of numbers; NOMAD index i (1-based) <-> values[i-1]."""
    name: str
    values: tuple
    default: float | int

    def contains(self, v: Any) -> bool:
        return _is_number(v) and any(_same(v, c) for c in self.values)

    def canonical(self, v: Any) -> float | int:
        for c in self.values:
            if _is_number(v) and _same(v, c):
                return c
        raise ValueError(f"{self.name}={v!r} is not one of the choices {list(self.values)}")

    def nomad(self) -> tuple[str, float, float]:
        return "I", 1, len(self.values)

    def to_nomad(self, v: Any) -> int:
        return self.values.index(self.canonical(v)) + 1

    def from_nomad(self, x: float) -> float | int:
        return self.values[int(min(max(round(x), 1), len(self.values))) - 1]

    def tpe(self) -> tuple[str, dict]:
        return self.name, {"_type": "choice", "_value": list(self.values)}

    def to_tpe(self, v: Any) -> float | int:
        return self.canonical(v)

    def from_tpe(self, params: dict) -> float | int:
        return self.canonical(params[self.name])

    def sample(self, rng: np.random.Generator) -> float | int:
        return self.values[int(rng.integers(len(self.values)))]

    def key(self, v: Any) -> str:
        return repr(self.canonical(v))


@dataclass(frozen=True)
class Int:
    """Integers in [low, high]."""
    name: str
    low: int
    high: int
    default: int

    def contains(self, v: Any) -> bool:
        return _is_number(v) and float(v).is_integer() and self.low <= v <= self.high

    def canonical(self, v: Any) -> int:
        return int(min(max(int(v), self.low), self.high))

    def nomad(self) -> tuple[str, float, float]:
        return "I", self.low, self.high

    def to_nomad(self, v: Any) -> int:
        return self.canonical(v)

    def from_nomad(self, x: float) -> int:
        return self.canonical(round(x))

    def tpe(self) -> tuple[str, dict]:
        return self.name, {"_type": "uniform", "_value": [self.low, self.high]}

    def to_tpe(self, v: Any) -> float:
        return float(v)

    def from_tpe(self, params: dict) -> int:
        return self.canonical(math.trunc(params[self.name]))  # the paper truncates, then we clip

    def sample(self, rng: np.random.Generator) -> int:
        return int(rng.integers(self.low, self.high + 1))

    def key(self, v: Any) -> str:
        return str(int(v))


@dataclass(frozen=True)
class Log:
    """Reals in [low, high], searched on log10."""
    name: str
    low: float
    high: float
    default: float

    def contains(self, v: Any) -> bool:
        return _is_number(v) and v > 0 and self.low * (1 - 1e-9) <= v <= self.high * (1 + 1e-9)

    def canonical(self, v: Any) -> float:
        return float(min(max(float(v), self.low), self.high))

    def nomad(self) -> tuple[str, float, float]:
        return "R", math.log10(self.low), math.log10(self.high)

    def to_nomad(self, v: Any) -> float:
        return math.log10(v)

    def from_nomad(self, x: float) -> float:
        return self.canonical(10.0 ** x)

    def tpe(self) -> tuple[str, dict]:
        return self.name + _TPE_LOG_SUFFIX, {"_type": "uniform",
                                             "_value": [math.log10(self.low), math.log10(self.high)]}

    def to_tpe(self, v: Any) -> float:
        return math.log10(v)

    def from_tpe(self, params: dict) -> float:
        return self.canonical(10.0 ** params[self.name + _TPE_LOG_SUFFIX])

    def sample(self, rng: np.random.Generator) -> float:
        return self.canonical(10.0 ** rng.uniform(math.log10(self.low), math.log10(self.high)))

    def key(self, v: Any) -> str:
        # 9 decimals of log10: points closer than ~2e-9 relative are one point (NOMAD's reals jitter)
        return f"10^{round(math.log10(v), 9):.9f}"


@dataclass(frozen=True)
class Fixed:
    """A constant passed through decoded points, never searched."""
    name: str
    value: Any


Dimension = Choice | Int | Log | Category


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)


@dataclass(frozen=True)
class SearchSpace:
    """Searched dimensions (in declaration order) plus fixed values.

    ``nomad_order``: the searched names in the order NOMAD's vectors use (X0, bounds, points);
    empty = the declaration order.
    """
    dims: tuple
    fixed: tuple = ()
    nomad_order: tuple = ()

    def __post_init__(self):
        if self.nomad_order and sorted(self.nomad_order) != sorted(self.names):
            raise SpaceError(f"nomad_order {list(self.nomad_order)} must list each of {self.names} once")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Any) -> "SearchSpace":
        if not isinstance(d, dict) or not d:
            raise SpaceError(f"space: expected a mapping of hyperparameter -> spec, got {d!r}; "
                             "write e.g. {lr: {log: [1.0e-6, 1.0e-3], default: 1.0e-5}}")
        dims, fixed = [], []
        for name, spec in d.items():
            item = _parse_entry(name, spec)
            (fixed if isinstance(item, Fixed) else dims).append(item)
        if not dims:
            raise SpaceError(f"space: nothing to search, got only fixed keys {[f.name for f in fixed]}; "
                             "declare at least one choice/int/log hyperparameter")
        tpe_names = [dim.tpe()[0] for dim in dims]
        for dim, tpe_name in zip(dims, tpe_names):
            if tpe_name != dim.name and tpe_name in d:
                raise SpaceError(f"space.{tpe_name}: name clashes with the TPE encoding of "
                                 f"'{dim.name}'; rename '{tpe_name}'")
        return cls(tuple(dims), tuple(fixed))

    # -- points ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [dim.name for dim in self.dims]

    def _with_fixed(self, searched: dict) -> dict:
        point = dict(searched)
        point.update({f.name: f.value for f in self.fixed})
        return point

    def default_point(self) -> dict:
        return self._with_fixed({dim.name: dim.canonical(dim.default) for dim in self.dims})

    def contains(self, point: dict) -> bool:
        expected = set(self.names) | {f.name for f in self.fixed}
        if not isinstance(point, dict) or not set(self.names) <= set(point) <= expected:
            return False
        if any(f.name in point and point[f.name] != f.value for f in self.fixed):
            return False
        return all(dim.contains(point[dim.name]) for dim in self.dims)

    def key(self, point: dict) -> str:
        """A stable string identifying the searched part of a point (fixed values ignored)."""
        return ",".join(f"{dim.name}={dim.key(point[dim.name])}" for dim in self.dims)

    def sample(self, rng: np.random.Generator) -> dict:
        """One point drawn uniformly per dimension (log-uniformly for ``log``)."""
        return self._with_fixed({dim.name: dim.sample(rng) for dim in self.dims})

    # -- NOMAD (vectors in nomad_order) --------------------------------------------------------
    @property
    def _nomad_dims(self) -> tuple:
        by_name = {dim.name: dim for dim in self.dims}
        return tuple(by_name[name] for name in self.nomad_order) if self.nomad_order else self.dims

    def nomad_input_types(self) -> list[str]:
        return [dim.nomad()[0] for dim in self._nomad_dims]

    def nomad_bounds(self) -> tuple[list[float], list[float]]:
        dims = self._nomad_dims
        return [dim.nomad()[1] for dim in dims], [dim.nomad()[2] for dim in dims]

    def nomad_x0(self) -> list[float]:
        return self.to_nomad(self.default_point())

    def to_nomad(self, point: dict) -> list[float]:
        return [dim.to_nomad(point[dim.name]) for dim in self._nomad_dims]

    def from_nomad(self, x: list[float]) -> dict:
        if len(x) != len(self.dims):
            raise ValueError(f"NOMAD point {x!r} has {len(x)} coordinates, the space has {len(self.dims)}")
        values = {dim.name: dim.from_nomad(float(v)) for dim, v in zip(self._nomad_dims, x)}
        return self._with_fixed({name: values[name] for name in self.names})   # declaration order

    # -- TPE (NNI search-space format) -------------------------------------------------------
    def tpe_search_space(self) -> dict:
        return dict(dim.tpe() for dim in self.dims)

    def to_tpe(self, point: dict) -> dict:
        return {dim.tpe()[0]: dim.to_tpe(point[dim.name]) for dim in self.dims}

    def from_tpe(self, params: dict) -> dict:
        return self._with_fixed({dim.name: dim.from_tpe(params) for dim in self.dims})


def _parse_entry(name: Any, spec: Any):
    if not isinstance(name, str) or not name.isidentifier():
        raise SpaceError(f"space: hyperparameter name {name!r} is not an identifier; use letters, digits, _")
    where = f"space.{name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping with one of {KINDS}, got {spec!r}; "
                         f"write e.g. {name}: {{fixed: {spec!r}}}")
    kinds = [k for k in spec if k in KINDS]
    unknown = [k for k in spec if k not in KINDS and k != "default"]
    if unknown:
        raise SpaceError(f"{where}: unknown key(s) {unknown}; valid keys are {list(KINDS)} and 'default'")
    if len(kinds) != 1:
        raise SpaceError(f"{where}: needs exactly one kind key among {list(KINDS)}, got {kinds or list(spec)}; "
                         "keep one")
    kind = kinds[0]
    if kind == "fixed":
        if "default" in spec:
            raise SpaceError(f"{where}: a fixed value takes no default (got default={spec['default']!r}); "
                             "remove 'default'")
        return Fixed(name, spec["fixed"])
    if "default" not in spec:
        raise SpaceError(f"{where}: missing 'default' (the starting point, NOMAD's X0); add default: <value>")
    if kind == "category":
        return parse_category(name, where, spec[kind], spec["default"], SpaceError)
    parse = {"choice": _parse_choice, "int": _parse_int, "log": _parse_log, "loguniform": _parse_log}[kind]
    return parse(name, where, spec[kind], spec["default"])


def _parse_choice(name: str, where: str, raw: Any, default: Any) -> Choice:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise SpaceError(f"{where}: 'choice' needs a non-empty list of numbers, got {raw!r}; "
                         "write e.g. choice: [4, 8, 16]")
    values = [_number(where, v, "each choice") for v in raw]
    if any(isinstance(v, float) for v in values):  # one float makes them all floats: one python type
        values = [float(v) for v in values]
    else:
        values = [int(v) for v in values]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise SpaceError(f"{where}: choices {list(raw)!r} are not strictly increasing (NOMAD encodes them "
                         "as ordered indices); list them in ascending order without duplicates")
    default = _number(where, default, "default")
    match = [v for v in values if _same(v, default)]
    if not match:
        raise SpaceError(f"{where}: default {default!r} is not one of the choices {values}; "
                         "pick one of them")
    return Choice(name, tuple(values), match[0])


def _parse_int(name: str, where: str, raw: Any, default: Any) -> Int:
    low, high = (_number(where, v, "an int bound") for v in _pair(where, raw, "int"))
    if not float(low).is_integer() or not float(high).is_integer():
        raise SpaceError(f"{where}: int bounds must be integers, got {raw!r}; write e.g. int: [1, 64]")
    low, high = int(low), int(high)
    if low >= high:
        raise SpaceError(f"{where}: low >= high in {raw!r}; write [low, high] with low < high")
    default = _number(where, default, "default")
    if not float(default).is_integer() or not low <= default <= high:
        raise SpaceError(f"{where}: default {default!r} is not an integer in [{low}, {high}]; "
                         "pick one in range")
    return Int(name, low, high, int(default))


def _parse_log(name: str, where: str, raw: Any, default: Any) -> Log:
    low, high = (float(_number(where, v, "a log bound")) for v in _pair(where, raw, "log"))
    if low <= 0 or high <= 0:
        raise SpaceError(f"{where}: log bounds must be > 0, got {raw!r}; use positive bounds "
                         "such as [1.0e-6, 1.0e-3]")
    if low >= high:
        raise SpaceError(f"{where}: low >= high in {raw!r}; write [low, high] with low < high")
    default = float(_number(where, default, "default"))
    if not low <= default <= high:
        raise SpaceError(f"{where}: default {default!r} is outside [{low}, {high}]; pick one in range")
    return Log(name, low, high, default)


def paper_space() -> SearchSpace:
    """The search space of Tribes et al. (arXiv 2312.00949), Table 1, defaults = X0.

    Declared in the order of the paper's table and figures; NOMAD gets the order of the authors'
    NOMAD parameter file, (r, dropout, alpha, lr), so that its X0 is theirs, (2 5 32 -5), and a seed
    walks their MADS path. A permutation for NOMAD alone, because the paper itself uses both orders,
    and the rest (TPE's and random search's draws, keys, journals, plots) stays as it was.
    """
    space = SearchSpace.from_dict({
        "r": {"choice": [4, 8, 16, 32, 64, 128, 256, 512], "default": 8},
        "alpha": {"int": [1, 64], "default": 32},
        "dropout": {"choice": [0, 1e-4, 1e-3, 1e-2, 1e-1, 1], "default": 0.1},
        "lr": {"log": [1e-6, 1e-3], "default": 1e-5},
    })
    return dataclasses.replace(space, nomad_order=("r", "dropout", "alpha", "lr"))


def modern_space() -> SearchSpace:
    """What labs tune today (issue 22): r, alpha as a multiple of r, dropout, lr, which layers (q,v / attention /
    all linear), rsLoRA, DoRA, epochs, warm-up, weight decay and the effective batch. Each name is a
    FinetuneSpec field (jobs/spec.py). Defaults: QLoRA-era common practice (r 16, alpha 2r, all linear
    layers, lr 2e-4, 3% warm-up), except the effective batch and epochs, which stay the paper's 128 and 2."""
    return SearchSpace.from_dict({
        "r": {"choice": [4, 8, 16, 32, 64, 128, 256], "default": 16},
        "alpha_ratio": {"choice": [0.5, 1, 2, 4], "default": 2},
        "dropout": {"choice": [0, 0.01, 0.05, 0.1, 0.2], "default": 0.05},
        "lr": {"log": [1e-5, 1e-3], "default": 2e-4},
        "target_modules": {"category": [["q_proj", "v_proj"], "attention", "all-linear"], "default": "all-linear"},
        "use_rslora": {"category": [False, True], "default": False},
        "use_dora": {"category": [False, True], "default": False},
        "epochs": {"choice": [1, 2, 3], "default": 2},
        "warmup_ratio": {"choice": [0, 0.03, 0.1], "default": 0.03},
        "weight_decay": {"choice": [0, 0.01, 0.1], "default": 0},
        "effective_batch": {"choice": [16, 32, 64, 128], "default": 128},
    })


SPACES = {"paper": paper_space, "modern": modern_space}


def named_space(name: str) -> SearchSpace:
    if name not in SPACES:
        raise SpaceError(f"space: {name!r} is not a named space; use one of {', '.join(SPACES)}, or a mapping")
    return SPACES[name]()
