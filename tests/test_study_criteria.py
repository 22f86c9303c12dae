"""Studies under constraints, with two objectives, and warm-started from earlier studies (issues 11 and 12).

    .venv/bin/python -m pytest -q tests/test_study_criteria.py

Real components: NOMAD, NNI's TPE and Optuna's multi-objective TPE, the debug/local submitit executors, real
tiny fine-tunes (the constrained study that registers its champion), a SQLite MLflow store, orchestrator
processes killed with SIGKILL. The objective `tests.objectives:costly` is the paper's landscape with memory
and hours that grow with the rank (peak_memory_gb = 14 + 14 r/128, train_hours = 0.5 + 0.5 r/128).
"""
import json
import os

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.search.criteria import a_priori_metrics, knee, model_shapes, pareto_front
from orchestrator.study.journal import Journal
from orchestrator.study.loop import run_study
from orchestrator.study.journal import load_study

from .conftest import kill_when, orchestrator_process, uri

pytestmark = pytest.mark.timeout(600)

MEMORY = {"metric": "peak_memory_gb", "max": 30, "kind": "pb"}      # r <= 128 is feasible
HOURS = {"metric": "train_hours", "max": 1.2, "kind": "eb"}         # r <= 179 is feasible


def synthetic(tmp_path, **kw):
    kw = {"study": "s", "algo": "nomad", "budget": 12, "parallel": 2, "executor": "debug", "poll_s": 0.05,
          "seed": 1, "objective": "tests.objectives:costly", "workdir": str(tmp_path / "runs"),
          "tracking_uri": uri(tmp_path), **kw}
    return load_config(None, **kw)


def quiet():
    return open(os.devnull, "w")


def marked(folder) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.iterdir())]


def key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


def children(client, state):
    exp = client.get_run(state.parent_run_id).info.experiment_id
    return {int(r.data.tags["trial"]): r for r in client.search_runs(
        [exp], f"tags.mlflow.parentRunId = '{state.parent_run_id}'", max_results=1000)}


# ------------------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("algo", ["nomad", "tpe", "random"])
def test_a_constrained_study_judges_every_trial_and_its_best_is_feasible(tmp_path, algo):
    cfg = synthetic(tmp_path, algo=algo, budget=16, constraints=[MEMORY, HOURS])
    state = run_study(cfg, out=quiet())
    assert len(state.finished) == 16 and all(t.status == "ok" for t in state.finished)
    for t in state.finished:
        r = t.point["r"]
        memory, hours = 14 + 14 * r / 128 - 30, 0.5 + 0.5 * r / 128 - 1.2
        assert t.summary["constraint.peak_memory_gb"] == pytest.approx(memory)
        assert t.summary["constraint.train_hours"] == pytest.approx(hours)
        assert t.summary["feasible"] is (memory <= 0 and hours <= 0)
    feasible = [t for t in state.finished if t.summary["feasible"]]
    assert feasible, "no feasible trial in 16: the searcher ignored the constraints"
    best = min(feasible, key=lambda t: t.value)
    client = MlflowClient(cfg.tracking())
    parent = client.get_run(state.parent_run_id)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.trial)
    runs = children(client, state)
    for t in state.finished:  # each child run: its constraint values and a feasible tag
        run = runs[t.trial]
        assert run.data.tags["feasible"] == str(t.summary["feasible"]).lower()
        assert run.data.metrics["constraint.peak_memory_gb"] == pytest.approx(t.summary["constraint.peak_memory_gb"])
    if algo == "nomad":  # MADS learns the barrier (TPE draws its first 20 points at random)
        assert len(feasible) >= len(state.finished) // 2, [t.point["r"] for t in state.finished]


def test_a_trial_that_does_not_report_a_constrained_metric_is_not_feasible_and_says_why(tmp_path):
    cfg = synthetic(tmp_path, algo="random", budget=3, objective="tests.objectives:landscape",
                    constraints=[MEMORY])
    state = run_study(cfg, out=quiet())
    assert state.ended and len(state.finished) == 3
    for t in state.finished:
        assert t.status == "ok" and t.summary["feasible"] is False
        assert t.summary["unjudged"] == "the trial did not report peak_memory_gb"


@pytest.fixture(scope="module")
def constrained_finetunes(tmp_path_factory):
    """Real tiny fine-tunes under a bound on trainable parameters that rank 64 breaks (known before training)."""
    tmp = tmp_path_factory.mktemp("constrained")
    shapes = model_shapes("tiny")
    bound = a_priori_metrics(8, ["q_proj", "v_proj"], shapes)["trainable_params"]
    cfg = load_config(None, study="bounded", algo="random", budget=4, parallel=2, executor="local", poll_s=0.3,
                      seed=0, workdir=str(tmp / "runs"), tracking_uri=uri(tmp),
                      constraints=[{"metric": "trainable_params", "max": bound, "kind": "eb"}],
                      trial={"max_steps": 6, "log_every": 2, "data": {"total_rows": 200}},
                      space={"r": {"choice": [4, 8, 64], "default": 8}, "alpha": {"int": [8, 32], "default": 16},
                             "dropout": {"choice": [0, 0.05], "default": 0.05},
                             "lr": {"log": [3e-4, 2e-3], "default": 1e-3}})
    return cfg, run_study(cfg, out=quiet()), bound


