"""Studies against the lab's MLflow server: end to end, and through an outage of the server.

    .venv/bin/python -m pytest -q -m server tests/test_server_study.py      # a few minutes (a 60 s outage)

Real orchestrator processes, real fine-tunes of the tiny model on the local executor, the real server of
`python -m orchestrator server` (PostgreSQL, proxied artifacts, basic auth; tests/server_fixture.py).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.study.journal import Journal
from orchestrator.tracking.server import Layout, mlflow_pid
from orchestrator.study.journal import load_study

from .server_fixture import REPO, lab, server_cli  # noqa: F401  (registers the session fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]
FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SPACE = {"r": {"choice": [4, 8], "default": 8}, "alpha": {"int": [8, 32], "default": 16},
         "dropout": {"choice": [0, 0.05], "default": 0.05}, "lr": {"log": [3e-4, 2e-3], "default": 1e-3}}
OUTAGE_S = 60


def orchestrator(tmp_path, lab, user, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "--workdir", str(tmp_path / "runs"),
                             "--tracking-uri", lab.url, *args], cwd=REPO, env={**lab.env(user), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finetune_yaml(tmp_path, study, budget, steps=6) -> str:
    import yaml
    path = tmp_path / f"{study}.yaml"
    path.write_text(yaml.safe_dump({"study": study, "algo": "random", "budget": budget, "parallel": 2, "seed": 1,
                                    "executor": "local", "poll_s": 0.3, "space": SPACE,
                                    "trial": {"max_steps": steps, "log_every": 1, "data": {"total_rows": 300}}}))
    return str(path)


def done(proc, timeout_s=900) -> str:
    out, _ = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, out[-4000:]
    return out


def exactly_once(client, study, state):
    """One parent, one child per trial, every final metric logged once, every trial's artifacts there."""
    experiment = client.get_experiment_by_name(study).experiment_id
    runs = client.search_runs([experiment], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("role") == "study"]
    assert [r.info.run_id for r in parents] == [state.parent_run_id], "a parent run was made twice"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == state.parent_run_id]
    assert len(runs) == 1 + len(children) and sorted(r.info.run_id for r in children) == \
        sorted(t.run_id for t in state.trials.values()), "a trial has no run, or two"
    for run in children:
        t = state.trials[int(run.data.tags["trial"])]
        assert run.info.status == ("FINISHED" if t.status == "ok" else "FAILED")
        history = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.value for m in history] == [pytest.approx(t.value)], "val_loss logged more or less than once"
        assert "result.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    best = client.get_metric_history(state.parent_run_id, "best_val_loss")
    assert sorted(m.step for m in best) == list(range(1, len(state.finished) + 1)), "best-so-far doubled or lost"
    assert client.get_run(state.parent_run_id).info.status == "FINISHED"


