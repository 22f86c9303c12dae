"""The MLflow outbox never lets one refused write block or drop the others, belongs to one study incarnation, and
forgets runs the store lost; the tracker writes metric names MLflow accepts and records the originals.

    .venv/bin/python -m pytest -q tests/test_outbox.py          # unit tier (MLflow: the in-memory fake)
"""
import contextlib
import json

import pytest

from orchestrator.tracking.outbox import Outbox, clean
from orchestrator.tracking.tracker import NAMES_TAG, PARENT, Tracker, metric_name, trial_key

from .fakes import fake_mlflow

pytestmark = pytest.mark.unit
URI = "memory://outbox"


def tracker(tmp_path, uid="u1", log=None):
    return Tracker(URI, "exp", tmp_path / "mlflow-outbox.jsonl", uid, log=log or (lambda line: None))


def runs_by_key(store):
    return {r.tags["lora_hpo.run_key"].split("/", 1)[1]: r for r in store.runs.values()}


def test_a_lone_surrogate_is_written_and_blocks_nothing(tmp_path, monkeypatch):
    with fake_mlflow(monkeypatch) as store:
        t = tracker(tmp_path)
        t.start_parent({"study": "exp", "algo": "random", "budget": 1, "parallel": 1, "seed": 0, "executor": "debug",
                        "preset": "tiny", "objective": None}, {})
        t.start_child(0, {"r": 8}, None, "random")
        reason = "FileNotFoundError: " + b"data-\xff.jsonl".decode("utf-8", "surrogateescape")
        t.finish_child(0, "failed", None, {}, reason, None)
        t.end_parent()
        assert t.close(wait_s=30), t.status()
        child = runs_by_key(store)[trial_key(0)]
        assert child.status == "FAILED" and child.tags["failure_reason"] == "FileNotFoundError: data-\ufffd.jsonl"
        assert runs_by_key(store)[PARENT].status == "FINISHED"


def test_a_metric_name_mlflow_refuses_is_renamed_and_the_batch_stays_whole(tmp_path, monkeypatch):
    with fake_mlflow(monkeypatch) as store:
        t = tracker(tmp_path)
        t.open_run("trial:0", "trial-000", {})
        t.finish_run("trial:0", "ok", 0.5, {"dev.mmlu@5": 0.25, "train_s": 10.0}, None, None)
        assert t.close(wait_s=30), t.status()
        run = runs_by_key(store)["trial:0"]
        assert run.status == "FINISHED" and run.metrics["val_loss"] == 0.5 and run.metrics["train_s"] == 10.0
        assert run.metrics["dev.mmlu_5"] == 0.25 and json.loads(run.tags[NAMES_TAG]) == {"dev.mmlu_5": "dev.mmlu@5"}


def test_a_batch_with_a_refused_item_loses_only_that_item_said_once(tmp_path, monkeypatch):
    said = []
    with fake_mlflow(monkeypatch) as store:
        t = tracker(tmp_path, log=said.append)
        t.open_run("r", "r", {})
        bad = [["ok_metric", 1.0, 0, 0], ["bad@name", 2.0, 0, 0]]
        t.outbox.put("log_batch", key="r", metrics=bad, tags={"status": "ok"})
        t.outbox.put("log_batch", key="r", metrics=bad)
        t.tag("r", after="yes")
        assert t.close(wait_s=30), t.status()
        run = runs_by_key(store)["r"]
        assert run.metrics == {"ok_metric": 1.0} and run.tags["status"] == "ok" and run.tags["after"] == "yes"
        assert [line for line in said if "bad@name" in line] == [said[0]] and len(said) == 1, said


def test_an_outbox_of_another_incarnation_is_moved_aside(tmp_path, monkeypatch):
    with fake_mlflow(monkeypatch) as store:
        first = tracker(tmp_path, uid="old")
        first.open_run("trial:0", "trial-000", {})
        assert first.close(wait_s=30)
        said = []
        second = tracker(tmp_path, uid="new", log=said.append)
        assert second.run_id("trial:0") is None, "a new study would write into the old one's run"
        second.open_run("trial:0", "trial-000", {})
        assert second.close(wait_s=30)
        assert (tmp_path / "mlflow-outbox.old.jsonl").exists() and "moved to mlflow-outbox.old.jsonl" in said[0]
        assert len(store.runs) == 2


