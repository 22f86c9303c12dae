"""The dispatch seam (slurm/dispatch.py) on real local and debug executors: outcomes, causes, recovery, cancel.

    .venv/bin/python -m pytest -q tests/test_dispatch.py

SLURM states are covered on the dev cluster (tests/test_slurm_*.py); here the same Dispatcher drives local
processes, so that a job's death is real (os._exit, SIGKILL, sys.exit) and its cause must be read back.
"""
import time

import pytest

from jobs.contract import read_attempts
from jobs.entry import ObjectiveTrial
from slurm.backend import make_backend
from slurm.dispatch import Dispatcher, RetryPolicy, Task
from slurm.executors import Resources

pytestmark = pytest.mark.timeout(120)
POINT = {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-4}


def dispatcher(tmp_path, kind="local", record=None):
    return Dispatcher(make_backend(kind, tmp_path / "submitit", Resources(timeout_min=5), job_name="t"), record=record)


def task(key, how=None, target="tests.objectives:dies", folder=None):
    point = {**POINT, **({"how": how} if how else {})}
    return Task(key, ObjectiveTrial(), (target, point, str(folder) if folder else None),
                folder=str(folder) if folder else None)


def settle(d, attempts, timeout_s=60):
    """Poll until every attempt is settled; returns {key: outcome} (waits for events, not for time)."""
    done, deadline = {}, time.monotonic() + timeout_s
    while len(done) < len(attempts):
        for a, outcome in d.poll([a for a in attempts if a.task.key not in done]):
            done[a.task.key] = outcome
        assert time.monotonic() < deadline, f"not settled: {[a.task.key for a in attempts if a.task.key not in done]}"
        time.sleep(0.05)
    return done


@pytest.mark.parametrize("how, cause", [
    ("os_exit", "exit code 3"),
    ("sigkill", "killed by SIGKILL"),
    ("sys_exit", "exit code 2"),
])
def test_a_local_job_that_dies_without_a_result_says_how(tmp_path, how, cause):
    d = dispatcher(tmp_path)
    [a] = d.submit([task("0", how)])
    while a.job.alive():  # the event: the process is gone
        time.sleep(0.05)
    settled = d.poll([a])  # one poll settles it: no wait for a result file that will never come
    assert len(settled) == 1, "a dead job with no result must settle at once"
    outcome = settled[0][1]
    assert not outcome.ok and cause in outcome.reason, outcome.reason
    assert "about to die" in outcome.reason  # the last line the job wrote to stderr


def test_results_and_raised_errors(tmp_path):
    d = dispatcher(tmp_path)
    outcomes = settle(d, d.submit([task("ok"), task("bad", "raise")]))
    assert outcomes["ok"].ok and outcomes["ok"].result.value is not None
    bad = outcomes["bad"]  # ObjectiveTrial turns the objective's exception into a failed result
    assert not bad.ok and bad.state == "FINISHED" and "ValueError: boom" in bad.reason


def test_intent_is_recorded_before_submission_and_ids_after(tmp_path):
    events = []
    d = dispatcher(tmp_path, "debug", record=lambda event, **data: events.append((event, data)))
    attempts = d.submit([task("1"), task("2")])
    assert [e for e, _ in events] == ["dispatch", "submitted"]
    dispatch, submitted = events[0][1], events[1][1]
    assert dispatch["keys"] == ["1", "2"] and dispatch["attempts"] == {"1": 0, "2": 0}
    assert submitted["batch"] == dispatch["batch"]
    assert submitted["jobs"] == {a.task.key: a.job_id for a in attempts}
    assert all(o.ok for o in settle(d, attempts).values())


