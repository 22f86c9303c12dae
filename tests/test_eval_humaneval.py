"""HumanEval scoring without a model: the real canonical solutions, and completions made elsewhere.

    .venv/bin/python -m pytest tests/test_eval_humaneval.py -q      # about 15 s (164 sandboxed programs)
"""
import json
import subprocess
import sys

import pytest

from evaluation import EvalError, score_completions
from evaluation.tasks import humaneval

from .conftest import REPO


def test_the_canonical_solutions_pass_164_of_164(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evaluation", "--tasks", "humaneval", "--canonical",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "100.00" in proc.stdout and "164" in proc.stdout
    scores = json.loads((tmp_path / "scores.json").read_text())
    task = scores["tasks"]["humaneval"]
    assert (task["score"], task["correct"], task["n"], task["missing"]) == (1.0, 164, 164, 0)
    failed = [json.loads(line) for line in (tmp_path / "records" / "humaneval.jsonl").read_text().splitlines()
              if not json.loads(line)["correct"]]
    assert failed == []


def test_completions_made_elsewhere_are_scored_and_attacks_just_fail(tmp_path):
    problems = humaneval.load(None)
    completions = {
        "HumanEval/0": problems[0]["canonical_solution"],
        "HumanEval/1": "    return []\n",  # wrong
        "HumanEval/2": "    import os\n    while True:\n        os.fork()\n",  # fork bomb
        "HumanEval/3": "    open('/etc/passwd-evil', 'w')\n",  # writes outside its folder
        "HumanEval/4": problems[4]["canonical_solution"],
    }
    result = score_completions(completions, out=str(tmp_path))
    task = result["tasks"]["humaneval"]
    assert (task["correct"], task["n"], task["missing"]) == (2, 5, 159)
    assert [r["correct"] for r in task["records"]] == [True, False, False, False, True]
    assert task["records"][3]["status"] == "blocked"


def test_completion_file_on_the_command_line(tmp_path):
    problems = humaneval.load(None)
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                            for p in problems[:3]))
    proc = subprocess.run([sys.executable, "-m", "evaluation", "--tasks", "humaneval", "--completions", str(path),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "100.00" in proc.stdout
    assert "161 HumanEval problems had no completion" in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "evaluation", "--tasks", "mmlu", "--canonical"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --canonical and --completions score HumanEval")


def test_unknown_task_ids_are_an_error():
    with pytest.raises(EvalError, match="unknown task_id 'HumanEval/999'"):
        score_completions({"HumanEval/999": "    pass\n"})