def test_forget_drops_a_lost_runs_id_marks_and_queued_writes(tmp_path, monkeypatch):
    with fake_mlflow(monkeypatch):
        t = tracker(tmp_path)
        t.open_run("trial:0", "trial-000", {})
        assert t.close(wait_s=30)
        again = tracker(tmp_path)
        assert again.run_id("trial:0") and again.outbox.has("create:trial:0")
        again.outbox.forget(["trial:0"])
        assert again.run_id("trial:0") is None and not again.outbox.has("create:trial:0")
        again.close()
        assert tracker(tmp_path).run_id("trial:0") is None  # forgotten for good (the record is in the file)


def test_clean_and_metric_name():
    assert clean({"a\udcff": ["x\ud800y"]}) == {"a\ufffd": ["x?y"]}
    assert metric_name("dev.mmlu@5") == "dev.mmlu_5" and metric_name("../x") == "__/x".replace("/", "_")
    assert metric_name("ok/name-1 2.3") == "ok/name-1 2.3"


def test_outbox_damage_names_the_file(tmp_path):
    (tmp_path / "o.jsonl").write_text('{"outbox": "u"}\n{"seq": "x", "op": 1}\n')
    from orchestrator.tracking.outbox import OutboxError
    with pytest.raises(OutboxError, match="o.jsonl.*not valid"):
        Outbox(tmp_path / "o.jsonl", URI, "exp", "u")


@pytest.mark.parametrize("raised, status", [(None, "FINISHED"), (ValueError("bad"), "FAILED"),
                                            (KeyboardInterrupt(), "KILLED")])
def test_a_commands_run_ends_on_every_path(tmp_path, monkeypatch, raised, status):
    with fake_mlflow(monkeypatch) as store:
        t = tracker(tmp_path)
        with pytest.raises(type(raised)) if raised else contextlib.nullcontext():
            with t.run("confirm", "confirm", {"role": "confirm"}):
                if raised:
                    raise raised
        assert t.close(wait_s=30)
        [run] = store.runs.values()
        assert run.status == status


def test_confirm_on_a_study_without_a_success_fails_its_run_and_says_so(tmp_path, monkeypatch, capsys):
    from orchestrator.__main__ import main
    from orchestrator.config import load_config
    from orchestrator.study.journal import Journal

    with fake_mlflow(monkeypatch) as store:
        cfg = load_config(None, study="nothing", workdir=str(tmp_path), tracking_uri=URI, executor="debug")
        journal = Journal(cfg.folder / "journal.jsonl")
        journal.append("start", config=cfg.to_dict(), study_uid="u", executor="debug")
        journal.append("trial", trial=0, point={"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-5})
        journal.append("result", trial=0, status="failed", value=None, reason="diverged", summary={})
        assert main(["confirm", "--study", "nothing", "--workdir", str(tmp_path), "--tracking-uri", URI]) == 2
        assert "no successful trial to confirm" in capsys.readouterr().err
        [run] = [r for r in store.runs.values() if r.tags.get("role") == "confirm"]
        assert run.status == "FAILED", "the confirm run was left RUNNING"


def test_reconcile_forgets_a_registration_whose_version_is_gone(tmp_path, monkeypatch):
    with fake_mlflow(monkeypatch) as store:
        t = tracker(tmp_path)
        t.open_run("trial:0", "trial-000", {})
        seq = t.register("m", "trial:0", {})
        assert t.close(wait_s=30) and t.result_of(seq) == "1"
        store.models.clear()  # the registry lost it (a restored backup)
        again = tracker(tmp_path)
        said = again.reconcile(["trial:0"], [("m", "trial:0")])
        assert said == {"runs": [], "registered": ["m"]}
        seq = again.register("m", "trial:0", {})
        assert again.close(wait_s=30) and again.result_of(seq) == "1" and store.models["m"]["aliases"] == {"champion": 1}
