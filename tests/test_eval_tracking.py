"""Downstream scores in MLflow: a trial's scores land in its child run, the poster's table in the parent run.

The writes go the way `orchestrator evaluate` makes them: through a Tracker (its durable outbox), drained here.
"""
import itertools
import json
import statistics

import pytest
from mlflow.tracking import MlflowClient

from evaluation.spec import EvaluationSpec
from evaluation.tracking import collect, markdown, poster_metrics, poster_table, protocol_mismatch, score_writes
from orchestrator.tracking.tracker import Tracker

_outboxes = itertools.count()


@pytest.fixture
def store(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("s", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp, tags={"role": "study"}).info.run_id
    client.tmp_path = tmp_path
    return client, exp, parent


def _tracker(client) -> Tracker:
    return Tracker(client.tracking_uri, "s", client.tmp_path / f"outbox-{next(_outboxes)}.jsonl", "test")


def log_scores(client, run_id, result, tags=None) -> dict:
    """What evaluate does with one evaluation's result: queued through the tracker, drained; its metrics."""
    tracker = _tracker(client)
    tracker.log_scores(run_id, result, tags or {})
    assert tracker.close(wait_s=60), tracker.status()
    return score_writes(result, tags)[0]


def log_poster(client, parent, table) -> dict:
    tracker = _tracker(client)
    tracker.log_poster(parent, table)
    assert tracker.close(wait_s=60), tracker.status()
    return poster_metrics(table)


def child(client, exp, parent, trial, algo="nomad", val_loss=None):
    run = client.create_run(exp, tags={"mlflow.parentRunId": parent, "trial": str(trial), "algo": algo})
    if val_loss is not None:
        client.log_metric(run.info.run_id, "val_loss", val_loss)
    return run.info.run_id


RESULT = {"scores": {"mmlu": 0.25, "humaneval": 0.5, "drop": None},
          "tasks": {"mmlu": {"score": 0.25, "n": 4, "groups": {"anatomy": {"score": 0.5, "n": 2, "correct": 1},
                                                                "virology": {"score": 0.0, "n": 2, "correct": 0}},
                             "records": [{"id": 1}]},
                    "humaneval": {"score": 0.5, "n": 2, "groups": {}}, "drop": {"score": None, "n": 0}}}


def test_scores_land_in_the_given_child_run_only(store):
    client, exp, parent = store
    a, b = child(client, exp, parent, 0, val_loss=1.0), child(client, exp, parent, 1, val_loss=2.0)
    logged = log_scores(client, a, RESULT, tags={"eval_default": "true"})
    assert logged == {"mmlu": 0.25, "humaneval": 0.5}  # a score of None (no example) is not a metric
    run = client.get_run(a)
    assert {k: run.data.metrics[k] for k in ("mmlu", "humaneval")} == logged and "drop" not in run.data.metrics
    assert run.data.tags["eval_default"] == "true" and run.data.tags["eval_harness"] == "instructeval"
    paths = {f.path for d in ("eval", "eval/breakdown") for f in client.list_artifacts(a, d)}
    assert {"eval/scores.json", "eval/breakdown/mmlu.json"} <= paths and "eval/breakdown/humaneval.json" not in paths
    scores = json.loads(open(client.download_artifacts(a, "eval/scores.json")).read())
    assert "records" not in scores["tasks"]["mmlu"] and scores["scores"]["mmlu"] == 0.25
    breakdown = json.loads(open(client.download_artifacts(a, "eval/breakdown/mmlu.json")).read())
    assert breakdown["anatomy"]["score"] == 0.5
    assert not any(k in client.get_run(b).data.metrics for k in ("mmlu", "humaneval"))
    assert not any(k in client.get_run(parent).data.metrics for k in ("mmlu", "humaneval"))


def test_lm_eval_scores_are_prefixed_so_they_never_pass_for_the_papers(store):
    client, exp, parent = store
    a = child(client, exp, parent, 0, val_loss=1.0)
    result = {"harness": "lm-eval", "scores": {"mmlu": 0.3, "arc_easy": 0.6},
              "tasks": {"mmlu": {"score": 0.3, "breakdown": {"mmlu_anatomy": {"acc,none": 0.3}}}}}
    assert log_scores(client, a, result) == {"lm_eval.mmlu": 0.3, "lm_eval.arc_easy": 0.6}
    assert "mmlu" not in client.get_run(a).data.metrics
    assert "eval/breakdown/lm_eval.mmlu.json" in {f.path for f in client.list_artifacts(a, "eval/breakdown")}


def test_poster_table_over_the_top_k_of_each_method_and_the_default_row(store):
    client, exp, parent = store
    # nomad: val_loss 1..5 with known scores; the top 3 are trials 0, 1, 2
    nomad = {0: (1.0, 0.40, 0.10), 1: (1.1, 0.50, 0.20), 2: (1.2, 0.30, 0.30), 3: (1.3, 0.90, 0.90),
             4: (1.4, 0.99, 0.99)}
    for trial, (loss, mmlu, he) in nomad.items():
        run = child(client, exp, parent, trial, "nomad", loss)
        log_scores(client, run, {"scores": {"mmlu": mmlu, "humaneval": he}})
    for trial, (loss, mmlu) in {10: (0.9, 0.6), 11: (0.95, 0.7)}.items():  # tpe: 2 evaluated, no humaneval
        log_scores(client, child(client, exp, parent, trial, "tpe", loss), {"scores": {"mmlu": mmlu}})
    log_scores(client, child(client, exp, parent, 20, "nomad", 1.9), {"scores": {"mmlu": 0.2, "humaneval": 0.05}},
               tags={"eval_default": "true"})  # the default point, worse than the top 3: not in nomad's row
    child(client, exp, parent, 30, "nomad", 0.5)  # lowest loss but never evaluated: not in the table

    rows = collect(client, [parent])
    assert sorted(r["trial"] for r in rows) == [0, 1, 2, 3, 4, 10, 11, 20]
    table = poster_table(rows, top=3)
    assert table["scores"] == ["mmlu", "humaneval"]
    by = {r["method"]: r for r in table["rows"]}
    assert list(by) == ["nomad", "tpe", "default"]
    assert by["nomad"]["trials"] == [0, 1, 2] and by["tpe"]["trials"] == [10, 11] and by["default"]["trials"] == [20]
    m = by["nomad"]["stats"]["mmlu"]
    assert (m["min"], m["max"]) == (0.30, 0.50)
    assert m["mean"] == pytest.approx(0.40) and m["sd"] == pytest.approx(statistics.stdev([0.4, 0.5, 0.3]))
    assert m["sd"] == pytest.approx(0.1)
    assert by["nomad"]["stats"]["humaneval"]["mean"] == pytest.approx(0.2)
    assert by["tpe"]["stats"]["mmlu"]["mean"] == pytest.approx(0.65) and by["tpe"]["stats"]["humaneval"] is None
    assert by["default"]["stats"]["mmlu"] == {"min": 0.2, "max": 0.2, "mean": 0.2, "sd": None, "n": 1}

    metrics = log_poster(client, parent, table)
    assert metrics["nomad.top3_mean_mmlu"] == pytest.approx(0.4) and metrics["tpe.top3_max_mmlu"] == pytest.approx(0.7)
    assert metrics["default_humaneval"] == pytest.approx(0.05)
    logged = client.get_run(parent).data.metrics
    assert logged["nomad.top3_sd_mmlu"] == pytest.approx(0.1) and "default_mmlu" in logged
    assert {"eval/poster_table.md", "eval/poster_table.json"} <= {f.path for f in client.list_artifacts(parent, "eval")}
    text = markdown(table)
    assert "| nomad | 3 | 40.00 ± 10.00 [30.00, 50.00] |" in text and "| default | 1 | 20.00 [20.00, 20.00]" in text


def test_one_method_gives_unprefixed_parent_metrics(store):
    client, exp, parent = store
    for trial, (loss, mmlu) in enumerate([(1.0, 0.2), (2.0, 0.4)]):
        log_scores(client, child(client, exp, parent, trial, "nomad", loss), {"scores": {"mmlu": mmlu}},
                   tags={"eval_default": str(trial == 1).lower()})
    table = poster_table(collect(client, [parent]), top=2)
    assert [r["method"] for r in table["rows"]] == ["nomad", "default"]  # the default trial ranks in the top 2 too
    metrics = log_poster(client, parent, table)
    assert metrics["top2_mean_mmlu"] == pytest.approx(0.3) and metrics["default_mmlu"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="top=0"):
        poster_table([], top=0)


def test_the_protocol_is_logged_with_the_scores_and_mixed_protocols_are_named(store):
    client, exp, parent = store
    reference = EvaluationSpec(base="tiny", tasks="mmlu,humaneval")
    greedy_bf16 = reference.replace(decoding="greedy", dtype="bf16")
    sampled = {"do_sample": True, "temperature": 0.1, "top_p": 0.9, "top_k": 50}
    runs = {}
    for trial, spec, decoding in ((0, reference, {"mmlu": {"do_sample": False}, "humaneval": sampled}),
                                  (1, reference, {"mmlu": {"do_sample": False}, "humaneval": sampled}),
                                  (2, greedy_bf16, {"mmlu": {"do_sample": False}, "humaneval": {"do_sample": False}})):
        runs[trial] = child(client, exp, parent, trial, val_loss=1.0 + trial)
        log_scores(client, runs[trial], {"scores": {"mmlu": 0.3}, "protocol": spec.protocol(), "decoding": decoding})
    tags = client.get_run(runs[0]).data.tags
    assert tags["eval.protocol.decoding"] == "reference" and tags["eval.protocol.humaneval_cut"] == "blank-line"
    assert tags["eval.protocol.dtype"] == "fp32" and tags["eval.protocol.merge"] == "false"
    assert tags["eval.decoding.humaneval.temperature"] == "0.1" and tags["eval.decoding.mmlu.top_p"] == "none"
    rows = {r["trial"]: r for r in collect(client, [parent])}
    assert protocol_mismatch([rows[0], rows[1]]) == []
    assert protocol_mismatch(rows.values()) == [
        "eval.decoding.humaneval.do_sample", "eval.decoding.humaneval.temperature", "eval.decoding.humaneval.top_k",
        "eval.decoding.humaneval.top_p", "eval.protocol.decoding", "eval.protocol.dtype", "eval.protocol.seeds"]
    assert protocol_mismatch([client.get_run(runs[0]), client.get_run(runs[2])]) == protocol_mismatch(
        [rows[0], rows[2]])  # MLflow Runs or collect() rows
    # a run scored before protocols were logged differs from one that has them; a task only one run scored
    # does not make a mismatch by itself
    old = child(client, exp, parent, 3, val_loss=0.5)
    log_scores(client, old, {"scores": {"mmlu": 0.2}})
    assert "eval.protocol.decoding" in protocol_mismatch([client.get_run(old), rows[0]])
    only_mmlu = {k: v for k, v in rows[0]["protocol"].items() if not k.startswith("eval.decoding.humaneval")}
    assert protocol_mismatch([only_mmlu, rows[1]]) == []
