"""What a trial is judged by beyond one loss: its metrics, constraints on them, several objectives at once.

    constraints = parse_constraints([{"metric": "peak_memory_gb", "max": 40, "kind": "pb"}])
    metrics = trial_metrics(summary, value)            # {"val_loss", "peak_memory_gb", "train_hours", ...}
    c = [k.value(metrics) for k in constraints]        # NOMAD's convention: c <= 0 is feasible
    prior = a_priori_metrics(point, trial_settings)   # known before training: trainable_params, adapter_mb
    front = pareto_front({trial: (f1, f2)}); hypervolume(front, reference); knee(front)

Metrics a trial reports (the names constraints, `objectives:` and `champion_rule:` use) are jobs/contract.py's
METRICS table, one row per metric (name, the result key the job reports, unit, MLflow name): val_loss,
train_loss, peak_memory_gb, trainable_params and adapter_mb (known before training), train_hours, total_hours,
tokens_per_s, heldout, dev.<task> (a task's dev-subset accuracy, with the held-out objective), ...
`python -c "from jobs.contract import OK, METRICS; [print(m.name, m.unit, m.what) for m in METRICS]"` lists them.

An `--objective` function reports metrics as keys of the dict it returns, by these names (or as a fine-tune's
raw peak_memory_bytes, train_s, total_s). A trial that does not report a judged metric is not feasible, and
its summary says which metric it lacked (`unjudged`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from jobs.contract import BY_NAME, OK, METRICS as TABLE, metrics_of

A_PRIORI = tuple(m.name for m in TABLE if m.a_priori)
METRICS = tuple(m.name for m in TABLE)  # jobs/contract.py METRICS: the one table of what a trial reports
TASKS = ("mmlu", "bbh", "drop", "humaneval")
KINDS = ("pb", "eb")  # NOMAD's progressive and extreme barriers


class CriteriaError(ValueError):
    """A bad constraint, objective or champion rule; the message names it and the fix."""


def known_metric(name: str) -> bool:
    return name in BY_NAME or (name.startswith("dev.") and name[4:] in TASKS)


@dataclass(frozen=True)
class Constraint:
    metric: str
    bound: float
    sense: str  # "max": metric <= bound; "min": metric >= bound
    kind: str   # "pb" (progressive barrier: a violation is penalized) or "eb" (extreme: never accepted)

    def value(self, metrics: dict) -> float | None:
        """NOMAD's constraint value: <= 0 feasible; None when the trial did not report the metric."""
        v = metrics.get(self.metric)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return None
        return float(v) - self.bound if self.sense == "max" else self.bound - float(v)

    @property
    def label(self) -> str:
        return f"{self.metric} {'<=' if self.sense == 'max' else '>='} {self.bound:g} ({self.kind})"


def parse_constraints(items) -> tuple[Constraint, ...]:
    """The study YAML's `constraints:` list; CriteriaError names the bad entry and the fix."""
    if items in (None, []):
        return ()
    if not isinstance(items, list):
        raise CriteriaError(f"constraints: must be a list such as [{{metric: peak_memory_gb, max: 40, kind: pb}}], "
                            f"got {items!r}")
    out = []
    for k, item in enumerate(items):
        where = f"constraints[{k}]"
        if not isinstance(item, dict) or set(item) - {"metric", "max", "min", "kind"}:
            raise CriteriaError(f"{where}: {item!r} must be a mapping of metric, max or min, and kind (pb or eb)")
        metric = item.get("metric")
        if not isinstance(metric, str) or not known_metric(metric):
            raise CriteriaError(f"{where}: metric {metric!r} is not one a trial reports; use one of "
                                f"{', '.join(METRICS)} or dev.<task> ({', '.join(TASKS)})")
        senses = [s for s in ("max", "min") if s in item]
        if len(senses) != 1:
            raise CriteriaError(f"{where}: give exactly one of max or min (the bound on {metric})")
        bound = item[senses[0]]
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
            raise CriteriaError(f"{where}: {senses[0]}={bound!r} must be a number (write 2.0e7, not a string)")
        kind = item.get("kind", "pb")
        if kind not in KINDS:
            raise CriteriaError(f"{where}: kind={kind!r} is invalid: pb (progressive barrier) or eb (extreme barrier)")
        out.append(Constraint(metric, float(bound), senses[0], kind))
    return tuple(out)


