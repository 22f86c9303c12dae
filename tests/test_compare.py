"""`python -m orchestrator compare`: the table, GPU-hours, downstream scores, artifacts in each parent run, --out."""
import json
import os

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.study.loop import run_study
from orchestrator.study.journal import load_study


@pytest.fixture(scope="module")
def two_studies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    common = dict(parallel=2, executor="debug", poll_s=0.05, objective="tests.objectives:landscape",
                  workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    gpu = run_study(load_config(None, study="gpu-random", algo="random", budget=5, seed=1,
                                resources={"gpus_per_node": 4, "nodes": 2}, **common), out=open(os.devnull, "w"))
    cpu = run_study(load_config(None, study="cpu-default", algo="default", budget=1, **common),
                    out=open(os.devnull, "w"))
    client = MlflowClient(common["tracking_uri"])
    best = min(gpu.finished, key=lambda t: t.value)
    client.log_metric(best.run_id, "mmlu", 0.4624)  # as the downstream evaluation would log them
    client.log_metric(best.run_id, "humaneval", 0.1694)
    return tmp, client, gpu, cpu


def compare(tmp, capsys, *extra):
    code = main(["compare", "gpu-random", "cpu-default", "--workdir", str(tmp / "runs"), *extra])
    return code, capsys.readouterr()


def test_the_table_has_gpu_hours_and_the_downstream_scores_that_exist(two_studies, capsys):
    tmp, client, gpu, cpu = two_studies
    code, out = compare(tmp, capsys)
    assert code == 0, out.err
    header, first, second = out.out.strip().splitlines()
    columns = header.split()
    assert columns[:16] == ["study", "algo", "used", "best", "to", "1%", "h", "to", "1%", "failed", "job-hours",
                            "GPU-hours", "GPU-h", "to", "1%", "mmlu"]
    assert "mmlu" in columns and "humaneval" in columns and "bbh" not in columns and "drop" not in columns
    assert first.startswith("gpu-random") and "5/5" in first and "46.24" in first and "16.94" in first
    assert second.startswith("cpu-default") and "1/1" in second
    spent = sum(t.summary["gpu_hours"] for t in gpu.finished)  # every attempt's hours x the 8 GPUs asked for
    (tmp / "dl").mkdir(exist_ok=True)
    data = json.loads(open(client.download_artifacts(gpu.parent_run_id, "compare.json", str(tmp / "dl"))).read())
    rows = {r["study"]: r for r in data["studies"]}
    assert rows["gpu-random"]["gpus_per_job"] == 8
    assert rows["gpu-random"]["gpu_hours"] == pytest.approx(spent) and spent > 0
    job_hours = sum(t.summary["total_s"] for t in gpu.finished) / 3600
    assert spent >= 8 * job_hours * 0.99  # the attempts lasted at least as long as the jobs measured themselves
    assert rows["gpu-random"]["downstream"] == {"mmlu": pytest.approx(0.4624), "humaneval": pytest.approx(0.1694)}
    assert rows["cpu-default"]["gpu_hours"] is None and rows["cpu-default"]["downstream"] == {}
    best = min(gpu.finished, key=lambda t: t.value)
    assert rows["gpu-random"]["best_val_loss"] == pytest.approx(best.value)
    state = load_study(tmp / "runs" / "gpu-random")  # the hours from the start to the result within 1%
    first = next(t for t in sorted(state.finished, key=lambda t: t.finished_at)
                 if t.status == "ok" and t.value <= best.value * 1.01)
    assert rows["gpu-random"]["hours_to_within_1pct"] == pytest.approx((first.finished_at - state.started_at) / 3600)


def test_the_comparison_is_logged_into_every_compared_parent_run(two_studies, capsys):
    tmp, client, gpu, cpu = two_studies
    assert compare(tmp, capsys)[0] == 0
    for state in (gpu, cpu):
        names = {a.path for a in client.list_artifacts(state.parent_run_id)}
        assert {"compare.md", "compare.json"} <= names
        folder = tmp / f"dl-{state.parent_run_id}"
        folder.mkdir()
        md = open(client.download_artifacts(state.parent_run_id, "compare.md", str(folder))).read()
        assert md.startswith("| study") and "| gpu-random" in md and "| cpu-default" in md


@pytest.mark.parametrize("suffix", [".md", ".json"])
def test_out_writes_markdown_or_json(two_studies, capsys, suffix):
    tmp, _, _, _ = two_studies
    target = tmp / f"out/comparison{suffix}"
    assert compare(tmp, capsys, "--out", str(target))[0] == 0
    text = target.read_text()
    if suffix == ".json":
        assert [r["study"] for r in json.loads(text)["studies"]] == ["gpu-random", "cpu-default"]
    else:
        assert text.splitlines()[1].startswith("|---") and "GPU-hours" in text.splitlines()[0]


def test_an_unknown_study_is_a_one_line_error(two_studies, capsys):
    tmp, _, _, _ = two_studies
    assert main(["compare", "nope", "--workdir", str(tmp / "runs")]) == 2
    assert "no study 'nope'" in capsys.readouterr().err


def test_scores_under_different_protocols_are_flagged(two_studies, capsys):
    tmp, client, gpu, cpu = two_studies
    best_cpu = min(cpu.finished, key=lambda t: t.value)
    client.log_metric(best_cpu.run_id, "mmlu", 0.4356)
    client.set_tag(best_cpu.run_id, "eval.protocol.dtype", "bf16")  # gpu-random's scores carry no protocol
    code, out = compare(tmp, capsys, "--out", str(tmp / "cmp.json"))
    assert code == 0
    assert "different protocols (eval.protocol.dtype)" in out.err
    assert json.loads((tmp / "cmp.json").read_text())["protocol_mismatch"] == ["eval.protocol.dtype"]
