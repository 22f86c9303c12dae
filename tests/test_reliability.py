"""One study has one orchestrator, every fault is a one-line message, nothing runs twice (issue: Reliability).

    .venv/bin/python -m pytest -q tests/test_reliability.py

Real components throughout: orchestrator processes, the local and debug executors, a SQLite MLflow store.
Concurrency is made deterministic by holding what must overlap (a running study is frozen, a job waits for a
gate file), never by sleeping and hoping.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking_store import StoreError, ensure_local_store
from orchestrator.__main__ import main
from orchestrator.config import load_config
from orchestrator.study.journal import Journal
from orchestrator.study.lock import LockError, StudyLock
from orchestrator.study.loop import run_study

from .conftest import REPO, orchestrator_process

pytestmark = pytest.mark.timeout(300)


def uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def cli(tmp_path, *args):
    return ["--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path), *args]


def orchestrator(tmp_path, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "orchestrator", *cli(tmp_path, *args)], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def synthetic(tmp_path, **kw):
    kw = {"study": "s", "algo": "random", "budget": 4, "parallel": 2, "executor": "debug", "poll_s": 0.05,
          "objective": "tests.objectives:landscape", "workdir": str(tmp_path / "runs"), "tracking_uri": uri(tmp_path),
          **kw}
    return load_config(None, **kw)


def quiet():
    return open(os.devnull, "w")


# ------------------------------------------------------------------------------------------- the study lock
def test_a_second_orchestrator_on_the_same_study_is_refused_naming_the_holder(tmp_path):
    gate = tmp_path / "gate"
    env = {"LORA_HPO_TEST_GATE": str(gate)}
    args = ["--study", "once", "--algo", "random", "--budget", "2", "--parallel", "1", "--executor", "local",
            "--objective", "tests.objectives:waits_for_file", "--poll", "0.1"]
    first = orchestrator(tmp_path, *args, env=env)
    journal = Journal(tmp_path / "runs" / "once" / "journal.jsonl")
    deadline = time.monotonic() + 120
    while not (journal.exists() and any(t.job.job_id for t in journal.load().running)):  # running, holding the lock
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.poll() else ""
        time.sleep(0.1)
    second = orchestrator(tmp_path, "--study", "once", "--resume", env=env)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out
    line = out.strip().splitlines()[-1]
    assert f"pid {first.pid} on {socket.gethostname()}" in line and "already run" in line, out
    gate.touch()
    assert first.wait(timeout=120) == 0
    state = journal.load()
    assert state.ended and len(state.finished) == 2
    assert sum(1 for r in journal.records() if r["event"] == "end") == 1


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    path = tmp_path / "study.lock"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1", "time": 0}))
    with StudyLock(path, what="study x") as lock:
        assert lock.held and json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockError, match=f"pid {os.getpid()}"):
            StudyLock(path, what="study x").acquire()
    assert not path.exists()


def test_a_lock_from_another_host_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    path = tmp_path / "study.lock"
    path.write_text(json.dumps({"host": "login-elsewhere", "pid": 1, "time": time.time()}))
    with pytest.raises(LockError, match="login-elsewhere"):
        StudyLock(path, what="study x", stale_after_s=600).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    StudyLock(path, what="study x", stale_after_s=600).acquire().release()


def test_two_default_studies_started_together_get_two_names(tmp_path):
    args = ["--algo", "random", "--budget", "1", "--executor", "local", "--poll", "0.1",
            "--objective", "tests.objectives:landscape"]
    procs = [orchestrator(tmp_path, *args) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    studies = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert studies == ["tiny-random", "tiny-random-2"]
    assert any("this one is 'tiny-random-2'" in out for out in outs)


# ------------------------------------------------------------------------------------------- the journal
def test_a_torn_last_line_is_cut_before_the_next_append(tmp_path):
    journal = Journal(tmp_path / "journal.jsonl")
    journal.append("start", config={})
    with open(journal.path, "ab") as f:
        f.write(b'{"event": "trial", "tri')  # a write cut short by a full disk or a kill
    assert [r["event"] for r in journal.records()] == ["start"]
    journal.append("end")
    assert [r["event"] for r in journal.records()] == ["start", "end"]
    assert journal.path.read_text().count("\n") == 2


def test_a_crash_between_submitting_and_journaling_runs_nothing_twice(tmp_path, monkeypatch):
    """The journal has the batch's intent but no job ids: the next run finds the jobs instead of resubmitting."""
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("LORA_HPO_TEST_MARKS", str(marks))
    cfg = synthetic(tmp_path, executor="local", budget=6, parallel=3, algo="random", poll_s=0.1)
    real_append = Journal.append

    def die_after_submitting(self, event, **data):
        if event == "submitted" and not getattr(die_after_submitting, "done", False):
            die_after_submitting.done = True
            raise KeyboardInterrupt  # the orchestrator dies with the jobs out and their ids unjournaled
        return real_append(self, event, **data)

    monkeypatch.setattr(Journal, "append", die_after_submitting)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, out=quiet())
    monkeypatch.setattr(Journal, "append", real_append)
    before = Journal(cfg.folder / "journal.jsonl").load()
    assert before.running and all(t.job.batch and not t.job.job_id for t in before.running)
    state = run_study(cfg, resume=True, out=quiet())
    assert state.ended and len(state.finished) == 6 and all(t.status == "ok" for t in state.finished)
    assert len(list(marks.iterdir())) == 6, "an evaluation ran twice (or was lost)"


