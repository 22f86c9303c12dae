"""Trials that span two nodes, on a real two-node SLURM cluster on this machine (slurm/dev-cluster.sh --nodes 2).

    .venv/bin/python -m pytest -q -m slurm tests/test_slurm_nodes.py

The cluster (its own folder and port base, beside the single-node one) runs each slurmd in its own network
namespace on a private bridge: a trial's two ranks (FSDP over gloo) reach each other only over that bridge.
Covered: one fine-tune whose ranks run on two hosts and match a single process; a two-node study through
`python -m orchestrator --executor slurm`, killed with SIGKILL and resumed; `scontrol requeue` of a running
two-node trial, which resumes from the slices its ranks saved; a node that loses power mid-trial, retried by the
study's retry policy. Every fine-tune trains the same 12 steps, so a single process's run is everyone's reference.
"""
import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from orchestrator.study.journal import Journal, load_study

from .conftest import kill_when
from .slurm_fixture import SCRIPT, events, finish, orchestrator, sacct_history, steps_done, study_yaml, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

CLUSTER_DIR = os.environ.get("LORA_HPO_SLURM_2N_DIR", "/var/tmp/lora-hpo-slurm-2n")
PORT_BASE = os.environ.get("LORA_HPO_SLURM_2N_PORT_BASE", "16917")
CLUSTER_ENV = {**os.environ, "LORA_HPO_SLURM_PORT_BASE": PORT_BASE}
TRIAL = {"strategy": "fsdp", "max_steps": 12, "per_device_batch": 8, "grad_accum": 1, "log_every": 1,
         "checkpoint_every": 2, "data": {"total_rows": 600}}
POINT = {"r": 8, "alpha": 32, "dropout": 0.0, "lr": 1e-3}
SAME_TRAINING = {"keep_checkpoints": {"choice": [1, 2, 3, 4], "default": 1},
                 **{k: {"fixed": v} for k, v in POINT.items()}}
TWO_NODES = {"partition": "gpu", "nodes": 2, "timeout_min": 20}


def cluster(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args, "--dir", CLUSTER_DIR], capture_output=True, text=True,
                          timeout=timeout, env=CLUSTER_ENV)


@pytest.fixture(scope="module")
def two_nodes():
    """SLURM_CONF of the running two-node cluster (started here, and stopped at the end, if needed)."""
    if os.geteuid() != 0:
        pytest.skip("the two-node dev cluster needs root (network namespaces, munged, MariaDB, SLURM daemons)")
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the two-node dev cluster needs {', '.join(missing)} (iproute2, util-linux)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and apt-get is not available to install it")
    was_running = cluster("status").returncode == 0
    t0 = time.monotonic()
    started = cluster("start", "--nodes", "2", "--gpus", "0", "--cpus", "4", "--mem-gb", "16")
    if started.returncode != 0:
        pytest.fail(f"dev-cluster.sh start --nodes 2 failed:\n{started.stderr}")
    print(f"\n[2 nodes] cluster up in {time.monotonic() - t0:.1f} s")
    conf = started.stdout.strip().rsplit("SLURM_CONF=", 1)[1]
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", conf)
    yield conf
    patch.undo()
    if not was_running:
        stopped = cluster("stop")
        assert stopped.returncode == 0, stopped.stderr
        assert f"lh{PORT_BASE}" not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert f"lh{PORT_BASE}" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The validation loss of the same fine-tune in one process (no FSDP)."""
    from jobs import finetune
    from jobs.spec import FinetuneSpec

    tmp = tmp_path_factory.mktemp("reference")
    spec = FinetuneSpec.from_dict({**TRIAL, **POINT, "strategy": "ddp", "grad_accum": 2, "out": str(tmp / "one"),
                                   "data": {"total_rows": 600, "cache_dir": str(tmp / "data")}})
    result = finetune.run(spec)
    assert result["status"] == "ok", result["reason"]
    return result["val_loss"]


def link_bytes(node: str) -> int:
    """Bytes through the host side of a node's link to the bridge (received + sent)."""
    stats = json.loads(subprocess.run(["ip", "-s", "-j", "link", "show", f"lh{PORT_BASE}v{node[-1]}"],
                                      capture_output=True, text=True, check=True).stdout)[0]["stats64"]
    return stats["rx"]["bytes"] + stats["tx"]["bytes"]


def ranks_ran_on_both_nodes(out, job_id: str) -> None:
    from jobs.contract import read_attempts
    starts = [r for r in read_attempts(out) if r.get("event") == "start" and str(r.get("job_id")) == job_id]
    assert sorted((r["rank"], r["host"], r["node"]) for r in starts) == [(0, "node1", "0"), (1, "node2", "1")], starts


