"""The evaluation spec and its protocol options: validation, defaults (InstructEval's), the study YAML's
`evaluation:` mapping, decoding resolution, the job's spec, and bad input on the command line.

    .venv/bin/python -m pytest tests/test_eval_spec.py -q        # no model; the CLI cases start Python
"""
import subprocess
import sys

import pytest

from evaluation.job import EvaluationJob, as_spec
from evaluation.runner import REFERENCE_LIBRARY_DEFAULTS, resolve_decoding
from evaluation.spec import PROTOCOL, EvaluationSpec, ProtocolError, evaluation_settings, settings_keys
from evaluation.tasks import get_tasks

from .conftest import REPO

# The generation_config.json of meta-llama/Llama-2-7b-hf as found on the hub mirrors (do_sample true,
# temperature 0.6, top_p 0.9: see evaluation/PROTOCOL.md), and one that sets no sampling (the tiny model's).
LLAMA2 = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": None}
NO_SAMPLING = {"do_sample": None, "temperature": None, "top_p": None, "top_k": None}


def test_defaults_are_the_reference_protocol():
    spec = EvaluationSpec(base="tiny")
    assert (spec.humaneval_cut, spec.decoding, spec.dtype, spec.merge) == ("blank-line", "reference", "fp32", False)
    assert spec.task_list() == ["mmlu", "bbh", "drop", "humaneval"] and spec.seed == 0
    protocol = spec.protocol()
    assert list(protocol) == [f"eval.protocol.{k}" for k in PROTOCOL]
    assert protocol["eval.protocol.decoding"] == "reference" and protocol["eval.protocol.merge"] == "false"
    assert all(isinstance(v, str) for v in protocol.values())


@pytest.mark.unit
@pytest.mark.parametrize("fields, named, choices", [
    ({"decoding": "beam"}, "decoding='beam'", "reference, greedy, sampling"),
    ({"humaneval_cut": "none"}, "humaneval_cut='none'", "blank-line, top-level"),
    ({"dtype": "int8"}, "dtype='int8'", "fp32, bf16, fp16, auto"),
    ({"harness": "helm"}, "harness='helm'", "instructeval, lm-eval"),
    ({"decoding": "sampling", "temperature": 0.6}, "seeds=None", "seeds, e.g. [0, 1, 2]"),
    ({"decoding": "sampling", "seeds": [0]}, "temperature=None", "temperature > 0"),
    ({"decoding": "greedy", "seeds": [1]}, "seeds=[1]", "choose reference or sampling"),
    ({"temperature": 0.7}, "temperature=0.7", "only decoding: sampling"),
    ({"decoding": "sampling", "temperature": 0, "seeds": [0]}, "temperature=0", "a number > 0"),
    ({"decoding": "sampling", "temperature": 1, "top_p": 1.5, "seeds": [0]}, "top_p=1.5", "(0, 1]"),
    ({"decoding": "sampling", "temperature": 1, "seeds": [0, 0]}, "seeds=[0, 0]", "each seed once"),
    ({"merge": "yes"}, "merge='yes'", "true (merged in fp32) or false"),
    ({"tasks": "mmlu,gsm8k"}, "tasks='mmlu,gsm8k'", "mmlu, bbh, drop, humaneval"),
    ({"harness": "lm-eval", "tasks": "arc_easy", "humaneval_cut": "top-level"}, "humaneval_cut='top-level'",
     "harness: instructeval only"),
    ({"harness": "lm-eval"}, "tasks=None", "lm-eval task names"),
    ({"limit": 0}, "limit=0", "an integer >= 1 or null"),
    ({"device": "tpu"}, "device='tpu'", "cpu, cuda, cuda:N"),
])
def test_a_bad_value_is_one_line_naming_the_field_the_value_and_the_choices(fields, named, choices):
    with pytest.raises(ProtocolError) as e:
        EvaluationSpec(**fields)
    message = str(e.value)
    assert "\n" not in message and f"evaluation.{named}" in message and choices in message, message


def test_round_trip_and_unknown_keys(tmp_path):
    spec = EvaluationSpec(base="tiny", adapter="a", tasks=["mmlu", "humaneval"], decoding="sampling",
                          temperature=0.6, top_p=0.9, seeds=[0, 1], out=str(tmp_path))
    assert spec.tasks == "mmlu,humaneval"
    assert EvaluationSpec.from_dict(spec.to_dict()) == spec
    spec.to_json(tmp_path / "spec.json")
    assert EvaluationSpec.from_json(tmp_path / "spec.json") == spec
    with pytest.raises(ProtocolError, match="unknown key 'greedy': valid keys are base, adapter"):
        EvaluationSpec.from_dict({**spec.to_dict(), "greedy": True})
    assert spec.protocol()["eval.protocol.seeds"] == "0,1" and spec.sampling_seeds() == [0, 1]
    assert EvaluationSpec(decoding="greedy").protocol()["eval.protocol.seeds"] == "none"
    lm = EvaluationSpec(harness="lm-eval", tasks="arc_easy").protocol()
    assert lm["eval.protocol.decoding"] == "n/a" and lm["eval.protocol.dtype"] == "fp32"


