"""NOMAD's parameter lines for the ``paper`` profile (nomad.py), checked before NOMAD ever sees them.

``nomad_parameters(space, budget=..., parallel=..., seed=..., options=..., n_objectives=1, kinds=())``
writes the lines derived from the study (input and output types, budget, block size, seed), then the
paper's defaults (two objectives: DMultiMADS's), then the user's ``options``. NOMAD crashes the whole
process on a bad parameter (segfault), so user options are first tried in a 2-evaluation NOMAD run in
a subprocess (``_CHECK_SCRIPT``: PyNomad is imported there, never here); its complaint becomes a
ValueError. Tested by ``python -m pytest tests/test_searchers.py -k options``.
"""
from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from typing import Any

from orchestrator.search.space import SearchSpace

PAPER_DEFAULTS = {
    "DIRECTION_TYPE": "ORTHO N+1 QUAD",
    "QUAD_MODEL_SEARCH": True,
    "NM_SEARCH": True,
    "SPECULATIVE_SEARCH": True,
    "EVAL_OPPORTUNISTIC": True,
    "DISPLAY_DEGREE": 0,
}
# Two objectives: DMultiMADS refuses ORTHO N+1 QUAD: its nearest, N+1 directions completed by the
# negative sum; the middle-point search fills the front's gaps (measured in bench/multi_criteria.py)
MULTI_DEFAULTS = {"DMULTIMADS_OPTIMIZATION": True, "DIRECTION_TYPE": "ORTHO N+1 NEG",
                  "DMULTIMADS_MIDDLEPOINT_SEARCH": True}
RESERVED = ("DIMENSION", "BB_INPUT_TYPE", "BB_OUTPUT_TYPE", "LOWER_BOUND", "UPPER_BOUND", "X0",
            "MAX_BB_EVAL", "BB_MAX_BLOCK_SIZE", "SEED", "DMULTIMADS_OPTIMIZATION")


def _format(name: str, value: Any) -> str:
    if isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, (list, tuple)):
        text = " ".join(str(v) for v in value)
    else:
        text = str(value)
    if not text.isascii() or "\n" in text or not text.strip():
        raise ValueError(f"nomad option {name}={value!r}: NOMAD wants one non-empty ASCII line")
    return f"{name} {text}"


def output_types(n_objectives: int = 1, kinds: tuple = ()) -> str:
    """NOMAD's BB_OUTPUT_TYPE: the objectives, then one PB or EB per constraint, in the told order."""
    return " ".join(["OBJ"] * n_objectives + [kind.upper() for kind in kinds])


def nomad_parameters(space: SearchSpace, *, budget: int, parallel: int, seed: int,
                     options: dict, n_objectives: int = 1, kinds: tuple = ()) -> list[str]:
    """NOMAD parameter lines: those derived from the arguments, then defaults overridden by options."""
    for name in options:
        if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
            raise ValueError(f"nomad option {name!r} is not a NOMAD parameter name (upper case, "
                             "e.g. DIRECTION_TYPE; see PyNomad.help()) nor 'profile'")
        if name == "DISPLAY_DEGREE" and options[name] not in (0, 1, 2, 3):
            raise ValueError(f"nomad option DISPLAY_DEGREE={options[name]!r}; use 0, 1, 2 or 3")
        if name in RESERVED:
            raise ValueError(f"nomad option {name} is set by the searcher from the space, budget, "
                             f"parallel, seed and criteria; remove it (reserved: {list(RESERVED)})")
    lines = [f"BB_INPUT_TYPE ({' '.join(space.nomad_input_types())})",
             f"BB_OUTPUT_TYPE {output_types(n_objectives, kinds)}", f"MAX_BB_EVAL {budget}", f"SEED {seed}"]
    if parallel > 1:
        lines.append(f"BB_MAX_BLOCK_SIZE {parallel}")
    defaults = {**PAPER_DEFAULTS, **(MULTI_DEFAULTS if n_objectives > 1 else {})}
    lines += [_format(k, v) for k, v in {**defaults, **options}.items()]
    if options:  # ours are known good; a bad user parameter makes NOMAD crash the process
        lower, upper = space.nomad_bounds()
        _check_in_subprocess(json.dumps([space.nomad_x0(), lower, upper, lines]))
    return lines


# Runs NOMAD for 2 evaluations on the real parameters, silently: any complaint means a bad option.
_CHECK_SCRIPT = """
import json, sys, PyNomad
x0, lower, upper, lines = json.loads(sys.stdin.read())
lines = [l for l in lines if not l.startswith(("MAX_BB_EVAL", "DISPLAY_DEGREE"))]
lines += ["MAX_BB_EVAL 2", "DISPLAY_DEGREE 0"]
calls = []
types = next(l for l in lines if l.startswith("BB_OUTPUT_TYPE")).split()[1:]
outputs = " ".join("1.0" if t == "OBJ" else "-1.0" for t in types).encode()
def one(x):
    calls.append(1); x.setBBO(outputs); return 1
def block(b):
    for k in range(b.size()):
        calls.append(1); b.get_x(k).setBBO(outputs)
    return [1] * b.size()
blocks = any(l.startswith("BB_MAX_BLOCK_SIZE") for l in lines)
PyNomad.optimize(block if blocks else one, x0, lower, upper, lines)
sys.stdout.flush()
print("OK" if calls else "NO EVALUATION")
"""


@functools.lru_cache(maxsize=32)
def _check_in_subprocess(problem_json: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _CHECK_SCRIPT], input=problem_json, text=True,
                          capture_output=True, timeout=120)
    output = proc.stdout + proc.stderr
    complaints = ("Unknown parameter", "Error", "Exception", "Warning")
    if proc.returncode != 0 or proc.stdout.strip().splitlines()[-1:] != ["OK"] or \
            any(word in output for word in complaints):
        lines = [re.sub(r"\(/[^)]*\)\s*", "", line).strip() for line in output.splitlines()]
        lines = [line for line in lines if line and "report to develop" not in line and line != "OK"]
        lines.sort(key=lambda line: not line.startswith(("Warning", "Unknown", "line")))
        said = " | ".join(lines)
        raise ValueError(f"NOMAD rejects the nomad options (exit code {proc.returncode}): {said[:500]}; "
                         "fix them (PyNomad.help('NAME') documents a parameter)")
