"""The one trial runner (orchestrator/study/runner.py) on a scripted backend: intent journaled, retries by the
policy, the reason a failure was not retried, adoption after a restart, one fold for every journal.

    .venv/bin/python -m pytest -q tests/test_runner.py          # unit tier: no process, no store, no scheduler
"""
import pytest

from jobs.contract import TrialResult
from orchestrator.study.journal import Job, Journal
from orchestrator.study.runner import Item, Runner, fold_items
from slurm.dispatch import Dispatcher, RetryPolicy, Task

from .fakes import ScriptedBackend

pytestmark = pytest.mark.unit


def runner(tmp_path, script, policy=RetryPolicy(), **kw):
    backend = ScriptedBackend(script)
    journal = Journal(tmp_path / "jobs.jsonl")
    r = Runner(Dispatcher(backend, record=journal.append), journal, policy,
               task_of=lambda job: Task(job.key, print, (), attempt=job.attempt), log=lambda *a: None, **kw)
    return r, backend, journal


def drain(r):
    done = []
    for _ in range(50):
        done += r.poll()
        if not r.live:
            return {job.key: outcome for job, _, outcome in done}
    raise AssertionError("the runner did not settle")


def test_a_node_failure_is_retried_and_the_retry_is_journaled_first(tmp_path):
    r, backend, journal = runner(tmp_path, {"a": ["NODE_FAIL", "COMPLETED"], "b": ["COMPLETED"]})
    jobs = {k: Job(k) for k in ("a", "b")}
    r.submit(list(jobs.values()))
    out = drain(r)
    assert out["a"].ok and out["b"].ok and backend.submitted == ["a", "b", "a"]
    events = [(rec["event"], rec.get("key") or rec.get("keys")) for rec in journal.records()]
    assert events == [("dispatch", ["a", "b"]), ("submitted", None), ("retry", "a"), ("dispatch", ["a"]),
                      ("submitted", None)]
    assert jobs["a"].attempt == 1 and jobs["a"].retries == 1 and jobs["a"].history[0]["kind"] == "node_fail"


def test_a_failure_that_is_not_retried_says_why_not(tmp_path):
    policy = RetryPolicy(max_retries=1, on=("node_fail",))
    r, _, _ = runner(tmp_path, {"a": ["NODE_FAIL", "NODE_FAIL"], "b": ["TIMEOUT"]}, policy)
    r.submit([Job("a"), Job("b")])
    out = drain(r)
    assert not out["a"].ok and "not retried: no retry left (retries.max_retries=1)" in out["a"].reason
    assert not out["b"].ok and "not retried: 'timeout' is not in retries.on" in out["b"].reason


def test_a_requeue_slurm_decided_is_followed_whatever_retries_on_says(tmp_path):
    class Requeued(ScriptedBackend):
        def ended(self, a):
            from slurm.dispatch import Outcome
            if a.job.state == "REQUEUED":
                return Outcome(TrialResult.failed("requeued by SLURM"), "PENDING", retry="preempted", follow=True)
            return a.job.state

    backend = Requeued({"a": ["REQUEUED", "REQUEUED", "COMPLETED"]})
    journal = Journal(tmp_path / "j.jsonl")
    r = Runner(Dispatcher(backend, record=journal.append), journal, RetryPolicy(max_retries=0, on=()),
               task_of=lambda job: Task(job.key, print, (), attempt=job.attempt))
    job = Job("a")
    r.submit([job])
    assert drain(r)["a"].ok and job.attempt == 2 and job.retries == 0  # followed requeues spend no retry


def test_may_retry_keeps_a_pruned_trial_from_being_retried(tmp_path):
    r, _, _ = runner(tmp_path, {"a": ["NODE_FAIL"]}, may_retry=lambda job, outcome: False)
    r.submit([Job("a")])
    assert not drain(r)["a"].ok


def test_adopt_reattaches_journaled_jobs_and_submits_the_rest(tmp_path):
    r, backend, _ = runner(tmp_path, {"new": ["COMPLETED"]})
    running = Job("old", job_id="41")
    fresh = Job("new")
    r.adopt([running, fresh], {}, {"old": running, "new": fresh})
    assert backend.submitted == ["new"] and r.live["old"].attempt.job_id == "41"
    assert set(drain(r)) == {"old", "new"}


def test_one_fold_reads_items_jobs_and_results_back(tmp_path):
    r, _, journal = runner(tmp_path, {"k1": ["NODE_FAIL", "COMPLETED"]})
    journal.append("start", executor="scripted")
    journal.append("evaluation", key="k1", spec={"out": str(tmp_path / "k1")})
    r.submit([Job("k1")])
    for job, _, outcome in [(j, a, o) for j, a, o in r.poll()] + [(j, a, o) for j, a, o in r.poll()]:
        journal.append("result", key=job.key, status=outcome.result.status, value=outcome.result.value)
    s = fold_items(journal, "evaluation", lambda rec: TrialResult.from_dict({"status": rec["status"],
                                                                               "value": rec["value"]}))
    item = s.items["k1"]
    assert isinstance(item, Item) and s.executor == "scripted" and item.status == "ok"
    assert item.job.attempt == 1 and item.job.retries == 1 and item.job.job_id and item.result.value == 1.0


def test_a_scheduler_outage_defers_submission_without_failing(tmp_path, monkeypatch):
    class Down(ScriptedBackend):
        up = False

        def submit(self, tasks, name):
            if not self.up:
                raise RuntimeError("sbatch: error: unreachable controller")
            return super().submit(tasks, name)

    backend = Down({"a": ["COMPLETED"]})
    journal = Journal(tmp_path / "j.jsonl")
    r = Runner(Dispatcher(backend, record=journal.append), journal, RetryPolicy(),
               task_of=lambda job: Task(job.key, print, ()))
    r.submit([Job("a")])
    assert r.poll() == [] and "scheduler unreachable since" in r.outage()
    backend.up = True
    r.live["a"].attempt.job.retry_at = 0  # its pause is over
    assert [o.ok for o in drain(r).values()] == [True]
    assert r.outage() is None