def test_study_settings_are_validated_and_completed_with_the_reference_protocol():
    settings = evaluation_settings({"tasks": "mmlu,humaneval", "limit": 20})
    assert list(settings) == settings_keys() and not {"base", "adapter", "out", "tracking_uri"} & set(settings)
    assert (settings["decoding"], settings["humaneval_cut"], settings["dtype"], settings["merge"]) == \
        ("reference", "blank-line", "fp32", False)
    spec = EvaluationSpec.from_dict({**settings, "base": "tiny", "adapter": "x", "out": "o"})
    assert spec.limit == 20 and spec.task_list() == ["mmlu", "humaneval"]
    assert evaluation_settings(None)["tasks"] == "mmlu,bbh,drop,humaneval"
    with pytest.raises(ProtocolError, match="evaluation: unknown key 'adapter': valid keys are tasks, limit"):
        evaluation_settings({"adapter": "x"})
    with pytest.raises(ProtocolError, match="evaluation.decoding='nucleus' is invalid: choose one of reference"):
        evaluation_settings({"decoding": "nucleus"})
    with pytest.raises(ProtocolError, match="must be a mapping"):
        evaluation_settings(["greedy"])
    assert issubclass(ProtocolError, ValueError)


# ----------------------------------------------------------------------------------------------- decoding
def task(name):
    return get_tasks([name])[0]


@pytest.mark.unit
def test_reference_decoding_is_the_checkpoints_config_plus_instructevals_arguments():
    ref = EvaluationSpec()
    # Llama-2-7b-hf samples: MMLU/BBH/DROP at its 0.6 / 0.9, top-k from the 2023 library default
    assert resolve_decoding(ref, task("mmlu"), LLAMA2) == {"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                           "top_k": 50}
    # HumanEval: InstructEval passes do_sample=True, temperature=0.1; top-p still the checkpoint's
    assert resolve_decoding(ref, task("humaneval"), LLAMA2) == {"do_sample": True, "temperature": 0.1,
                                                                "top_p": 0.9, "top_k": 50}
    # a checkpoint without sampling settings: greedy few-shot tasks, HumanEval with the library defaults
    assert resolve_decoding(ref, task("bbh"), NO_SAMPLING) == {"do_sample": False}
    assert resolve_decoding(ref, task("humaneval"), NO_SAMPLING) == {
        "do_sample": True, "temperature": 0.1, "top_p": REFERENCE_LIBRARY_DEFAULTS["top_p"], "top_k": 50}


@pytest.mark.unit
def test_greedy_and_sampling_ignore_the_checkpoint():
    for name in ("mmlu", "humaneval"):
        assert resolve_decoding(EvaluationSpec(decoding="greedy"), task(name), LLAMA2) == {"do_sample": False}
        spec = EvaluationSpec(decoding="sampling", temperature=0.7, seeds=[1, 2])
        assert resolve_decoding(spec, task(name), LLAMA2) == {"do_sample": True, "temperature": 0.7, "top_p": 1.0,
                                                              "top_k": 0}


# ----------------------------------------------------------------------------------------------- the job
def test_the_job_writes_its_spec_and_maps_the_former_greedy_flag(tmp_path):
    legacy = {"base": "tiny", "adapter": None, "tasks": "humaneval", "limit": 1, "data_dir": None, "harness":
              "instructeval", "include_path": None, "seed": 0, "greedy": True, "tracking_uri": None,
              "out": str(tmp_path / "o")}
    assert as_spec(legacy).decoding == "greedy"
    assert as_spec({**legacy, "greedy": False}).decoding == "reference"
    with pytest.raises(ProtocolError, match="decoding='beam'"):
        EvaluationJob()({**legacy, "greedy": False, "decoding": "beam"})
    assert not (tmp_path / "o").exists()  # an invalid spec writes nothing


@pytest.mark.unit
# ----------------------------------------------------------------------------------------------- devices
def test_a_dtype_the_gpu_cannot_run_is_refused(monkeypatch):
    """Mock (this machine has no GPU): a CUDA device without native bfloat16, as a V100."""
    import torch

    from evaluation.model import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match=r"dtype 'bf16' cannot run on cuda \(Tesla V100-SXM2-32GB has no native "
                                         r"bfloat16\): choose fp32 or fp16"):
        check_device("cuda", "bf16")
    assert check_device("cuda", "auto")[1] == torch.float16 and check_device("cuda", "fp32")[1] == torch.float32
    with pytest.raises(ValueError, match="device 'cuda:1' is not available here"):
        check_device("cuda:1", "fp32")