def test_an_a_priori_infeasible_point_never_reaches_a_job(constrained_finetunes):
    cfg, state, bound = constrained_finetunes
    infeasible = [t for t in state.finished if t.status == "infeasible"]
    assert infeasible and all(t.point["r"] == 64 for t in infeasible), "seed 0 draws rank 64 among its 4 points"
    records = list(Journal(cfg.folder / "journal.jsonl").records())
    submitted = {t for r in records if r["event"] == "submitted" for t in r.get("trials", [r.get("trial")])}
    for t in infeasible:
        assert t.trial not in submitted and not t.job.job_id, "an infeasible point was submitted"
        assert not (cfg.folder / "trials" / f"{t.trial:03d}" / "spec.json").exists()
        assert t.summary["trainable_params"] > bound and t.summary["feasible"] is False
        assert "infeasible before training: trainable_params" in t.reason
    client = MlflowClient(cfg.tracking())
    runs = children(client, state)
    for t in infeasible:
        assert runs[t.trial].info.status == "KILLED" and runs[t.trial].data.tags["feasible"] == "false"


def test_a_constrained_study_registers_a_feasible_champion(constrained_finetunes):
    cfg, state, bound = constrained_finetunes
    ok = [t for t in state.finished if t.status == "ok"]
    assert ok and all(t.summary["feasible"] and t.summary["trainable_params"] <= bound for t in ok)
    best = min(ok, key=lambda t: t.value)
    version = MlflowClient(cfg.tracking()).get_model_version_by_alias("bounded-adapter", "champion")
    assert version.run_id == best.run_id and int(version.tags["hp.r"]) in (4, 8)


# ------------------------------------------------------------------------------------------- two objectives
@pytest.mark.parametrize("algo", ["nomad", "tpe"])
def test_a_two_objective_study_logs_its_front_and_picks_the_knee(tmp_path, algo):
    cfg = synthetic(tmp_path, algo=algo, budget=16, objectives=["val_loss", "train_hours"],
                    pareto_reference=[2.0, 3.0])
    state = run_study(cfg, out=quiet())
    assert len(state.finished) == 16 and all(t.status == "ok" for t in state.finished)
    vectors = {t.trial: (t.value, 0.5 + 0.5 * t.point["r"] / 128) for t in state.finished}
    front = pareto_front(vectors)
    data = json.loads((cfg.folder / "pareto" / "pareto.json").read_text())
    assert {row["trial"] for row in data["front"]} == set(front)
    assert data["reference"] == [2.0, 3.0] and data["rule"] == "knee"
    assert data["champion"] == knee(front)
    client = MlflowClient(cfg.tracking())
    logged = {a.path for a in client.list_artifacts(state.parent_run_id, "pareto")}
    assert {"pareto/pareto.md", "pareto/pareto.json", "pareto/pareto.png"} <= logged
    assert "(champion)" in (cfg.folder / "pareto" / "pareto.md").read_text()


def test_a_champion_rule_picks_the_best_loss_within_the_bound(tmp_path):
    cfg = synthetic(tmp_path, algo="random", budget=14, objectives=["val_loss", "train_hours"],
                    champion_rule="min val_loss s.t. train_hours <= 0.6")
    state = run_study(cfg, out=quiet())
    allowed = [t for t in state.finished if 0.5 + 0.5 * t.point["r"] / 128 <= 0.6]
    assert allowed, "no trial within the rule's bound"
    data = json.loads((cfg.folder / "pareto" / "pareto.json").read_text())
    assert data["champion"] == min(allowed, key=lambda t: t.value).trial
    assert data["rule"] == "min val_loss s.t. train_hours <= 0.6"


# ------------------------------------------------------------------------------------------- kill -9 + resume
@pytest.mark.parametrize("criteria", [{"constraints": [MEMORY, HOURS]},
                                      {"objectives": ["val_loss", "train_hours"]}], ids=["constrained", "two"])
