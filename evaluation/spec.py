"""What one downstream evaluation runs and under which protocol (torch-free: the orchestrator imports this).

    from evaluation.spec import EvaluationSpec, evaluation_settings
    spec = EvaluationSpec(base="tiny", adapter="runs/demo/adapter", tasks="mmlu,humaneval", out="runs/eval/demo")
    spec.protocol()    # {"eval.protocol.decoding": "reference", "eval.protocol.dtype": "fp32", ...}: logged, compared
    settings = evaluation_settings({"decoding": "greedy", "limit": 20})   # a study YAML's `evaluation:` mapping

Every protocol option defaults to what InstructEval does, except where InstructEval's choice is a defect
(mmlu_cells) or ours gets the same result more cheaply (batch_size, attn_implementation, tokenizer); the table,
with each one's effect, is evaluation/PROTOCOL.md:
  humaneval_cut  blank-line (InstructEval: up to the first blank line) | top-level (also before a top-level
                 def/class/if/print line: turns some reference failures into passes, and some passes into failures)
  decoding       reference (no sampling arguments: the checkpoint's generation_config decides, HumanEval adds
                 do_sample=True, temperature=0.1, as InstructEval) | greedy | sampling (temperature, top_p, seeds)
  dtype          fp32 (InstructEval loads without a dtype) | bf16 | fp16 | auto (bf16 on a GPU, fp32 on a CPU)
  merge          false (the adapter stays a separate branch, as InstructEval) | true (merged in fp32, then cast)
  mmlu_cells     text (the data set's strings) | pandas (as InstructEval's pd.read_csv read the CSVs: "None", "NA"
                 -> "nan", a numeric column with a gap -> "2.0"): the reference's is a defect, hence not the default
  attn_implementation  sdpa | eager (Llama's attention in 2023, InstructEval's)
  tokenizer      fast | slow (the SentencePiece tokenizer InstructEval loaded; needs sentencepiece)
A bad value raises ProtocolError (an EvalError, so a ValueError) with a one-line message naming the field, the
value and the valid choices; `python -m evaluation` prints it and exits 2 before anything runs.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.tasks import NAMES
from evaluation.tasks.common import EvalError

HARNESSES = ("instructeval", "lm-eval")
CUTS = ("blank-line", "top-level")
DECODINGS = ("reference", "greedy", "sampling")
DTYPES = ("fp32", "bf16", "fp16", "auto")
MMLU_CELLS = ("text", "pandas")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
TOKENIZERS = ("fast", "slow")
PROTOCOL = ("harness", "humaneval_cut", "decoding", "temperature", "top_p", "seeds", "dtype", "merge", "limit",
            "seed", "split", "dev_sizes", "split_seed", "mmlu_cells", "attn_implementation",
            "tokenizer")  # what changes a score: logged with it, compared before rows are put side by side
INSTRUCTEVAL_ONLY = ("humaneval_cut", "decoding", "temperature", "top_p", "seeds", "merge", "mmlu_cells",
                     "attn_implementation", "tokenizer")
NOT_SETTINGS = ("base", "adapter", "out", "tracking_uri")  # per evaluation, not per study
PROTOCOL_PREFIX = "eval.protocol."


class ProtocolError(EvalError):
    """A bad evaluation setting; the one-line message names the field, the value and the valid choices."""


def _help(text: str, default=None, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class EvaluationSpec:
    """One evaluation of a (base model, adapter) pair: what to score, how, where the results go."""

    base: str | None = _help("base model: hub id, local HF folder or tiny (None: the one in adapter_config.json)")
    adapter: str | None = _help("PEFT folder, fine-tune output folder, runs:/RUN_ID/PATH or models:/NAME@ALIAS")
    tasks: str | None = _help("comma-separated: mmlu,bbh,drop,humaneval (None: all four); lm-eval: its task names")
    limit: int | None = _help("first N test examples per MMLU subject / BBH subset, N for DROP and HumanEval")
    data_dir: str | None = _help("local benchmark folders (layout: evaluation/data.py); None: the hub")
    out: str | None = _help("output folder for scores.json and records/")
    harness: str = _help("instructeval: the paper's protocol; lm-eval: lm-evaluation-harness tasks, its protocols",
                         "instructeval")
    include_path: str | None = _help("lm-eval only: a folder of your own task YAML files")
    batch_size: int = _help("prompts per generate call (never changes a greedy output in fp32)", 8)
    seed: int = _help("the DROP demonstrations draw (InstructEval: 0) and the sampling seed when seeds is None", 0)
    device: str | None = _help("cpu, cuda, cuda:N (None: cuda if available)")
    tracking_uri: str | None = _help("MLflow store that runs:/ and models:/ adapters are read from")
    workers: int | None = _help("HumanEval programs run in parallel (None: the CPU count, at most 8)")
    humaneval_cut: str = _help("blank-line (InstructEval) or top-level (also cut before a top-level "
                               "def/class/if/print line)", "blank-line")
    decoding: str = _help("reference (the checkpoint's generation_config, HumanEval at temperature 0.1, as "
                          "InstructEval), greedy, or sampling (temperature, top_p, seeds)", "reference")
    temperature: float | None = _help("decoding=sampling only: the sampling temperature (> 0)")
    top_p: float | None = _help("decoding=sampling only: nucleus mass in (0, 1] (None: 1.0, no cut)")
    seeds: list[int] | None = _help("sampled tasks run once per seed and score the mean (required by sampling; "
                                    "reference: default [seed])")
    dtype: str = _help("fp32 (InstructEval), bf16, fp16, or auto (bf16 on a GPU, fp32 on a CPU)", "fp32")
    merge: bool = _help("False (InstructEval: the adapter unmerged) or True (merged into the weights in fp32, "
                        "then cast to dtype)", False)
    split: str = _help("all (the benchmark), dev (a held-out study's dev items: dev_sizes of each task, drawn with "
                       "split_seed) or test (the rest: items a held-out study never saw)", "all")
    dev_sizes: dict | None = _help("items per task in the dev subset, e.g. {mmlu: 300, drop: 150}")
    split_seed: int = _help("the seed of the dev draw (a study's and its test evaluation's must agree)", 0)
    mmlu_cells: str = _help("text (the MMLU cells as the data set holds them) or pandas (as InstructEval's "
                            "pd.read_csv read its CSVs: None/NA -> nan, numbers in a column with a gap -> 2.0)",
                            "text")
    attn_implementation: str = _help("sdpa or eager (the attention Llama ran with in 2023: InstructEval's)", "sdpa")
    tokenizer: str = _help("fast or slow (the SentencePiece tokenizer, use_fast=False: InstructEval's LlamaTokenizer)",
                           "fast")

    def __post_init__(self):
        if isinstance(self.tasks, (list, tuple)):
            self.tasks = ",".join(str(t).strip() for t in self.tasks)
        if isinstance(self.seeds, tuple):
            self.seeds = list(self.seeds)
        _check_choices(self)
        _check_numbers(self)
        _check_split(self)
        _check_decoding(self)
        _check_harness(self)

    # ------------------------------------------------------------------------------------------- views
    def task_list(self) -> list[str]:
        """The task names, in the order given, without duplicates."""
        return list(dict.fromkeys(t.strip() for t in self.tasks.split(",") if t.strip()))

    def sampling_seeds(self) -> list[int]:
        """The seeds a sampled task runs with: `seeds`, else [seed]."""
        return list(self.seeds) if self.seeds else [self.seed]

    def protocol(self) -> dict[str, str]:
        """The protocol as flat `eval.protocol.*` strings: what is logged with the scores and compared across
        rows. Options that do not apply to the harness read "n/a"."""
        out = {}
        for key in PROTOCOL:
            value = getattr(self, key)
            if self.harness == "lm-eval" and key in INSTRUCTEVAL_ONLY:
                value = "n/a"
            elif key == "seeds" and self.decoding != "greedy" and self.harness == "instructeval":
                value = self.sampling_seeds()
            out[PROTOCOL_PREFIX + key] = _text(value)
        return out

    # ------------------------------------------------------------------------------------------- serialization
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EvaluationSpec":
        if not isinstance(d, dict):
            raise ProtocolError(f"an evaluation spec must be a mapping of fields, not {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ProtocolError(f"evaluation: unknown key {unknown[0]!r}: valid keys are {', '.join(names)}")
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "EvaluationSpec":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProtocolError(f"evaluation spec {path} cannot be read ({type(e).__name__}): give a spec.json") \
                from None
        return cls.from_dict(d)

    def replace(self, **changes) -> "EvaluationSpec":
        return EvaluationSpec.from_dict({**self.to_dict(), **changes})


def settings_keys() -> list[str]:
    """The keys of a study YAML's `evaluation:` mapping: the spec's fields that are the same for every model."""
    return [f.name for f in dataclasses.fields(EvaluationSpec) if f.name not in NOT_SETTINGS]


def evaluation_settings(mapping: dict | None) -> dict[str, Any]:
    """A study YAML's `evaluation:` mapping, validated and completed with the defaults (the reference protocol).
    Raises ProtocolError with a one-line message; pass the result with base/adapter/out/tracking_uri to
    EvaluationSpec.from_dict to get one evaluation's spec."""
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, dict):
        raise ProtocolError(f"evaluation: must be a mapping of {', '.join(settings_keys())}, not "
                            f"{type(mapping).__name__}")
    keys = settings_keys()
    unknown = sorted(set(mapping) - set(keys))
    if unknown:
        raise ProtocolError(f"evaluation: unknown key {unknown[0]!r}: valid keys are {', '.join(keys)}")
    spec = EvaluationSpec(**mapping)
    return {k: getattr(spec, k) for k in keys}