def cli(*args, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "evaluation", "--base", "tiny", "--tasks", "mmlu", "--out", str(out),
                           *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.parametrize("args, says", [
    (["--decoding", "beam"], "decoding='beam' is invalid: choose one of reference, greedy, sampling"),
    (["--decoding", "sampling", "--temperature", "0.6"], "sampling needs seeds"),
    (["--humaneval-cut", "codex"], "choose one of blank-line, top-level"),
    (["--dtype", "fp8"], "choose one of fp32, bf16, fp16, auto"),
    (["--greedy", "--decoding", "sampling"], "--greedy contradicts --decoding sampling"),
    (["--seeds", "1,x"], "--seeds '1,x' is invalid"),
])
def test_bad_protocol_input_exits_2_with_one_line_and_writes_nothing(args, says, tmp_path):
    proc, out = cli(*args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_this_machine_lacks_exits_2_before_anything_loads(tmp_path):
    proc, out = cli("--device", "cuda", "--dtype", "bf16", "--data-dir", str(tmp_path / "missing"),
                    tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "device 'cuda' is not available here (0 CUDA GPU(s) visible)" in proc.stderr  # before the data error
    assert not out.exists()


@pytest.mark.unit
def test_a_config_file_gives_the_fields_and_flags_override_it(tmp_path):
    from evaluation.__main__ import parser, spec_from_args

    config = tmp_path / "eval.yaml"
    config.write_text("tasks: mmlu,humaneval\ndecoding: sampling\ntemperature: 0.6\ntop_p: 0.9\nseeds: [0, 1]\n"
                      "dtype: bf16\nmerge: true\n")
    spec = spec_from_args(parser().parse_args(["--config", str(config), "--seeds", "3", "--no-merge",
                                               "--adapter", "a"]))
    assert (spec.decoding, spec.temperature, spec.top_p, spec.seeds, spec.dtype, spec.merge, spec.adapter) == \
        ("sampling", 0.6, 0.9, [3], "bf16", False, "a")
    json_spec = tmp_path / "spec.json"
    EvaluationSpec(tasks="bbh", out="x").to_json(json_spec)
    assert spec_from_args(parser().parse_args(["--config", str(json_spec)])).task_list() == ["bbh"]
    assert spec_from_args(parser().parse_args(["--greedy"])).decoding == "greedy"


# InstructEval's choices where the default is not (a defect, or the same result more cheaply: PROTOCOL.md)
INSTRUCTEVAL_CHOICES = {"mmlu_cells": "pandas", "attn_implementation": "eager", "tokenizer": "slow"}
# The authors' training run where the project's defaults differ (jobs/spec.py; eval_batch: per round)
AUTHORS_TRAINING = {"prompt_template": "authors", "val_loss_average": "batch", "max_steps": 836,
                    "precision": "fp32_autocast_bf16", "trainable_embeddings": "as_run",
                    "attn_implementation": "eager", "tokenizer": "slow"}


@pytest.mark.unit
def test_the_paper_kit_validates(tmp_path):
    """examples/paper/: every study YAML's `evaluation:` section is the reference protocol, its `trial:` the
    authors' training run, and the rest a valid study; evaluation.yaml is a valid spec. (The CLI's --dry-run
    test runs them end to end.)"""
    import yaml

    from orchestrator.config import load_config

    kit = sorted((REPO / "examples" / "paper").glob("*.yaml"))
    assert {p.name for p in kit} >= {"nomad.yaml", "tpe.yaml", "default.yaml", "evaluation.yaml"}
    reference = evaluation_settings(INSTRUCTEVAL_CHOICES)
    for path in kit:
        data = yaml.safe_load(path.read_text())
        if path.name == "evaluation.yaml":
            spec = EvaluationSpec.from_dict(data)
            assert spec.protocol() == EvaluationSpec(base=spec.base, **INSTRUCTEVAL_CHOICES).protocol()
            continue
        assert evaluation_settings(data["evaluation"]) == reference, path.name
        eval_batch = 4 if path.name.startswith("tpe") else 20  # nni/step.py; bbo2/eval.py (the default: X0)
        assert data["trial"] == {**AUTHORS_TRAINING, "eval_batch": eval_batch}, path.name
        config = load_config(str(path))
        assert (config.preset, config.resources.gpus_per_node) == ("paper", 4), path.name
        assert config.budget == (1 if config.algo == "default" else 100), path.name
        if len(config.space.names) == 4:  # tpe-as-run searches lr only (the authors' TPE, as it ran)
            assert config.space.names == ["r", "dropout", "alpha", "lr"], path.name  # the paper's NOMAD order


@pytest.mark.unit
@pytest.mark.parametrize("name", ["nomad.yaml", "tpe.yaml", "default.yaml", "tpe-as-run.yaml"])
def test_each_paper_study_dry_runs_without_submitting_or_writing(name, tmp_path, monkeypatch, capsys):
    from orchestrator.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(REPO / "examples" / "paper" / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for section in ("# resolved configuration", "# first suggestions", "# the first trial's spec",
                    "#SBATCH --gpus-per-node=4", "#SBATCH --signal=USR2@", "meta-llama/Llama-2-7b-hf",
                    "nothing was submitted"):
        assert section in out, section
    assert list(tmp_path.iterdir()) == [], "a dry run wrote something"