def parse_objectives(items) -> tuple[str, ...]:
    """The study YAML's `objectives:` list (two metrics, minimized); () for the single objective."""
    if items in (None, []):
        return ()
    if not isinstance(items, list) or len(items) != 2 or not all(isinstance(m, str) for m in items):
        raise CriteriaError(f"objectives: {items!r} must list two metrics to minimize, e.g. [val_loss, train_hours]")
    for m in items:
        if not known_metric(m):
            raise CriteriaError(f"objectives: {m!r} is not a metric a trial reports; use {', '.join(METRICS)} "
                                f"or dev.<task>")
    if items[0] == items[1]:
        raise CriteriaError(f"objectives: {items!r} names one metric twice: give two different ones")
    return tuple(items)


# ------------------------------------------------------------------------------------------- metrics
def trial_metrics(summary: dict, value: float | None) -> dict:
    """The metrics of a finished trial, by the names of jobs/contract.py's table, from its journaled summary."""
    return metrics_of(summary, value)


KNOWN_SHAPES = {  # hub models whose config.json cannot be read here:
    # (model_type, hidden, layers, heads, kv heads, head_dim, intermediate)
    "meta-llama/Llama-2-7b-hf": ("llama", 4096, 32, 32, 32, 128, 11008),
    "meta-llama/Llama-2-13b-hf": ("llama", 5120, 40, 40, 40, 128, 13824),
    "meta-llama/Meta-Llama-3-8B": ("llama", 4096, 32, 32, 8, 128, 14336),
    "meta-llama/Meta-Llama-3-8B-Instruct": ("llama", 4096, 32, 32, 8, 128, 14336),
    "meta-llama/Llama-3.1-8B": ("llama", 4096, 32, 32, 8, 128, 14336),
    "meta-llama/Llama-3.1-8B-Instruct": ("llama", 4096, 32, 32, 8, 128, 14336),
    "mistralai/Mistral-7B-v0.1": ("mistral", 4096, 32, 32, 8, 128, 14336),
    "mistralai/Mistral-7B-Instruct-v0.3": ("mistral", 4096, 32, 32, 8, 128, 14336),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 128, 18944),
    "Qwen/Qwen2.5-7B-Instruct": ("qwen2", 3584, 28, 28, 4, 128, 18944),
}
SHAPE_KEYS = ("model_type", "hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate")
# The linear layers LoRA may adapt, by family: name -> (in, out) from the shapes; "attention" names the
# attention block's. The models with Llama's layout (q/k/v/o_proj, gate/up/down_proj):
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite")