# ----------------------------------------------------------------------------------------------- validation
def _bad(name: str, value, fix: str) -> ProtocolError:
    return ProtocolError(f"evaluation.{name}={value!r} is invalid: {fix}")


def _check_choices(s: EvaluationSpec) -> None:
    for name, choices in (("harness", HARNESSES), ("humaneval_cut", CUTS), ("decoding", DECODINGS),
                          ("dtype", DTYPES), ("mmlu_cells", MMLU_CELLS),
                          ("attn_implementation", ATTN_IMPLEMENTATIONS), ("tokenizer", TOKENIZERS)):
        if getattr(s, name) not in choices:
            raise _bad(name, getattr(s, name), f"choose one of {', '.join(choices)}")
    if not isinstance(s.merge, bool):
        raise _bad("merge", s.merge, "choose true (merged in fp32) or false (unmerged, as InstructEval)")
    if s.device is not None and not (isinstance(s.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?|mps", s.device)):
        raise _bad("device", s.device, "choose cpu, cuda, cuda:N or mps (or leave it unset)")
    if s.tasks is None and s.harness == "instructeval":
        s.tasks = ",".join(NAMES)
    if not isinstance(s.tasks, str) or not s.task_list():
        raise _bad("tasks", s.tasks, "name at least one task" + (f": {', '.join(NAMES)}" if s.harness ==
                                                                  "instructeval" else " (lm-eval task names)"))
    if s.harness == "instructeval":
        unknown = [t for t in s.task_list() if t not in NAMES]
        if unknown:
            raise _bad("tasks", s.tasks, f"unknown task {unknown[0]!r}: choose from {', '.join(NAMES)}")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def _check_numbers(s: EvaluationSpec) -> None:
    for name, minimum, optional in (("limit", 1, True), ("batch_size", 1, False), ("workers", 1, True),
                                    ("seed", 0, False)):
        value = getattr(s, name)
        if not ((optional and value is None) or (_int(value) and value >= minimum)):
            raise _bad(name, value, f"an integer >= {minimum}" + (" or null" if optional else ""))
    if s.temperature is not None and not (_number(s.temperature) and s.temperature > 0):
        raise _bad("temperature", s.temperature, "a number > 0 (greedy decoding is decoding: greedy)")
    if s.top_p is not None and not (_number(s.top_p) and 0 < s.top_p <= 1):
        raise _bad("top_p", s.top_p, "a number in (0, 1]")
    if s.seeds is not None:
        if not (isinstance(s.seeds, list) and s.seeds and all(_int(x) and x >= 0 for x in s.seeds)):
            raise _bad("seeds", s.seeds, "a non-empty list of integers >= 0, e.g. [0, 1, 2]")
        if len(set(s.seeds)) != len(s.seeds):
            raise _bad("seeds", s.seeds, "each seed once (a repeated seed repeats the same samples)")


SPLITS = ("all", "dev", "test")


def _check_split(s: EvaluationSpec) -> None:
    if s.split not in SPLITS:
        raise _bad("split", s.split, f"use one of {', '.join(SPLITS)}")
    if s.split != "all" and not s.dev_sizes:
        raise _bad("dev_sizes", s.dev_sizes, "a dev or test split needs the dev subset's size per task, "
                   "e.g. {mmlu: 300}")
    if s.dev_sizes is not None:
        if not isinstance(s.dev_sizes, dict) or not all(k in NAMES and _int(v) and v >= 1
                                                         for k, v in s.dev_sizes.items()):
            raise _bad("dev_sizes", s.dev_sizes, f"a mapping of task ({', '.join(NAMES)}) to a number of items >= 1")
    if not _int(s.split_seed):
        raise _bad("split_seed", s.split_seed, "an integer")


def _check_decoding(s: EvaluationSpec) -> None:
    if s.decoding == "sampling":
        if s.temperature is None:
            raise _bad("temperature", None, "decoding: sampling needs a temperature > 0, e.g. 0.6")
        if not s.seeds:
            raise _bad("seeds", s.seeds, "decoding: sampling needs seeds, e.g. [0, 1, 2] (each sampled task runs "
                                         "once per seed; the score is their mean)")
        return
    for name in ("temperature", "top_p"):
        if getattr(s, name) is not None:
            raise _bad(name, getattr(s, name), f"only decoding: sampling takes it (decoding: {s.decoding} "
                                               "sets it from " + ("the checkpoint)" if s.decoding == "reference"
                                                                  else "nothing: greedy)"))
    if s.decoding == "greedy" and s.seeds is not None:
        raise _bad("seeds", s.seeds, "decoding: greedy never samples: drop seeds, or choose reference or sampling")


def _check_harness(s: EvaluationSpec) -> None:
    if s.harness == "lm-eval":
        defaults = {f.name: f.default for f in dataclasses.fields(EvaluationSpec)}
        for name in INSTRUCTEVAL_ONLY + ("data_dir",):
            if getattr(s, name) != defaults[name]:
                raise _bad(name, getattr(s, name), "applies to harness: instructeval only (lm-eval tasks bring "
                                                   "their own protocol): remove it or choose harness: instructeval")
    elif s.include_path is not None:
        raise _bad("include_path", s.include_path, "applies to harness: lm-eval only: remove it or choose "
                                                   "harness: lm-eval")


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return "none" if value is None else str(value)