# ------------------------------------------------------------------------------------------- subcommands
def test_status_and_register_work_in_every_state(tmp_path, capsys):
    cfg = synthetic(tmp_path, algo="random", budget=5, objective="tests.objectives:flaky", seed=3)
    state = run_study(cfg, out=quiet())
    assert any(t.status == "failed" for t in state.finished)
    journal = Journal(cfg.folder / "journal.jsonl")
    journal.append("trial", trial=99, point=state.trials[0].point, encoded=None, out=str(tmp_path / "x"))
    assert main(["status", "--study", "s", "--workdir", cfg.workdir]) == 0  # a running and a failed trial
    out = capsys.readouterr().out
    assert "FAILED" in out and "being submitted" in out and "champion: trial" in out


def test_register_is_idempotent_and_a_finished_resume_changes_nothing(tmp_path, capsys):
    cfg = synthetic(tmp_path, algo="random", budget=2)
    state = run_study(cfg, out=quiet())
    assert main(["register", "--study", "s", "--workdir", cfg.workdir]) == 2  # an objective study: no adapter
    assert "no adapter to register" in capsys.readouterr().err
    ends = sum(1 for r in Journal(cfg.folder / "journal.jsonl").records() if r["event"] == "end")
    assert main(cli(tmp_path, "--study", "s", "--resume")) == 0
    out = capsys.readouterr().out
    assert "has finished already" in out and "nothing else to do" in out
    records = list(Journal(cfg.folder / "journal.jsonl").records())
    assert sum(1 for r in records if r["event"] == "end") == ends == 1
    client = MlflowClient(uri(tmp_path))
    assert client.get_run(state.parent_run_id).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------- checked up front