def _linear_layers(s: dict) -> tuple[dict, tuple] | None:
    """({module name: (in_features, out_features)}, the attention modules' names) of one layer, or None for a
    family not listed here (its counts are then known after training only)."""
    h, i, q, kv = s["hidden"], s["intermediate"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    if s["model_type"] in LLAMA_LIKE:
        return ({"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                 "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)},
                ("q_proj", "k_proj", "v_proj", "o_proj"))
    if s["model_type"] == "gpt_neox":
        return ({"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, i), "dense_4h_to_h": (i, h)},
                ("query_key_value", "dense"))
    return None


def model_shapes(base_model: str) -> dict | None:
    """Model type, hidden size, layers, heads, KV heads, head size and MLP size of a base model, read from its
    config.json without torch (None when unknown)."""
    if base_model in ("tiny", "tiny-chat"):
        from jobs.tiny import RECIPE
        return {"model_type": "llama", "hidden": RECIPE["hidden_size"], "layers": RECIPE["num_hidden_layers"],
                "heads": RECIPE["num_attention_heads"], "kv_heads": RECIPE["num_key_value_heads"],
                "head_dim": RECIPE["hidden_size"] // RECIPE["num_attention_heads"],
                "intermediate": RECIPE["intermediate_size"]}
    candidates = [Path(base_model).expanduser() / "config.json"]
    hub = Path.home() / ".cache" / "huggingface" / "hub" / f"models--{base_model.replace('/', '--')}" / "snapshots"
    if hub.is_dir():
        candidates += sorted(hub.glob("*/config.json"))
    for path in candidates:
        try:
            c = json.loads(path.read_text())
            c = c.get("text_config", c)  # a multimodal wrapper holds the language model's config inside
            h, heads = c["hidden_size"], c["num_attention_heads"]
            return {"model_type": c.get("model_type", ""), "hidden": h, "layers": c["num_hidden_layers"],
                    "heads": heads, "kv_heads": c.get("num_key_value_heads") or heads,
                    "head_dim": c.get("head_dim") or h // heads, "intermediate": c.get("intermediate_size") or 4 * h}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    if base_model in KNOWN_SHAPES:
        return dict(zip(SHAPE_KEYS, KNOWN_SHAPES[base_model]))
    return None


def a_priori_metrics(r: int, target_modules, shapes: dict | None, use_dora: bool = False) -> dict:
    """trainable_params and adapter_mb of LoRA rank r on `target_modules` (a list of names, "attention" or PEFT's
    "all-linear") of a model of these shapes: r x (in + out) per adapted layer, + out with DoRA (its magnitude
    vector). {} when the family's layers or one of the names are unknown: the count then comes after training."""
    layers = _linear_layers(shapes) if shapes and "model_type" in shapes else None
    if layers is None:
        return {}
    sizes, attention = layers
    names = list(sizes) if target_modules == "all-linear" else list(attention) if target_modules == "attention" \
        else list(target_modules)
    if not names or any(m not in sizes for m in names):
        return {}
    params = shapes["layers"] * sum(r * (sizes[m][0] + sizes[m][1]) + (sizes[m][1] if use_dora else 0)
                                    for m in names)
    return {"trainable_params": params, "adapter_mb": params * 4 / 1e6}


# ------------------------------------------------------------------------------------------- two objectives
def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: dict) -> dict:
    """{key: vector} of the non-dominated points of {key: vector} (minimization)."""
    return {k: v for k, v in points.items() if not any(dominates(w, v) for j, w in points.items() if j != k)}


def hypervolume(front: dict, reference) -> float:
    """The area dominated by a 2-objective front and bounded by `reference` (minimization)."""
    pts = sorted(v for v in front.values() if v[0] < reference[0] and v[1] < reference[1])
    area, best_y = 0.0, reference[1]
    for x, y in pts:
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


def knee(front: dict):
    """The front's knee: the point farthest from the line through its two extremes (objectives normalized)."""
    if len(front) <= 2:
        return min(front, key=lambda k: front[k]) if front else None
    keys = list(front)
    lo = [min(front[k][i] for k in keys) for i in (0, 1)]
    span = [max(front[k][i] for k in keys) - lo[i] or 1.0 for i in (0, 1)]
    norm = {k: ((front[k][0] - lo[0]) / span[0], (front[k][1] - lo[1]) / span[1]) for k in keys}
    a, b = min(norm.values()), max(norm.values())
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0
    return max(keys, key=lambda k: abs(dy * (norm[k][0] - a[0]) - dx * (norm[k][1] - a[1])) / length)


RULE = re.compile(r"^\s*min\s+([\w.]+)(?:\s+s\.t\.\s+(.+))?\s*$")
CONDITION = re.compile(r"^\s*([\w.]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class ChampionRule:
    """`champion_rule:` as written, and parsed: "knee", or (objective, ((metric, "<=" | ">=", bound), ...))."""
    text: str
    parsed: object

    @classmethod
    def of(cls, text: str | None) -> "ChampionRule":
        return cls(text or "knee", parse_rule(text))


def parse_rule(text: str | None):
    """`champion_rule:` "knee" (default) or "min METRIC [s.t. METRIC <= NUMBER [and ...]]"."""
    if text in (None, "knee"):
        return "knee"
    match = RULE.match(str(text))
    if not match or not known_metric(match.group(1)):
        raise CriteriaError(f"champion_rule: {text!r} is invalid: write knee, or e.g. "
                            "'min val_loss s.t. train_hours <= 1.5'")
    conditions = []
    for part in (match.group(2) or "").split(" and ") if match.group(2) else []:
        c = CONDITION.match(part)
        if not c or not known_metric(c.group(1)):
            raise CriteriaError(f"champion_rule: condition {part.strip()!r} is invalid: write METRIC <= NUMBER")
        conditions.append((c.group(1), c.group(2), float(c.group(3))))
    return (match.group(1), tuple(conditions))


def pick(rule, candidates: dict, metrics: dict):
    """The champion among `candidates` ({key: objective vector}) by `rule` (parse_rule), given each key's
    metrics; None when no candidate satisfies it."""
    if rule == "knee":
        return knee(pareto_front(candidates))
    objective, conditions = rule
    ok = [k for k in candidates if objective in metrics[k] and all(
        c[0] in metrics[k] and (metrics[k][c[0]] <= c[2] if c[1] == "<=" else metrics[k][c[0]] >= c[2])
        for c in conditions)]
    return min(ok, key=lambda k: metrics[k][objective]) if ok else None


# ------------------------------------------------------------------------------------------- the study's judge
@dataclass
class Verdict:
    """How a finished trial reads under the study's criteria."""
    told: object                  # what the searcher is told: a float, a pair of floats, or None (a failure)
    constraints: list | None      # c_j per constraint (<= 0 feasible), None when the trial failed
    feasible: bool
    metrics: dict
    missing: tuple = ()           # constrained or objective metrics the (successful) trial did not report


def searcher_criteria(config) -> dict:
    """What make_searcher needs to know of the study's criteria: n_objectives and the constraints' kinds."""
    return {"n_objectives": 2 if config.objectives else 1, "constraints": tuple(k.kind for k in config.constraints)}


def _memory_estimate(config, point: dict) -> float | None:
    """GiB a rank of this point's fine-tune needs (jobs/memory.py device_gb), None for a model it cannot read."""
    from jobs.memory import estimate_spec, world_size
    spec = config.trial_spec(point, str(config.folder / "trials" / "estimate")).to_dict()
    found = estimate_spec(spec, world_size(config.resources.to_dict()))
    return found["device_gb"] if found else None


class Judge:
    """The study's constraints and objectives applied to trials (before training where possible)."""

    def __init__(self, config):
        """`config`: a typed StudyConfig (orchestrator/config.py): its criteria are parsed there, once."""
        self.constraints, self.objectives = tuple(config.constraints), tuple(config.objectives)
        rule = config.champion_rule or ChampionRule.of(None)
        self.rule = rule.parsed if self.objectives else None
        # one objective, `champion_rule: mean`: the champion by a model's mean (orchestrator/search/model_mean.py)
        self.mean = rule.parsed == "mean" and not self.objectives
        self.space = config.space
        self.objective = "heldout" if config.heldout else "val_loss"
        self.shapes = model_shapes(config.trial.base_model) if config.function is None and self.constraints else None
        targets = config.trial.target_modules  # a list of names, or "attention" / "all-linear"
        self.targets = targets if isinstance(targets, str) else list(targets)
        self.trial = config.trial
        # the memory estimate needs the whole trial spec: a callable from the config (no point: none)
        self._memory = (lambda point: _memory_estimate(config, point)) \
            if config.function is None and any(k.metric == "peak_memory_gb_estimate" for k in self.constraints) \
            else None

    @property
    def active(self) -> bool:
        return bool(self.constraints or self.objectives)

    def before(self, point: dict) -> tuple[dict, str | None]:
        """(metrics known before training, why the point is infeasible already, or None)."""
        r, dora = point.get("r", self.trial.r), bool(point.get("use_dora", self.trial.use_dora))
        prior = a_priori_metrics(int(r), point.get("target_modules", self.targets), self.shapes, dora) \
            if self.constraints else {}
        if self._memory is not None:
            estimate = self._memory(point)
            if estimate is not None:
                prior["peak_memory_gb_estimate"] = estimate
        for k in self.constraints:
            c = k.value(prior) if k.metric in A_PRIORI else None
            if c is not None and c > 0:
                return prior, f"infeasible before training: {k.metric} {prior[k.metric]:.4g} violates {k.label}"
        return prior, None

    def after(self, status: str, value: float | None, summary: dict) -> Verdict:
        """The verdict on a finished trial (status ok with its value and summary, or not ok)."""
        metrics = trial_metrics(summary, value) if status == OK else {}
        if status == OK:
            metrics[self.objective] = value
        c = [k.value(metrics) for k in self.constraints] if status == OK else None
        missing = tuple(m for m in [k.metric for k in self.constraints] + list(self.objectives)
                        if status == OK and m not in metrics)
        if c is not None and any(v is None for v in c):
            c = None  # a constrained metric the trial did not report: it cannot be judged, so it fails
        feasible = status == OK and c is not None and all(v <= 0 for v in c)
        if status != OK or c is None:
            told = None
        elif self.objectives:
            vector = [metrics.get(o) for o in self.objectives]
            told = tuple(vector) if all(v is not None for v in vector) else None
        else:
            told = value
        return Verdict(told, c, feasible, metrics, missing)