def test_a_finetune_study_against_the_server_end_to_end(lab, monkeypatch, tmp_path):
    proc = orchestrator(tmp_path, lab, "alice", "--config", finetune_yaml(tmp_path, "served", 2))
    out = done(proc)
    assert "models:/served-adapter@champion" in out
    state = load_study(tmp_path / "runs" / "served")
    client = lab.as_user(monkeypatch, "alice")
    exactly_once(client, "served", state)
    for t in state.trials.values():
        assert len(client.get_metric_history(t.run_id, "train_loss")) == 6  # the live curve, through the server
        assert "adapter/adapter_config.json" in {a.path for a in client.list_artifacts(t.run_id, "adapter")}
        artifact_uri = client.get_run(t.run_id).info.artifact_uri
        assert artifact_uri.startswith("mlflow-artifacts:"), "artifacts must be proxied by the server"
    plots = {a.path for a in client.list_artifacts(state.parent_run_id, "plots")}
    assert "plots/history.png" in plots
    version = client.get_model_version_by_alias("served-adapter", "champion")
    best = min(state.finished, key=lambda t: t.value)
    assert version.run_id == best.run_id

    # The champion, loaded by a process that cannot see the server's disk (an empty tmpfs over its folder).
    from .test_server import _hidden
    reader = ("import os, sys; from jobs.adapter import load_adapter; "
              f"assert os.listdir({str(lab.folder)!r}) == []; "
              f"model, tok = load_adapter('models:/served-adapter@champion', tracking_uri={lab.url!r}); "
              "print('LOADED', type(model).__name__, sum(1 for n, _ in model.named_parameters() if 'lora_' in n))")
    loaded = subprocess.run([*_hidden(lab.folder), sys.executable, "-c", reader], cwd=REPO, env=lab.env("alice"),
                            capture_output=True, text=True, timeout=300)
    assert "LOADED PeftModel" in loaded.stdout, loaded.stdout + loaded.stderr[-2000:]

    # Downstream scores against the server, then compare.
    evaluate = subprocess.run([sys.executable, "-m", "orchestrator", "evaluate", "--study", "served", "--workdir",
                               str(tmp_path / "runs"), "--tracking-uri", lab.url, "--top", "1", "--tasks", "mmlu",
                               "--limit", "1", "--data-dir", str(FIXTURES), "--poll", "0.3"],
                              cwd=REPO, env=lab.env("alice"), capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stdout[-2000:] + evaluate.stderr[-2000:]
    assert "mmlu" in client.get_run(best.run_id).data.metrics
    compare = subprocess.run([sys.executable, "-m", "orchestrator", "compare", "served", "--workdir",
                              str(tmp_path / "runs"), "--tracking-uri", lab.url], cwd=REPO, env=lab.env("alice"),
                             capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0 and "mmlu" in compare.stdout.splitlines()[0], compare.stdout + compare.stderr
    assert "compare.md" in {a.path for a in client.list_artifacts(state.parent_run_id)}


def test_an_outage_of_the_server_loses_nothing_and_repeats_nothing(lab, monkeypatch, tmp_path):
    """The MLflow server is killed while two studies run and started again once both have gone on without it
    (at most OUTAGE_S later): one study goes on dispatching and collecting, ends and registers its champion once
    the server is back; the other is killed during the outage and resumed after it. In the end every run,
    metric, artifact and version is there once."""
    layout = Layout(lab.folder)
    steady = orchestrator(tmp_path, lab, "alice", "--config", finetune_yaml(tmp_path, "steady", 4, steps=8),
                          env={"LORA_HPO_MIN_STEP_S": "0.5"})
    crashy = orchestrator(tmp_path, lab, "alice", "--study", "crashy", "--algo", "tpe", "--budget", "8",
                          "--parallel", "2", "--executor", "local", "--objective", "tests.objectives:slow_landscape",
                          "--poll", "0.2", env={"LORA_HPO_TEST_SLEEP": "1.5"})
    steady_journal = Journal(tmp_path / "runs" / "steady" / "journal.jsonl")
    crashy_journal = Journal(tmp_path / "runs" / "crashy" / "journal.jsonl")
    deadline = time.monotonic() + 300
    while not (steady_journal.exists() and steady_journal.load().finished and crashy_journal.exists()
               and crashy_journal.load().finished):
        assert steady.poll() is None and crashy.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    pid = mlflow_pid(layout)
    killed_at = time.time()
    os.killpg(pid, signal.SIGKILL)  # the tracking server dies
    try:
        while len(crashy_journal.load().finished) < 3:  # the study goes on without MLflow
            assert crashy.poll() is None and time.time() - killed_at < OUTAGE_S - 5
            time.sleep(0.2)
        crashy.send_signal(signal.SIGKILL)  # and the orchestrator dies during the outage
        crashy.wait()
        # the outage lasts until the other study has collected a result without MLflow (an event, not a clock)
        while not [r for r in steady_journal.records() if r["event"] == "result" and r["time"] > killed_at]:
            assert steady.poll() is None, steady.stdout.read()
            assert time.time() - killed_at < OUTAGE_S, "the study stopped collecting results while MLflow was down"
            time.sleep(0.2)
    finally:
        started = server_cli(lab.folder, "start", timeout=300)
        assert started.returncode == 0, started.stderr
    resumed = orchestrator(tmp_path, lab, "alice", "--study", "crashy", "--resume", env={"LORA_HPO_TEST_SLEEP": "1.5"})
    done(resumed)
    done(steady)

    client = lab.as_user(monkeypatch, "alice")
    for study in ("steady", "crashy"):
        state = load_study(tmp_path / "runs" / study)
        assert state.ended and all(t.status == "ok" for t in state.finished)
        exactly_once(client, study, state)
        outbox = (tmp_path / "runs" / study / "mlflow-outbox.jsonl").read_text().splitlines()
        writes = [json.loads(line) for line in outbox if '"seq"' in line and '"ack"' not in line]
        acks = {json.loads(line)["ack"] for line in outbox if '"ack"' in line}
        assert {w["seq"] for w in writes} == acks, "a queued MLflow write was never done"
    versions = client.search_model_versions("name = 'steady-adapter'")
    assert len(versions) == 1 and versions[0].run_id == min(
        load_study(tmp_path / "runs" / "steady").finished, key=lambda t: t.value).run_id