def test_a_missing_objective_is_one_line_and_submits_nothing(tmp_path, capsys):
    code = main(cli(tmp_path, "--study", "nope", "--objective", "tests.no_such_module:f", "--executor", "local"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "tests.no_such_module" in err[0] and "nothing was submitted" in err[0]
    assert not (tmp_path / "runs" / "nope").exists()


def test_a_study_whose_every_evaluation_fails_exits_1(tmp_path, capsys):
    code = main(cli(tmp_path, "--study", "doomed", "--algo", "random", "--budget", "3", "--executor", "debug",
                    "--objective", "tests.objectives:always_fails", "--poll", "0.05"))
    state = Journal(tmp_path / "runs" / "doomed" / "journal.jsonl").load()
    assert len(state.finished) == 3 and all(t.status == "failed" for t in state.finished)
    assert code == 1 and "every evaluation of study 'doomed' failed" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["--tracking-uri", "sqlite:////proc/nope/mlflow.db"], "is not writable"),
    (["--tracking-uri", "nonsense"], "not one MLflow can use"),
    (["--tracking-uri", "http://127.0.0.1:9"], "no MLflow server answers"),
    (["--workdir", "{file}"], "is a file"),
    (["--config", "{bad_option}"], "searcher_options"),
    (["--config", "{bad_space}"], "space.r"),
    (["--config", "{bad_lr}"], "space.lr"),
    (["--config", "{bad_data}"], "training data"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, capsys, args, says):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    yamls = {"bad_option": "algo: tpe\nsearcher_options: {n_startup_job: 3}\n",
             "bad_space": "space:\n  r: {choice: [-4, 8], default: 8}\n  lr: {log: [1.0e-6, 1.0e-3], default: 1.0e-5}\n",
             "bad_lr": "space:\n  lr: {log: [1.0e-6, 10], default: 1.0e-5}\n",
             "bad_data": f"trial: {{data: {{sources: [{{name: {tmp_path}/missing.jsonl}}]}}}}\n"}
    for name, text in yamls.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    args = [a.format(file=a_file, **{k: tmp_path / f"{k}.yaml" for k in yamls}) for a in args]
    base = ["--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path), "--study", "bad",
            "--executor", "debug"]
    started = time.monotonic()
    code = main(base + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and says in err[0], err
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs" / "bad").exists()


def test_resume_refuses_a_changed_flag_and_names_what_may_change(tmp_path, capsys):
    cfg = synthetic(tmp_path, budget=2)
    run_study(cfg, out=quiet())
    assert main(cli(tmp_path, "--study", "s", "--resume", "--parallel", "4")) == 2
    err = capsys.readouterr().err
    assert "cannot change parallel" in err and "budget, poll_s" in err


# ------------------------------------------------------------------------------------------- the MLflow store
def test_a_half_made_store_without_runs_is_remade_and_one_with_runs_is_refused(tmp_path):
    import sqlite3

    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as c:  # what a kill during MLflow's table creation leaves
        c.execute("create table registered_model_tags (key text)")
    ensure_local_store(f"sqlite:///{db}")
    assert MlflowClient(f"sqlite:///{db}").search_experiments()  # whole now
    assert list(db.parent.glob("mlflow.db.broken-*"))
    with sqlite3.connect(db) as c:
        c.execute("delete from alembic_version")
        c.execute("insert into runs (run_uuid, experiment_id, lifecycle_stage) values ('r', 0, 'active')")
    with pytest.raises(StoreError, match="damaged.*holds runs"):
        ensure_local_store(f"sqlite:///{db}")


def test_concurrent_first_use_of_a_fresh_store_is_safe(tmp_path):
    script = ("import sys\nfrom jobs.tracking_store import ensure_local_store, client\n"
              "ensure_local_store(sys.argv[1]); client(sys.argv[1]).search_experiments(); print('ok')\n")
    store = uri(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", script, store], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 and "ok" in out for p, out in zip(procs, outs)), outs


# ------------------------------------------------------------------------------------------- the journal stays small
def test_a_huge_return_value_is_not_copied_into_the_journal(tmp_path):
    cfg = synthetic(tmp_path, budget=1, objective="tests.objectives:huge")
    run_study(cfg, out=quiet())
    assert (cfg.folder / "journal.jsonl").stat().st_size < 100_000


def test_one_progress_line_per_change_and_a_summary_that_says_where_things_are(tmp_path):
    import io
    out = io.StringIO()
    cfg = synthetic(tmp_path, budget=4)
    run_study(cfg, out=out)
    text = out.getvalue()
    status_lines = [line.split("]", 1)[1] for line in text.splitlines() if line.startswith("[")]
    assert len(status_lines) == len(set(status_lines)), "a status line was printed twice with nothing new"
    for where in ("study:", "MLflow:", "UI:", "plots:"):
        assert where in text


def test_a_reason_with_undecodable_bytes_prints_under_a_strict_utf8_locale(tmp_path):
    """A job's failure reason holding a lone surrogate (a file name with a byte that is not UTF-8) is printed in
    the progress line as an escape, never a UnicodeEncodeError mid-study, under a strict UTF-8 output (what
    en_US.UTF-8 gives print()); every trial is a failed trial and the study ends (exit 1: none succeeded)."""
    proc = orchestrator_process(tmp_path, "--study", "odd", "--algo", "random", "--budget", "2", "--executor",
                                "local", "--objective", "tests.objectives:undecodable_failure", "--poll", "0.1",
                                env={"PYTHONIOENCODING": "utf-8:strict"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "Traceback" not in out, out[-2000:]
    assert out.count("no such file: data-\\udcff.jsonl") == 2, out[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_stop_like_ctrl_c_even_when_sigint_is_ignored(tmp_path, sig):
    """A study started in the background (SIGINT ignored, as `cmd &` in a script or nohup leave it) and stopped by
    SIGTERM or SIGHUP exits 130 with the `--resume` line, its jobs going on; `--resume` then finishes it with
    every evaluation run once."""
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "LORA_HPO_TEST_GATE": str(gate), "LORA_HPO_TEST_MARKS": str(marks)}
    args = [sys.executable, "-m", "orchestrator", "--workdir", str(tmp_path / "runs"), "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db", "--study", "term", "--algo", "random", "--budget", "4", "--parallel",
            "2", "--executor", "local", "--objective", "tests.objectives:waits_for_file", "--poll", "0.1"]
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        journal = tmp_path / "runs" / "term" / "journal.jsonl"
        deadline = time.monotonic() + 300
        while not (journal.exists() and '"submitted"' in journal.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 130, (tmp_path / "out.txt").read_text()
    text = (tmp_path / "out.txt").read_text()
    assert "Traceback" not in text and "--resume" in text, text
    gate.touch()
    resumed = subprocess.run(args + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert len(list(marks.iterdir())) == 4
