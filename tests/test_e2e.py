"""End to end: a tiny study of real fine-tunes on the local executor, then the champion loaded from MLflow."""
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.study.loop import run_study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = load_config(None, study="e2e", algo="random", budget=3, parallel=2, executor="local", poll_s=0.5,
                      workdir=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db", seed=1,
                      trial={"max_steps": 12, "log_every": 2, "data": {"total_rows": 400}},
                      space={"r": {"choice": [4, 8, 16], "default": 8}, "alpha": {"int": [8, 32], "default": 16},
                             "dropout": {"choice": [0, 0.05], "default": 0.05},
                             "lr": {"log": [3e-4, 2e-3], "default": 1e-3}})
    state = run_study(cfg, out=open(os.devnull, "w"))
    return cfg, state


def test_every_trial_is_a_tracked_finished_child_run(tiny_study):
    cfg, state = tiny_study
    assert len(state.finished) == 3 and all(t.status == "ok" for t in state.finished)
    client = MlflowClient(cfg.tracking())
    for t in state.finished:
        run = client.get_run(t.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == state.parent_run_id
        assert run.data.metrics["val_loss"] == pytest.approx(t.value)
        assert run.data.tags["executor"] == "local" and run.data.tags["job_id"] == t.job.job_id
        curve = client.get_metric_history(t.run_id, "train_loss")
        assert sorted(m.step for m in curve) == list(range(1, 13)), "the training curve is incomplete or doubled"
        artifacts = {a.path for a in client.list_artifacts(t.run_id)}
        assert {"adapter", "result.json", "spec.json"} <= artifacts
        assert "adapter/adapter_config.json" in {a.path for a in client.list_artifacts(t.run_id, "adapter")}


def test_champion_loads_from_the_registry_as_a_usable_model(tiny_study):
    import mlflow
    from safetensors.torch import load_file

    from jobs.adapter import load_adapter

    cfg, state = tiny_study
    best = min(state.finished, key=lambda t: t.value)
    client = MlflowClient(cfg.tracking())
    version = client.get_model_version_by_alias("e2e-adapter", "champion")
    assert version.run_id == best.run_id and float(version.tags["val_loss"]) == pytest.approx(best.value)
    assert int(version.tags["hp.r"]) == best.point["r"]
    mlflow.set_tracking_uri(cfg.tracking())
    model, tokenizer = load_adapter("models:/e2e-adapter@champion")
    trained = load_file(os.path.join(best.out, "adapter", "adapter_model.safetensors"))
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(trained) > 0
    for name, value in trained.items():
        assert torch.equal(loaded[name.replace(".weight", ".default.weight")], value)
    prompt = tokenizer("### Instruction:\nWhat is 2 plus 3?\n\n### Response:\n", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        load_adapter(state.trials[best.trial].out)  # the trial folder itself is not an adapter folder
