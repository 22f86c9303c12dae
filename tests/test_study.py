"""The study loop on real components: real searchers, real submitit executors, a real MLflow store."""
import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.study.journal import Journal
from orchestrator.study.loop import run_study
from orchestrator.study.journal import load_study

from .conftest import REPO, kill_when, orchestrator_process


def config(tmp_path, **kw):
    kw = {"study": "s", "algo": "nomad", "budget": 10, "parallel": 2, "executor": "debug", "poll_s": 0.05,
          "objective": "tests.objectives:landscape", "workdir": str(tmp_path / "runs"),
          "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db", **kw}
    return load_config(None, **kw)


def children(client, parent_id, experiment_id):
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


@pytest.mark.parametrize("algo", ["nomad", "tpe", "random", "default"])
def test_study_with_a_synthetic_objective_is_fully_tracked(tmp_path, algo):
    cfg = config(tmp_path, algo=algo, study=f"synthetic-{algo}")
    state = run_study(cfg, out=open(os.devnull, "w"))
    budget = 1 if algo == "default" else cfg.budget
    assert len(state.finished) == budget and all(t.status == "ok" for t in state.finished)
    client = MlflowClient(cfg.tracking())
    exp = client.get_experiment_by_name(cfg.study)
    parent = client.get_run(state.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["algo"] == algo
    runs = children(client, state.parent_run_id, exp.experiment_id)
    assert len(runs) == budget
    for run in runs:
        trial = state.trials[int(run.data.tags["trial"])]
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_loss"] == pytest.approx(trial.value)
        assert float(run.data.params["lr"]) == pytest.approx(trial.point["lr"])
        assert int(run.data.params["r"]) == trial.point["r"] and "encoded" in run.data.params
    history = [m.value for m in sorted(client.get_metric_history(state.parent_run_id, "best_val_loss"),
                                       key=lambda m: m.step)]
    assert len(history) == budget and history == sorted(history, reverse=True)
    assert history[-1] == pytest.approx(min(t.value for t in state.finished))
    assert Journal(cfg.folder / "journal.jsonl").load().ended
    plots = {a.path for a in client.list_artifacts(state.parent_run_id, "plots")}
    assert {"plots/history.png", "plots/parallel.html", "plots/params.png"} <= plots


def test_failed_evaluations_are_recorded_and_the_study_goes_on(tmp_path):
    cfg = config(tmp_path, algo="random", budget=16, objective="tests.objectives:flaky", seed=3)
    state = run_study(cfg, out=open(os.devnull, "w"))
    failed = [t for t in state.finished if t.status == "failed"]
    assert len(state.finished) == 16 and failed and len(failed) < 16
    for t in failed:
        assert t.point["dropout"] == 1 or t.point["r"] == 4
        assert ("dropout 1" in t.reason) if t.point["dropout"] == 1 else ("nan" in t.reason.lower())
    client = MlflowClient(cfg.tracking())
    for t in failed:
        run = client.get_run(t.run_id)
        assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == t.reason


def test_an_existing_study_is_not_overwritten_and_resume_needs_a_journal(tmp_path):
    from orchestrator.study.loop import StudyError
    cfg = config(tmp_path, budget=2)
    run_study(cfg, out=open(os.devnull, "w"))
    with pytest.raises(StudyError, match="already exists.*--resume"):
        run_study(cfg, out=open(os.devnull, "w"))
    with pytest.raises(StudyError, match="nothing to resume"):
        run_study(config(tmp_path, study="other"), resume=True, out=open(os.devnull, "w"))



@pytest.mark.parametrize("algo", ["nomad", "tpe"])
def test_kill_9_then_resume_loses_nothing_and_runs_nothing_twice(tmp_path, algo):
    """A real orchestrator process on the local executor, killed with SIGKILL while jobs run."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"LORA_HPO_TEST_MARKS": str(marks), "LORA_HPO_TEST_SLEEP": "1.5"}
    args = ["--algo", algo, "--study", "crashy", "--budget", "8", "--parallel", "2", "--executor", "local",
            "--objective", "tests.objectives:slow_landscape", "--poll", "0.2"]
    proc = orchestrator_process(tmp_path, *args, env=env)
    journal = Journal(tmp_path / "runs" / "crashy" / "journal.jsonl")
    # kill once some trials are done and others are running
    kill_when(proc, lambda: len((s := journal.load()).finished) >= 3 and any(t.job.job_id for t in s.running), 120,
              "three results and a running job")
    before = journal.load()
    running_jobs = {t.trial: t.job.job_id for t in before.running if t.job.job_id}
    assert running_jobs and not before.ended

    resumed = orchestrator_process(tmp_path, "--study", "crashy", "--resume", env=env)
    output, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, output
    after = load_study(journal.path.parent)
    assert after.ended and len(after.finished) == 8 and all(t.status == "ok" for t in after.finished)
    for trial, job_id in running_jobs.items():
        assert after.trials[trial].job.job_id == job_id, "a running job was resubmitted instead of re-attached"
    evaluated = [json.loads(p.read_text()) for p in marks.iterdir()]
    assert len(evaluated) == 8, "an evaluation was lost or run twice"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("crashy")
    runs = children(client, after.parent_run_id, exp.experiment_id)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert client.get_run(after.parent_run_id).info.status == "FINISHED"


def test_the_orchestrator_process_never_imports_torch(tmp_path):
    script = (
        "import sys, os\n"
        "from orchestrator.__main__ import main\n"
        f"code = main(['--algo', 'random', '--study', 'hygiene', '--budget', '2', '--parallel', '2',"
        f" '--executor', 'local', '--objective', 'tests.objectives:landscape', '--poll', '0.2',"
        f" '--workdir', r'{tmp_path}/runs', '--tracking-uri', r'sqlite:///{tmp_path}/mlruns/mlflow.db'])\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]\n"
        "print('HEAVY', heavy, 'CODE', code)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "HEAVY [] CODE 0" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("args,key", [
    (["--budget", "0"], "budget"),
    (["--parallel", "-1"], "parallel"),
    (["--study", "bad name!"], "study"),
    (["--objective", "nocolon"], "objective"),
    (["--config", "{cfg}"], "space"),
    (["--config", "{missing}"], "no such file"),
])
def test_bad_configuration_is_one_line_exit_2_and_writes_nothing(tmp_path, args, key):
    cfg = tmp_path / "study.yaml"
    cfg.write_text("space:\n  r: {choice: [8, 4], default: 8}\n")
    args = [a.format(cfg=cfg, missing=tmp_path / "nope.yaml") for a in args]
    proc = orchestrator_process(tmp_path, *args)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and key in lines[0], output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


def test_unknown_yaml_keys_and_bad_trial_values_name_the_key(tmp_path):
    from orchestrator.config import ConfigError
    bad = tmp_path / "bad.yaml"
    bad.write_text("budjet: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'budjet'"):
        load_config(str(bad))
    bad.write_text("trial: {epochs: -1}\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(str(bad))
    bad.write_text("resources: {gpus_per_node: -2}\n")
    with pytest.raises(ConfigError, match="gpus_per_node"):
        load_config(str(bad))


def test_default_study_names_do_not_collide(tmp_path):
    from orchestrator.__main__ import main
    common = ["--algo", "random", "--budget", "1", "--executor", "debug", "--objective",
              "tests.objectives:landscape", "--workdir", str(tmp_path / "runs"),
              "--tracking-uri", f"sqlite:///{tmp_path}/mlruns/mlflow.db", "--poll", "0.05"]
    assert main(common) == 0 and main(common) == 0
    assert (tmp_path / "runs" / "tiny-random" / "journal.jsonl").exists()
    assert (tmp_path / "runs" / "tiny-random-2" / "journal.jsonl").exists()
    assert main(common + ["--study", "tiny-random"]) == 2, "an explicit name must not be silently changed"


@pytest.mark.parametrize("algo", ["nomad", "tpe"])
def test_k_trials_stay_in_flight_while_the_search_runs(tmp_path, algo, monkeypatch):
    """Asynchronous NOMAD (and TPE) refill a freed slot at once: after every dispatch, K trials run until the
    budget has been handed out (on the local executor; the trials end one at a time, tests.objectives:in_turn,
    so that a slot refilled alone is an event the test controls, not a matter of timing)."""
    k, budget = 3, 12
    turns = tmp_path / "turns"
    turns.mkdir()
    monkeypatch.setenv("LORA_HPO_TEST_TURNS", str(turns))
    monkeypatch.setenv("LORA_HPO_TEST_SLOTS", str(k))
    monkeypatch.setenv("LORA_HPO_TEST_BUDGET", str(budget))
    cfg = config(tmp_path, algo=algo, study=f"inflight-{algo}", budget=budget, parallel=k, executor="local",
                 objective="tests.objectives:in_turn", poll_s=0.1)
    run_study(cfg, out=open(os.devnull, "w"))
    inflight, handed, seen, refills = 0, 0, [], []
    for r in Journal(cfg.folder / "journal.jsonl").records():
        if r["event"] == "dispatch":
            inflight += len(r["keys"])
            handed += len(r["keys"])
            seen.append(inflight)
            refills.append(len(r["keys"]))
            # the last dispatch may find more free slots than trials left in the budget
            assert inflight == k or handed == budget, f"only {inflight} of {k} slots busy after a dispatch"
        elif r["event"] == "result":
            inflight -= 1
    assert handed == budget and len(seen) > 2 and set(seen[:-1]) == {k}
    # each freed slot was refilled alone while the others still ran (a synchronous searcher refills K at a time)
    assert refills == [k] + [1] * (budget - k), refills


def test_register_as_empty_means_register_nothing_and_a_bad_name_is_refused(tmp_path):
    from orchestrator.config import ConfigError
    from orchestrator.study.end import queue_registration

    from types import SimpleNamespace

    from orchestrator.search.criteria import Judge
    config = load_config(None, register_as="")
    state = SimpleNamespace(finished=[SimpleNamespace(trial=0, status="ok", value=1.0, summary={}, point={})])
    assert config.register_name is None
    assert queue_registration(config, state, tracker=None, judge=Judge(config)) is None  # nothing is queued
    with pytest.raises(ConfigError, match="register_as"):
        load_config(None, register_as="bad name!")