def test_recover_finds_local_jobs_a_crash_left_unjournaled(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_HPO_TEST_GATE", str(tmp_path / "gate"))
    d = dispatcher(tmp_path)
    tasks = [task(str(k), target="tests.objectives:waits_for_file") for k in range(2)]
    tasks[1].args = (tasks[1].args[0], {**POINT, "r": 16}, None)
    jobs = [d.backend.executor.submit(t.fn, *t.args) for t in tasks]  # submitted, then the "crash": nothing recorded
    fresh = dispatcher(tmp_path)  # the next orchestrator process
    assert fresh.recover("lost-batch", tasks) == {"0": jobs[0].job_id, "1": jobs[1].job_id}
    (tmp_path / "gate").touch()
    attempts = [fresh.reattach(t, j.job_id) for t, j in zip(tasks, jobs)]
    assert all(o.ok for o in settle(fresh, attempts).values())


def test_cancel_stops_the_job_which_records_why(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_HPO_TEST_GATE", str(tmp_path / "never"))
    folder = tmp_path / "trial"
    d = dispatcher(tmp_path)
    [a] = d.submit([task("0", target="tests.objectives:waits_for_file", folder=folder)])
    deadline = time.monotonic() + 60
    while not any(r.get("event") == "start" for r in read_attempts(folder)):  # the job is running
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d.cancel(a)
    outcome = settle(d, [a])["0"]
    assert not outcome.ok and "SIGTERM" in outcome.reason and "cancelled" in outcome.reason
    stops = [r for r in read_attempts(folder) if r.get("event") == "stop"]
    assert stops and stops[-1]["signal"] == "SIGTERM" and stops[-1]["job_id"] == a.job_id
    assert not (folder / "result.json").exists(), "a stopped attempt writes no result"


def test_retry_policy_bounds():
    policy = RetryPolicy(max_retries=1, on=("node_fail",), max_attempts=3, max_hours=2)
    assert policy.allows("node_fail", retries_used=0, attempts=1)
    assert not policy.allows("node_fail", retries_used=1, attempts=2)     # max_retries spent
    assert not policy.allows("timeout", retries_used=0, attempts=1)       # not asked for
    assert policy.allows("preempted", retries_used=5, attempts=2, follow=True)  # SLURM's requeues are followed...
    assert not policy.allows("requeued", retries_used=0, attempts=3, follow=True)  # ...up to max_attempts
    assert not policy.allows("node_fail", retries_used=0, attempts=1, hours=2.5)
    assert not policy.allows(None, retries_used=0, attempts=1)
    with pytest.raises(ValueError, match="retries.on.*submission, node_fail, preempted, timeout"):
        RetryPolicy(on=("oom",))
    with pytest.raises(ValueError, match="unknown key 'max_retry'"):
        RetryPolicy.from_dict({"max_retry": 2})
    import yaml
    assert RetryPolicy.from_dict(yaml.safe_load("{on: [timeout], max_retries: 1}")).on == ("timeout",)


# ------------------------------------------------------------------------------------------- SLURM states
# States this machine's dev cluster cannot produce on demand (BOOT_FAIL, DEADLINE, a cgroup OUT_OF_MEMORY) and
# the races between sacct and squeue are replayed here with fake sacct/squeue/scancel commands (a stand-in,
# named as such); the dev cluster's tests (tests/test_slurm_production.py) produce the others for real.
def fake_slurm(tmp_path, monkeypatch, records, squeue=""):
    import os
    import stat
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    sacct = "".join(f"echo '77|{state}|{code}|vm'\n" for state, code in records)
    for name, body in {"sacct": sacct, "squeue": f"echo '{squeue}'" if squeue else "true",
                       "scancel": f'echo "$@" >> {tmp_path}/scancelled', "srun": "true", "sbatch": "true"}.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def watched_job(tmp_path, monkeypatch, records, squeue=""):
    """A Dispatcher following SLURM job 77 as the fake sacct/squeue describe it: (dispatcher, attempt)."""
    fake_slurm(tmp_path, monkeypatch, records, squeue)
    d = Dispatcher(make_backend("slurm", tmp_path / "submitit", Resources(), job_name="t", result_grace_s=0))
    return d, d.reattach(Task("0", print, ()), "77")


@pytest.mark.parametrize("records, squeue, retry, follow, says", [
    ([("BOOT_FAIL", "0:0")], "", "node_fail", False, "state BOOT_FAIL"),
    ([("NODE_FAIL", "0:0")], "", "node_fail", False, "state NODE_FAIL"),
    ([("DEADLINE", "0:0")], "", "timeout", False, "state DEADLINE"),
    ([("TIMEOUT", "0:15")], "", "timeout", False, "killed by SIGTERM"),
    ([("OUT_OF_MEMORY", "0:125")], "", None, False, "out of memory"),
    ([("FAILED", "0:9")], "", None, False, "killed by SIGKILL"),
    ([("CANCELLED", "0:15")], "", None, False, "state CANCELLED"),
    ([("PREEMPTED", "0:15")], "", "preempted", False, "state PREEMPTED"),  # PreemptMode=CANCEL: final
    ([("PREEMPTED", "0:15"), ("PENDING", "0:0")], "77|PENDING|BeginTime|", "preempted", True, "after PREEMPTED"),
    ([("REQUEUED", "0:0"), ("PENDING", "0:0")], "77|PENDING|job requeued in held state|", "requeued", True,
     "after REQUEUED"),
    ([("NODE_FAIL", "0:0"), ("PENDING", "0:0")], "77|PENDING|BeginTime|", "node_fail", False, "after NODE_FAIL"),
])
def test_every_final_and_requeued_slurm_state_settles(tmp_path, monkeypatch, records, squeue, retry, follow, says):
    import submitit
    d, a = watched_job(tmp_path, monkeypatch, records, squeue)
    [(attempt, outcome)] = d.poll([a])
    assert not outcome.ok and outcome.retry == retry and outcome.follow == follow
    assert says in outcome.reason, outcome.reason
    cancelled = (tmp_path / "scancelled").read_text() if (tmp_path / "scancelled").exists() else ""
    if follow or records[-1][0] not in ("COMPLETED", "FAILED", "CANCELLED"):
        assert "77" in cancelled, "a job SLURM could run again must be cancelled"
    assert isinstance(a.job, submitit.SlurmJob)


def test_pending_and_running_slurm_jobs_are_not_settled_and_say_why_they_wait(tmp_path, monkeypatch):
    d, a = watched_job(tmp_path, monkeypatch, [("PENDING", "0:0")], "77|PENDING|Resources|")
    assert d.poll([a]) == [] and a.pending and a.reason == "Resources"
    fake_slurm(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    assert d.poll([a]) == [] and not a.pending and a.ran and a.node == "vm"
    # sacct is 1-2 s late: the job ended, squeue no longer holds it live, sacct still says RUNNING
    fake_slurm(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|COMPLETED|None|vm")
    assert d.poll([a]) == []


def test_a_requeue_waits_for_accounting_to_say_why(tmp_path, monkeypatch):
    """squeue shows the job requeued (PENDING after it ran) before sacct records the NODE_FAIL: the copy is
    cancelled at once, the outcome waits for the cause (a node failure counts against the policy)."""
    d, a = watched_job(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    assert d.poll([a]) == [] and a.ran
    fake_slurm(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|PENDING|BeginTime|")  # sacct lags
    assert d.poll([a]) == [], "settled before accounting said why"
    assert "77" in (tmp_path / "scancelled").read_text(), "SLURM's requeued copy was not cancelled at once"
    fake_slurm(tmp_path, monkeypatch, [("NODE_FAIL", "0:0"), ("CANCELLED", "0:0")], "77|CANCELLED|None|")
    [(_, outcome)] = d.poll([a])
    assert outcome.retry == "node_fail" and not outcome.follow and "after NODE_FAIL" in outcome.reason


def test_a_requeue_whose_cause_never_shows_is_settled_as_requeued(tmp_path, monkeypatch):
    monkeypatch.setattr("slurm.cluster.REQUEUE_CAUSE_WAIT_S", 0.0)
    d, a = watched_job(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    d.poll([a])
    fake_slurm(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|PENDING|BeginTime|")
    [(_, outcome)] = d.poll([a])
    assert outcome.retry == "requeued" and outcome.follow and "after REQUEUED" in outcome.reason


def test_a_controller_that_does_not_answer_changes_no_state(tmp_path, monkeypatch):
    """sacct and squeue fail (a busy controller): a running job stays RUNNING; it is neither read as PENDING
    (which would look like a requeue and cancel it) nor settled."""
    d, a = watched_job(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    d.poll([a])
    for name in ("sacct", "squeue"):
        (tmp_path / "fakebin" / name).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Socket timed out' >&2\nexit 1\n")
    assert d.poll([a]) == [] and a.state == "RUNNING"
    assert not (tmp_path / "scancelled").exists(), "a running job was cancelled on a poll that learnt nothing"


def test_a_second_signal_during_the_save_does_not_abort_it(tmp_path):
    """SLURM may signal a job twice (batch and job step; a cancellation, then the preemption): the second
    SIGTERM arrives while the first one's checkpoint is being written. The save completes and one stop is
    recorded, saved (deterministic: the save itself sends the second signal half-way)."""
    import subprocess
    import sys

    from .conftest import REPO
    script = (
        "import os, signal, sys, time\n"
        "from jobs.entry import stop_on_signals\n"
        "def save():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # the second signal, half-way through the save\n"
        "    time.sleep(0.2)\n"
        f"    open(r'{tmp_path}/saved', 'w').write('7')\n"
        "    return 7\n"
        f"with stop_on_signals(r'{tmp_path}/trial', save=save):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "SUBMITIT_DEBUG_JOB_ID"}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 128 + 15, done.stderr
    assert (tmp_path / "saved").read_text() == "7", "the checkpoint was aborted"
    stops = [r for r in read_attempts(tmp_path / "trial") if r["event"] == "stop"]
    assert len(stops) == 1 and stops[0]["saved"] and stops[0]["step"] == 7, stops
    assert "while stopping on SIGTERM: the save goes on" in done.stderr


def test_a_job_that_ran_and_that_no_command_names_yet_is_not_read_as_requeued(tmp_path, monkeypatch):
    """It ran, then ended before accounting recorded it, and squeue no longer names it: a lag, not a requeue
    (it was read as PENDING after RUNNING, i.e. requeued, and its finished job cancelled)."""
    d, a = watched_job(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    assert d.poll([a]) == [] and a.ran
    fake_slurm(tmp_path, monkeypatch, [], "")
    assert d.poll([a]) == [] and a.state == "RUNNING"
    assert not (tmp_path / "scancelled").exists(), "a job that ran was cancelled as if requeued"


def test_a_cancelled_job_whose_start_accounting_has_not_recorded_is_not_read_as_requeued(tmp_path, monkeypatch):
    """It ran (squeue said RUNNING) and was cancelled; squeue now names it CANCELLED, and slurmdbd, behind on a
    busy controller, still holds its submission record only (PENDING). That is a lag: the attempt settles as
    CANCELLED once accounting catches up, never as 'requeued by SLURM' (the CI flake of stop 17)."""
    d, a = watched_job(tmp_path, monkeypatch, [("PENDING", "0:0")], "77|RUNNING|None|vm")
    assert d.poll([a]) == [] and a.ran
    d.cancel(a)
    fake_slurm(tmp_path, monkeypatch, [("PENDING", "0:0")], "77|CANCELLED|None|vm")
    assert d.poll([a]) == [] and a.state == "RUNNING" and a.requeued_since is None
    fake_slurm(tmp_path, monkeypatch, [("CANCELLED", "0:15")], "77|CANCELLED|None|vm")
    [(_, outcome)] = d.poll([a])
    assert outcome.state == "CANCELLED" and outcome.retry is None and not outcome.follow
    assert "CANCELLED" in outcome.reason and "requeued" not in outcome.reason, outcome.reason


def test_a_requeue_that_squeue_does_not_show_is_still_seen_in_accounting(tmp_path, monkeypatch):
    """squeue does not answer; sacct -D holds the run's record and the requeued one: a requeue, followed."""
    monkeypatch.setattr("slurm.cluster.REQUEUE_CAUSE_WAIT_S", 0.0)
    d, a = watched_job(tmp_path, monkeypatch, [("RUNNING", "0:0")], "77|RUNNING|None|vm")
    assert d.poll([a]) == [] and a.ran
    fake_slurm(tmp_path, monkeypatch, [("PREEMPTED", "0:15"), ("PENDING", "0:0")], "")
    [(_, outcome)] = d.poll([a])
    assert outcome.retry == "preempted" and outcome.follow and "after PREEMPTED" in outcome.reason
