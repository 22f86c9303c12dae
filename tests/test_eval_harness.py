"""`python -m evaluation --harness lm-eval`: the optional lm-evaluation-harness path, on a local task (no hub).

    .venv/bin/python -m pytest tests/test_eval_harness.py -q      # the slow test needs `pip install lm-eval`
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from evaluation import EvalError
from evaluation.harness import main_metric, model_args

from .conftest import REPO

TASKS = Path(__file__).parent / "fixtures" / "lm_eval"


def test_model_args_map_base_adapter_and_dtype():
    assert model_args("/m/base", "/m/ad", "bf16") == "pretrained=/m/base,peft=/m/ad,dtype=bfloat16"
    assert model_args("meta-llama/Llama-2-7b-hf", None, "auto") == "pretrained=meta-llama/Llama-2-7b-hf,dtype=auto"
    with pytest.raises(EvalError, match="cannot carry"):
        model_args("/m/a,b", None, "auto")
    with pytest.raises(EvalError, match="dtype 'int4' is unknown"):
        model_args("/m", None, "int4")


def test_main_metric_prefers_the_tasks_first_configured_metric():
    raw = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.7}},
           "configs": {"t": {"metric_list": [{"metric": "acc_norm"}, {"metric": "acc"}]}},
           "n-samples": {"t": {"effective": 6}}}
    key, value, summary = main_metric(raw, "t")
    assert (key, value, summary["n"]) == ("acc_norm,none", 0.7, 6) and "acc_stderr,none" in summary["metrics"]


def test_without_lm_eval_the_cli_says_how_to_install_it():
    script = ("import sys; sys.modules['lm_eval'] = None\n"  # an import of lm_eval now fails like a missing package
              "from evaluation.__main__ import main\n"
              "sys.exit(main(['--harness', 'lm-eval', '--tasks', 'hellaswag', '--base', 'tiny']))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: lm-evaluation-harness is not installed: pip install "
                                                   "lm-eval (or pip install -e .[lm-eval])")


@pytest.mark.slow
def test_a_local_lm_eval_task_on_the_tiny_model_with_its_adapter(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval")
    from jobs.finetune import run
    from jobs.spec import preset

    result = run(preset("tiny", out=str(tmp_path / "trained"), max_steps=4, lr=1e-3))
    assert result["status"] == "ok", result["reason"]
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "evaluation", "--harness", "lm-eval", "--tasks", "tiny_arith", "--include-path",
           str(TASKS), "--base", "tiny", "--adapter", str(tmp_path / "trained" / "adapter"), "--device", "cpu",
           "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads((out / "scores.json").read_text())
    assert scores["harness"] == "lm-eval" and scores["tasks"]["tiny_arith"]["metric"] == "acc,none"
    assert 0 <= scores["scores"]["tiny_arith"] <= 1 and scores["tasks"]["tiny_arith"]["n"] == 6
    assert scores["model"]["lora_modules"] == 4 and "peft=" in scores["model"]["model_args"]  # the adapter is in

    bad_cmd = [("no_such_task" if a == "tiny_arith" else a) for a in cmd]
    bad = subprocess.run(bad_cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "lm-eval task 'no_such_task' is unknown" in bad.stderr