def test_kill_9_then_resume_of_a_criteria_study_loses_and_repeats_nothing(tmp_path, criteria):
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"LORA_HPO_TEST_MARKS": str(marks), "LORA_HPO_TEST_SLEEP": "1.0"}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"study": "crit", "algo": "nomad", "budget": 8, "parallel": 2,
                                      "executor": "local", "poll_s": 0.2, "objective": "tests.objectives:costly",
                                      **criteria}))
    proc = orchestrator_process(tmp_path, "--config", str(config), env=env)
    journal = Journal(tmp_path / "runs" / "crit" / "journal.jsonl")
    kill_when(proc, lambda: len((s := journal.load()).finished) >= 3 and any(t.job.job_id for t in s.running), 180,
              "three results and a running job")
    resumed = orchestrator_process(tmp_path, "--study", "crit", "--resume", env=env)
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    after = load_study(journal.path.parent)
    assert after.ended and len(after.finished) == 8 and all(t.status == "ok" for t in after.finished)
    evaluated = marked(marks)
    assert len(evaluated) == 8 and len({key(p) for p in evaluated}) == 8, "an evaluation was lost or run twice"
    assert all("feasible" in t.summary for t in after.finished), "a trial was not judged"
    client = MlflowClient(uri(tmp_path))
    runs = children(client, after)
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs.values())
    if "objectives" in criteria:
        data = json.loads((journal.path.parent / "pareto" / "pareto.json").read_text())
        vectors = {t.trial: (t.value, 0.5 + 0.5 * t.point["r"] / 128) for t in after.finished}
        assert {row["trial"] for row in data["front"]} == set(pareto_front(vectors))
        assert "pareto/pareto.json" in {a.path for a in client.list_artifacts(after.parent_run_id, "pareto")}


# ------------------------------------------------------------------------------------------- warm start
@pytest.mark.parametrize("algo", ["nomad", "tpe"])
def test_a_warm_start_changes_the_first_suggestion_and_never_reruns_a_warm_point(tmp_path, monkeypatch, algo):
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("LORA_HPO_TEST_MARKS", str(marks))
    earlier = run_study(synthetic(tmp_path, study="round1", algo="random", budget=10, seed=5,
                                  objective="tests.objectives:landscape"), out=quiet())
    warm_points = {key(p) for p in marked(marks)}
    assert len(warm_points) == 10
    for p in marks.iterdir():
        p.unlink()
    # TPE draws at random until it has n_startup_jobs results (warm ones count): below that, a warm start
    # shortens the random phase but its next random draw is a cold start's; past it, TPE's model decides
    options = {"n_startup_jobs": 8} if algo == "tpe" else {}
    cold = run_study(synthetic(tmp_path, study="cold", algo=algo, budget=6, parallel=1, searcher_options=options,
                               objective="tests.objectives:landscape"), out=quiet())
    for p in marks.iterdir():
        p.unlink()
    cfg = synthetic(tmp_path, study="round2", algo=algo, budget=6, parallel=1, searcher_options=options,
                    objective="tests.objectives:landscape", warm_start=["round1"])
    warm = run_study(cfg, out=quiet())
    assert warm.trials[0].point != cold.trials[0].point, "the warm start did not change the first suggestion"
    evaluated = [key(p) for p in marked(marks)]
    assert len(evaluated) == 6 == len(warm.finished), "the budget counts only the new trials"
    assert not warm_points & set(evaluated), "a warm point was evaluated again"
    if algo == "nomad":  # NOMAD starts from the best of the earlier results
        best = min(earlier.finished, key=lambda t: t.value)
        assert warm.trials[0].point == best.point or min(t.value for t in warm.finished) <= best.value
    tag = json.loads(MlflowClient(uri(tmp_path)).get_run(warm.parent_run_id).data.tags["warm_start_from"])
    assert [s["study"] for s in tag] == ["round1"] and tag[0]["parent_run_id"] == earlier.parent_run_id


def test_a_warm_start_from_another_space_is_one_line_and_submits_nothing(tmp_path, capsys):
    run_study(synthetic(tmp_path, study="round1", algo="random", budget=2), out=quiet())
    config = tmp_path / "narrow.yaml"
    config.write_text(yaml.safe_dump({"space": {"r": {"choice": [4, 8], "default": 8}}}))
    capsys.readouterr()  # what the first study printed
    code = main(["--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path), "--config", str(config),
                 "--study", "round2", "--algo", "nomad", "--executor", "debug", "--warm-start", "round1",
                 "--objective", "tests.objectives:costly"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "warm_start" in err[0] and "another space" in err[0], err
    assert not (tmp_path / "runs" / "round2").exists()


@pytest.mark.parametrize("yaml_text, says", [
    ("constraints: [{metric: gpu_temperature, max: 80, kind: pb}]", "gpu_temperature"),
    ("constraints: [{metric: peak_memory_gb, max: forty, kind: pb}]", "max"),
    ("constraints: [{metric: peak_memory_gb, max: 40, kind: hard}]", "kind"),
    ("algo: default\nobjectives: [val_loss, train_hours]", "cannot search two objectives"),
    ("objectives: [val_loss, val_loss]", "names one metric twice"),
    ("champion_rule: knee", "give objectives too"),
    ("objective: {metric: heldout, tasks: {mmlu: 999999}}", "mmlu"),
])
def test_bad_criteria_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, yaml_text, says):
    config = tmp_path / "study.yaml"
    config.write_text(yaml_text + "\n")
    code = main(["--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path), "--config", str(config),
                 "--study", "bad", "--executor", "debug"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()