def written_once(out) -> None:
    lines = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == list(range(1, 13)), "metrics doubled or missing"
    assert (Path(out) / "adapter" / "adapter_model.safetensors").exists()
    assert not list(Path(out).glob("adapter.partial*"))


def test_a_two_node_finetune_runs_one_rank_per_host_and_matches_one_process(two_nodes, reference, tmp_path):
    from jobs.entry import FinetuneTrial
    from jobs.spec import FinetuneSpec
    from slurm.backend import make_executor
    from slurm.executors import Resources

    t0 = time.monotonic()
    spec = FinetuneSpec.from_dict({**TRIAL, **POINT, "out": str(tmp_path / "trial"),
                                   "data": {"total_rows": 600, "cache_dir": str(tmp_path / "data")}})
    executor = make_executor("slurm", tmp_path / "jobs", Resources(**TWO_NODES), job_name="two-node")
    before = link_bytes("node2")
    job = executor.submit(FinetuneTrial(), spec.to_dict())
    results = job.results()
    crossed = link_bytes("node2") - before
    assert [r["status"] for r in results] == ["ok", "ok"], [r.get("reason") for r in results]
    result = json.loads((tmp_path / "trial" / "result.json").read_text())
    assert result["world_size"] == 2 and result["strategy"] == "fsdp"
    assert result["val_loss"] == pytest.approx(reference, rel=1e-5)
    ranks_ran_on_both_nodes(spec.out, str(job.job_id))
    written_once(spec.out)
    # every FSDP step gathers node2's half of the weights from node1 and back: megabytes over node2's only link
    assert crossed > 2e6, crossed
    print(f"\n[2 nodes] fine-tune: val_loss {result['val_loss']:.8f} (1 process {reference:.8f}), "
          f"{crossed / 1e6:.1f} MB through node2's link, {time.monotonic() - t0:.1f} s")


def test_a_two_node_study_survives_kill_9_of_the_orchestrator(two_nodes, reference, tmp_path):
    t0 = time.monotonic()
    study = f"two-node-{uuid.uuid4().hex[:6]}"
    config = study_yaml(tmp_path, study=study, algo="random", budget=3, parallel=1, executor="slurm", poll_s=0.3,
                        space=SAME_TRAINING, resources=TWO_NODES, trial=TRIAL)
    proc = orchestrator(tmp_path, "--config", config)
    journal = Journal(tmp_path / "runs" / study / "journal.jsonl")
    kill_when(proc, lambda: (s := journal.load()).finished and any(t.job.job_id for t in s.running), 600,
              "a finished trial and a running two-node job")
    running = {t.trial: t.job.job_id for t in journal.load().running if t.job.job_id}
    finish(orchestrator(tmp_path, "--study", study, "--resume"), 600)

    state = load_study(journal.path.parent)
    assert state.ended and len(state.finished) == 3, [(t.trial, t.status, t.reason) for t in state.finished]
    assert all(t.status == "ok" for t in state.finished), [(t.trial, t.reason) for t in state.finished]
    for trial, job_id in running.items():
        assert state.trials[trial].job.job_id == job_id, "a running job was resubmitted instead of re-attached"
    for t in state.trials.values():
        assert t.value == pytest.approx(reference, rel=1e-5)
        ranks_ran_on_both_nodes(t.out, t.job.job_id)
        written_once(t.out)
        assert json.loads((Path(t.out) / "result.json").read_text())["world_size"] == 2
    print(f"\n[2 nodes] study of 3 trials, killed and resumed: {time.monotonic() - t0:.1f} s")


def test_scontrol_requeue_of_a_two_node_trial_resumes_from_its_slices(two_nodes, reference, tmp_path):
    """SIGTERM reaches both ranks; each saves its slice of the last finished step; the study follows SLURM's
    requeue in a fresh job that resumes there. Steps last at least 0.5 s (LORA_HPO_MIN_STEP_S): the job is
    still training when the requeue lands."""
    t0 = time.monotonic()
    config = study_yaml(tmp_path, study="requeue-2n", algo="random", budget=1, parallel=1, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, resources=TWO_NODES, trial=TRIAL)
    proc = orchestrator(tmp_path, "--config", config, env={"LORA_HPO_MIN_STEP_S": "0.5"})
    journal = Journal(tmp_path / "runs" / "requeue-2n" / "journal.jsonl")
    first = wait_until(lambda: (t := journal.load().trials.get(0)) and t.job.job_id and steps_done(t.out) >= 3 and t,
                       600, "trial 0 three steps in", proc)
    wait_until(lambda: _requeue(first.job.job_id, first.out), 60, "a stop record after scontrol requeue", proc)
    finish(proc, 600)

    state = load_study(journal.path.parent)
    t = state.trials[0]
    assert t.status == "ok" and t.job.job_id != first.job.job_id, (t.status, t.reason)
    [retry] = [e for e in events(journal, "retry") if e["key"] == "0"]
    assert retry["kind"] == "requeued" and retry["job_id"] == first.job.job_id
    result = json.loads((Path(t.out) / "result.json").read_text())
    assert result["resumed_from_step"] >= 2, result["resumed_from_step"]
    assert t.value == pytest.approx(reference, rel=1e-5)
    ranks_ran_on_both_nodes(t.out, t.job.job_id)
    written_once(t.out)
    assert "RUNNING" not in sacct_history(first.job.job_id)[1:], "SLURM's requeued copy ran"
    print(f"\n[2 nodes] requeued (stop record {_stop(t.out, first.job.job_id)}), resumed from "
          f"{result['resumed_from_step']}: {time.monotonic() - t0:.1f} s")


def _stop(out, job_id):
    from jobs.contract import read_attempts
    return next((r for r in read_attempts(out) if r.get("event") == "stop" and r.get("job_id") == job_id), None)


def _requeue(job_id: str, out) -> bool:
    """scontrol requeue until it took (scontrol may answer 'try again later' though it acted): a stop record, or
    accounting's record of the requeue."""
    if _stop(out, job_id) or "REQUEUED" in sacct_history(job_id):
        return True
    subprocess.run(["scontrol", "requeue", job_id], capture_output=True)
    return False


def test_a_node_that_dies_mid_trial_is_retried_and_never_hangs(two_nodes, reference, tmp_path):
    """node2 loses power (every process in its namespace SIGKILLed: slurmd, step, rank 1). Rank 0's collective
    fails at once (connection reset) and its job ends; SLURM marks node2 DOWN after SlurmdTimeout (20 s) and
    the job NODE_FAIL; the study retries it (retries.on: [node_fail]) once node2 is back, from the last
    complete checkpoint."""
    t0 = time.monotonic()
    config = study_yaml(tmp_path, study="nodefail-2n", algo="random", budget=1, parallel=1, executor="slurm",
                        poll_s=0.3, space=SAME_TRAINING, resources=TWO_NODES, trial=TRIAL,
                        retries={"max_retries": 1, "on": ["node_fail"]})
    proc = orchestrator(tmp_path, "--config", config, env={"LORA_HPO_MIN_STEP_S": "0.5"})
    journal = Journal(tmp_path / "runs" / "nodefail-2n" / "journal.jsonl")
    first = wait_until(lambda: (t := journal.load().trials.get(0)) and t.job.job_id and steps_done(t.out) >= 5 and t,
                       600, "trial 0 past its step-4 checkpoint", proc)
    killed = cluster("kill-node", "node2")
    assert killed.returncode == 0, killed.stderr
    t_kill = time.monotonic()
    try:
        wait_until(lambda: "NODE_FAIL" in sacct_history(first.job.job_id), 120, "NODE_FAIL in accounting", proc)
        t_fail = time.monotonic()
    finally:
        restarted = cluster("start")  # power back on: its slurmd registers and the node returns to service
        assert restarted.returncode == 0, restarted.stderr
    finish(proc, 600)

    state = load_study(journal.path.parent)
    t = state.trials[0]
    assert t.status == "ok", t.reason
    [retry] = [e for e in events(journal, "retry") if e["key"] == "0"]
    assert retry["kind"] == "node_fail" and retry["job_id"] == first.job.job_id != t.job.job_id
    result = json.loads((Path(t.out) / "result.json").read_text())
    assert result["resumed_from_step"] >= 4, result["resumed_from_step"]
    assert t.value == pytest.approx(reference, rel=1e-5)
    ranks_ran_on_both_nodes(t.out, t.job.job_id)
    written_once(t.out)
    print(f"\n[2 nodes] node2 killed {t_kill - t0:.1f} s in; NODE_FAIL in accounting {t_fail - t_kill:.1f} s later; "
          f"retried from step {result['resumed_from_step']}; {time.monotonic() - t0:.1f} s in all")


def test_the_cluster_script_refuses_bad_node_arguments(two_nodes):
    bad = cluster("start", "--nodes", "two")
    assert bad.returncode != 0 and "--nodes must be a whole number" in bad.stderr
    unknown = cluster("kill-node", "node9")
    assert unknown.returncode != 0 and "one of node1 node2" in unknown.stderr
