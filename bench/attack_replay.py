"""Replay the reliability attack list against real orchestrator processes; print case | expected | got | PASS/FAIL.

    .venv/bin/python bench/attack_replay.py               # every case (a few minutes on 2 cores)
    .venv/bin/python bench/attack_replay.py -k kill       # the cases whose name contains "kill"

Each case runs in its own temporary folder with the local executor and the project's test objectives
(tests/objectives.py). Kills land at exact windows: the orchestrator runs under a small wrapper that SIGKILLs
its own process right after the N-th journal record of a given kind is written (or right before it), which is
where a real kill -9 or a power cut would leave things; then `--resume` must lose nothing and run nothing twice.
Exit status 1 if any case fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.cli.main import SUBCOMMANDS  # noqa: E402

# Runs the orchestrator's CLI, SIGKILLing itself at one journal window: KILL_AT = "<event>:<n>:<before|after>".
WRAPPER = """
import os, signal, sys
from orchestrator.study.journal import Journal
event, n, when = os.environ["KILL_AT"].split(":")
name = os.environ.get("KILL_JOURNAL", "journal.jsonl")
seen = {"n": 0}
real = Journal.append
def append(self, kind, **data):
    if kind == event and self.path.name == name:
        seen["n"] += 1
        if seen["n"] == int(n) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, kind, **data)
        if seen["n"] == int(n) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return
    real(self, kind, **data)
Journal.append = append
from orchestrator.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


class Case:
    def __init__(self, root: Path):
        self.root = root
        self.marks = root / "marks"
        self.marks.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "LORA_HPO_TEST_MARKS": str(self.marks), "PYTHONPATH": str(REPO)}

    def args(self, *args) -> list[str]:
        command = list(args[:1]) if args and args[0] in SUBCOMMANDS else []   # a subcommand comes first
        return [*command, "--workdir", str(self.root / "runs"), "--tracking-uri",
                f"sqlite:///{self.root}/mlruns/mlflow.db", *args[len(command):]]

    def run(self, *args, kill_at: str | None = None, env=None, timeout=300, journal: str | None = None
            ) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", WRAPPER] if kill_at else [sys.executable, "-m", "orchestrator"]
        environment = {**self.env, **(env or {}), **({"KILL_AT": kill_at} if kill_at else {}),
                       **({"KILL_JOURNAL": journal} if journal else {})}
        return subprocess.run(cmd + self.args(*args), cwd=REPO, env=environment, capture_output=True, text=True,
                              errors="replace", timeout=timeout)  # a reason may hold any byte

    def start(self, *args, env=None) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "orchestrator", *self.args(*args)], cwd=REPO,
                                env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")

    def journal(self, study: str):
        from orchestrator.study.journal import load_study
        return load_study(self.root / "runs" / study)

    def evaluations(self) -> int:
        return len(list(self.marks.iterdir()))

    def mlflow(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(f"sqlite:///{self.root}/mlruns/mlflow.db")


def study_args(study, algo="random", budget=6, parallel=2, objective="tests.objectives:slow_landscape"):
    return ["--study", study, "--algo", algo, "--budget", str(budget), "--parallel", str(parallel),
            "--executor", "local", "--objective", objective, "--poll", "0.1"]


def one_line_error(proc) -> bool:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in proc.stdout


# ------------------------------------------------------------------------------------------- the cases
def kill_window(event: str, n: int, when: str, algo: str = "random"):
    def case(c: Case):
        first = c.run(*study_args("k", algo), kill_at=f"{event}:{n}:{when}", env={"LORA_HPO_TEST_SLEEP": "0.5"})
        if first.returncode != -9:
            return f"the kill did not land (exit {first.returncode}): {first.stderr[-300:]}"
        resumed = c.run(*study_args("k", algo)[:2], "--resume", env={"LORA_HPO_TEST_SLEEP": "0.5"})
        state = c.journal("k")
        runs = c.mlflow().search_runs([c.mlflow().get_experiment_by_name("k").experiment_id], max_results=100)
        got = (f"exit {resumed.returncode}, {len(state.finished)} done, {c.evaluations()} evaluated, "
               f"{len(runs)} runs, {sum(r.data.tags.get('role') == 'study' for r in runs)} parent")
        ok = resumed.returncode == 0 and len(state.finished) == 6 and c.evaluations() == 6 and len(runs) == 7
        return None if ok else got
    return case


def concurrent_resume(c: Case):
    gate_env = {"LORA_HPO_TEST_GATE": str(c.root / "gate")}
    first = c.start(*study_args("twice", objective="tests.objectives:waits_for_file"), env=gate_env)
    journal = c.root / "runs" / "twice" / "journal.jsonl"
    deadline = time.time() + 120
    while not (journal.exists() and '"submitted"' in journal.read_text()):
        if time.time() > deadline or first.poll() is not None:
            return "the first orchestrator never started its jobs"
        time.sleep(0.1)
    second = c.run("--study", "twice", "--resume", env=gate_env)
    (c.root / "gate").touch()
    first.wait(timeout=180)
    state = c.journal("twice")
    if not (one_line_error(second) and f"pid {first.pid} on {socket.gethostname()}" in second.stderr):
        return f"second resume: exit {second.returncode}: {second.stderr.strip()[:200]}"
    return None if c.evaluations() == 6 and len(state.finished) == 6 else f"{c.evaluations()} evaluations"


def default_names_together(c: Case):
    args = ["--algo", "random", "--budget", "1", "--executor", "local", "--objective", "tests.objectives:landscape",
            "--poll", "0.1"]
    procs = [c.start(*args) for _ in range(2)]
    codes = [p.wait(timeout=180) for p in procs]
    names = sorted(p.name for p in (c.root / "runs").iterdir())
    return None if codes == [0, 0] and names == ["tiny-random", "tiny-random-2"] else f"exits {codes}, {names}"


def torn_journal(c: Case):
    first = c.run(*study_args("torn", budget=3), kill_at="result:2:after")
    with open(c.root / "runs" / "torn" / "journal.jsonl", "ab") as f:
        f.write(b'{"event": "result", "tri')
    resumed = c.run("--study", "torn", "--resume")
    status = subprocess.run([sys.executable, "-m", "orchestrator", "status", "--study", "torn", "--workdir",
                             str(c.root / "runs")], cwd=REPO, capture_output=True, text=True)
    ok = first.returncode == -9 and resumed.returncode == 0 and status.returncode == 0 and c.evaluations() == 3
    return None if ok else f"resume exit {resumed.returncode}, status exit {status.returncode}: {resumed.stderr[-200:]}"


def missing_objective(c: Case):
    proc = c.run(*study_args("nope", objective="no_such_package.module:f"))
    ok = one_line_error(proc) and not (c.root / "runs" / "nope").exists()
    return None if ok else f"exit {proc.returncode}: {proc.stderr.strip()[:200]}"


def all_failed(c: Case):
    proc = c.run(*study_args("doomed", objective="tests.objectives:always_fails", budget=3))
    return None if proc.returncode == 1 else f"exit {proc.returncode}"


def dies_without_result(how: str, says: str):
    def case(c: Case):
        (c.root / "space.yaml").write_text(f"space:\n  r: {{choice: [4, 8], default: 8}}\n  how: {{fixed: {how}}}\n")
        t0 = time.time()
        proc = c.run(*study_args("dead", budget=1, parallel=1, objective="tests.objectives:dies"),
                     "--config", str(c.root / "space.yaml"))
        reason = c.journal("dead").trials[0].reason or ""
        took = time.time() - t0
        return None if proc.returncode == 1 and says in reason and took < 60 else f"{took:.0f} s: {reason[:160]}"
    return case


def bad_input(*args, says: str):
    def case(c: Case):
        a_file = c.root / "a-file"
        a_file.write_text("x")
        args_ = [a.replace("{file}", str(a_file)).replace("{root}", str(c.root)) for a in args]
        t0 = time.time()
        proc = c.run("--study", "bad", "--executor", "local", *args_)
        ok = one_line_error(proc) and says in proc.stderr and not (c.root / "runs" / "bad").exists()
        return None if ok and time.time() - t0 < 60 else f"exit {proc.returncode}: {proc.stderr.strip()[:200]}"
    return case


def yaml_input(text: str, says: str):
    def case(c: Case):
        (c.root / "study.yaml").write_text(text.replace("{root}", str(c.root)))
        return bad_input("--config", str(c.root / "study.yaml"), says=says)(c)
    return case


def resume_changed_flag(c: Case):
    c.run(*study_args("flags", budget=2))
    proc = c.run("--study", "flags", "--resume", "--parallel", "4")
    return None if one_line_error(proc) and "cannot change parallel" in proc.stderr else proc.stderr[-200:]


def finished_resume_changes_nothing(c: Case):
    c.run(*study_args("done", budget=2))
    before = (c.root / "runs" / "done" / "journal.jsonl").read_text()
    proc = c.run("--study", "done", "--resume")
    after = (c.root / "runs" / "done" / "journal.jsonl").read_text()
    ok = proc.returncode == 0 and "finished already" in proc.stdout and before == after
    return None if ok else f"exit {proc.returncode}, journal changed: {before != after}"


def huge_return(c: Case):
    c.run(*study_args("huge", budget=1, parallel=1, objective="tests.objectives:huge"))
    size = (c.root / "runs" / "huge" / "journal.jsonl").stat().st_size
    return None if size < 100_000 else f"journal of {size} bytes"


def store_creation_killed(c: Case):
    script = "import sys\nfrom jobs.tracking_store import ensure_local_store\nensure_local_store(sys.argv[1])\n"
    store = f"sqlite:///{c.root}/mlruns/mlflow.db"
    for delay in (0.3, 0.6, 0.9, 1.2, 1.5):  # kills at different moments of the table creation
        p = subprocess.Popen([sys.executable, "-c", script, store], cwd=REPO)
        time.sleep(delay)
        p.kill()
        p.wait()
    proc = c.run(*study_args("after", budget=1, parallel=1, objective="tests.objectives:landscape"))
    return None if proc.returncode == 0 else proc.stderr[-300:]


def fresh_store_two_studies(c: Case):
    procs = [c.start(*study_args(f"s{k}", budget=2, objective="tests.objectives:landscape")) for k in range(2)]
    codes = [p.wait(timeout=180) for p in procs]
    return None if codes == [0, 0] else f"exits {codes}: {[p.stdout.read()[-200:] for p in procs]}"


# ------------------------------------------------------------------------------------------- Reliability (2)
def mlflow_runs(c: Case, study: str) -> list:
    client = c.mlflow()
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


def refused_writes(objective: str, check):
    """A study whose trials make MLflow refuse a write: every run still ends with its status and values."""
    def case(c: Case):
        proc = c.run(*study_args("odd", budget=3, objective=objective))
        runs = [r for r in mlflow_runs(c, "odd") if r.data.tags.get("role") == "trial"]
        parent = [r for r in mlflow_runs(c, "odd") if r.data.tags.get("role") == "study"]
        return check(proc, runs, parent)
    return case


def _metric_renamed(proc, runs, parent):
    ok = proc.returncode == 0 and len(runs) == 3 and all(
        r.info.status == "FINISHED" and "val_loss" in r.data.metrics and r.data.metrics.get("dev.mmlu_5") == 0.3
        and "dev.mmlu@5" in r.data.tags.get("lora_hpo.metric_names", "") for r in runs)
    return None if ok and parent[0].info.status == "FINISHED" else \
        f"exit {proc.returncode}: {[(r.info.status, sorted(r.data.metrics)) for r in runs]}"


def _surrogate_written(proc, runs, parent):
    ok = proc.returncode == 1 and len(runs) == 3 and all(
        r.info.status == "FAILED" and "data-\ufffd.jsonl" in r.data.tags.get("failure_reason", "") for r in runs)
    return None if ok and parent and parent[0].info.status == "FINISHED" else \
        f"exit {proc.returncode}: {[(r.info.status, r.data.tags.get('failure_reason')) for r in runs]}"


def store_lost_between_kill_and_resume(how: str):
    def case(c: Case):
        first = c.run(*study_args("lost"), kill_at="result:3:after", env={"LORA_HPO_TEST_SLEEP": "0.5"})
        db = c.root / "mlruns" / "mlflow.db"
        if how == "deleted":
            db.unlink()
        else:  # restored from a backup taken before the study: an empty store of the same schema
            shutil.copy(db, c.root / "backup.db")
            client = c.mlflow()
            for r in mlflow_runs(c, "lost"):
                client.delete_run(r.info.run_id)
        resumed = c.run("--study", "lost", "--resume", env={"LORA_HPO_TEST_SLEEP": "0.5"})
        runs = mlflow_runs(c, "lost")
        live = [r for r in runs if r.info.lifecycle_stage == "active"]
        trials = [r for r in live if r.data.tags.get("role") == "trial"]
        ok = first.returncode == -9 and resumed.returncode == 0 and len(trials) == 6 and all(
            r.info.status == "FINISHED" and "val_loss" in r.data.metrics for r in trials) and \
            sum(r.data.tags.get("role") == "study" for r in live) == 1
        return None if ok else f"exit {resumed.returncode}: {len(trials)} trial runs, " \
                               f"{sum(r.data.tags.get('role') == 'study' for r in live)} parents: {resumed.stderr[-200:]}"
    return case


def journal_lost_outbox_kept(c: Case):
    c.run(*study_args("again", budget=2, objective="tests.objectives:landscape"))
    (c.root / "runs" / "again" / "journal.jsonl").unlink()  # the journal is gone, the outbox is still there
    proc = c.run(*study_args("again", budget=2, objective="tests.objectives:landscape"))
    runs = [r for r in mlflow_runs(c, "again") if r.data.tags.get("role") == "trial"]
    moved = list((c.root / "runs" / "again").glob("mlflow-outbox.*.jsonl"))
    ok = proc.returncode == 0 and len(runs) == 4 and moved and all("val_loss" in r.data.metrics for r in runs)
    return None if ok else f"exit {proc.returncode}: {len(runs)} trial runs, outbox moved: {moved}"


def paused_loser(c: Case):
    """Two starts of one new study: the loser is frozen right before it looks at the folder; it must delete
    nothing of the winner's, and a third process (--resume) must be refused while the winner runs."""
    gate = {"LORA_HPO_TEST_GATE": str(c.root / "gate")}
    winner = c.start(*study_args("race", objective="tests.objectives:waits_for_file"), env=gate)
    folder = c.root / "runs" / "race"
    deadline = time.time() + 120
    while not (folder / "journal.jsonl").exists():
        if time.time() > deadline or winner.poll() is not None:
            return "the winner never started"
        time.sleep(0.1)
    loser = c.run(*study_args("race", objective="tests.objectives:waits_for_file"), env=gate)
    third = c.run("--study", "race", "--resume", env=gate)
    intact = (folder / "study.lock").exists() and (folder / "code").is_dir()
    (c.root / "gate").touch()
    winner.wait(timeout=300)
    state = c.journal("race")
    ok = one_line_error(loser) and one_line_error(third) and intact and c.evaluations() == 6 and \
        len(state.finished) == 6 and sum(r["event"] == "end" for r in _records(folder)) == 1
    return None if ok else f"loser {loser.returncode} {loser.stderr[-120:]!r}, third {third.returncode}, intact " \
                           f"{intact}, {c.evaluations()} evaluations"


def _records(folder):
    from orchestrator.study.journal import Journal
    return list(Journal(folder / "journal.jsonl").records())


def damaged_journal(how: str, says: str):
    def case(c: Case):
        c.run(*study_args("dmg", budget=2, objective="tests.objectives:landscape"))
        path = c.root / "runs" / "dmg" / "journal.jsonl"
        lines = path.read_bytes().splitlines()
        damage = {"middle": lines[:2] + [b"#garbage#"] + lines[2:], "last": lines + [b"#garbage#"],
                  "unknown trial": lines + [b'{"event": "result", "trial": 77, "status": "ok"}'],
                  "missing field": lines + [b'{"event": "trial", "trial": 9}']}[how]
        path.write_bytes(b"\n".join(damage) + b"\n")
        before = path.read_bytes()
        proc = c.run("--study", "dmg", "--resume", "--budget", "4")
        ok = one_line_error(proc) and says in proc.stderr and path.read_bytes() == before
        return None if ok else f"exit {proc.returncode}: {proc.stderr.strip()[:200]}"
    return case


def damaged_outbox(c: Case):
    c.run(*study_args("ob", budget=2, objective="tests.objectives:landscape"))
    path = c.root / "runs" / "ob" / "mlflow-outbox.jsonl"
    path.write_bytes(path.read_bytes() + b"\x00\xff garbage\n")
    proc = c.run("--study", "ob", "--resume")
    return None if one_line_error(proc) and "queued MLflow writes are lost" in proc.stderr else proc.stderr[-200:]


def damaged_warm_source(c: Case):
    c.run(*study_args("w1", budget=2, objective="tests.objectives:landscape"))
    (c.root / "runs" / "w1" / "journal.jsonl").write_bytes(b"")  # empty: a study that never started
    proc = c.run(*study_args("w2", budget=2, objective="tests.objectives:landscape"), "--warm-start", "w1")
    ok = one_line_error(proc) and "warm_start" in proc.stderr and not (c.root / "runs" / "w2").exists()
    return None if ok else proc.stderr[-200:]


def debug_executor(objective: str, says: str):
    def case(c: Case):
        proc = c.run("--study", "dbg", "--algo", "random", "--budget", "2", "--executor", "debug", "--objective",
                     objective, "--poll", "0.1", "--config", str(_yaml(c, "resources: {timeout_min: 1}\n")),
                     timeout=600)
        state = c.journal("dbg")
        ok = proc.returncode == 1 and state.ended and all(says in (t.reason or "") for t in state.finished)
        return None if ok else f"exit {proc.returncode}, ended {state.ended}: {[t.reason for t in state.finished]}"
    return case


def _yaml(c: Case, text: str) -> Path:
    path = c.root / "extra.yaml"
    path.write_text(text)
    return path


def no_controller(c: Case):
    fake = c.root / "bin"
    fake.mkdir()
    for name in ("sbatch", "sinfo", "srun", "squeue", "sacct"):
        (fake / name).write_text("#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller "
                                 "(connect failure)' >&2\nexit 1\n")
        (fake / name).chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    proc = c.run("--study", "noctl", "--algo", "random", "--budget", "3", "--executor", "slurm", "--objective",
                 "tests.objectives:landscape", env=env)
    ok = one_line_error(proc) and "controller does not answer" in proc.stderr and c.evaluations() == 0
    return None if ok else f"exit {proc.returncode}: {proc.stderr.strip()[:300]}"


def terminated_like_ctrl_c(sig):
    def case(c: Case):
        gate = {"LORA_HPO_TEST_GATE": str(c.root / "gate")}
        log = open(c.root / "term.out", "w")   # a file, not a pipe: the jobs that go on hold their copy of it
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator",
                                 *c.args(*study_args("term", objective="tests.objectives:waits_for_file"))],
                                cwd=REPO, env={**c.env, **gate}, stdout=log, stderr=subprocess.STDOUT)
        journal = c.root / "runs" / "term" / "journal.jsonl"
        deadline = time.time() + 120
        while not (journal.exists() and '"submitted"' in journal.read_text()):
            if time.time() > deadline or proc.poll() is not None:
                return "it never started its jobs"
            time.sleep(0.1)
        proc.send_signal(sig)
        proc.wait(timeout=120)
        log.close()
        out = (c.root / "term.out").read_text(errors="replace")
        (c.root / "gate").touch()
        resumed = c.run("--study", "term", "--resume", env=gate)
        ok = proc.returncode == 130 and "--resume" in out and resumed.returncode == 0 and c.evaluations() == 6
        return None if ok else f"exit {proc.returncode}: {out[-200:]!r}; resume {resumed.returncode}"
    return case


def binary_config(c: Case):
    (c.root / "study.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    return bad_input("--config", str(c.root / "study.yaml"), says="not a text file")(c)


def unknown_scheme(uri: str):
    return bad_input("--tracking-uri", uri, says="not one MLflow can use" if "sqlite" not in uri else "sqlite:///")


def confirm_kill_window(event: str, when: str):
    """`confirm` killed at a journal window, then run again: every retrain has its MLflow run, FINISHED with its
    val_loss, and the confirm run ends FINISHED (a fine-tune study of the tiny model, two retrains)."""
    def case(c: Case):
        (c.root / "tiny.yaml").write_text("space:\n  r: {choice: [4, 8], default: 8}\n  alpha: {fixed: 16}\n"
                                          "  dropout: {fixed: 0.05}\n  lr: {fixed: 1.0e-3}\n"
                                          "trial: {max_steps: 6, log_every: 2, data: {total_rows: 200}}\n")
        study = c.run("--study", "conf", "--algo", "random", "--budget", "1", "--executor", "local", "--poll", "0.3",
                      "--config", str(c.root / "tiny.yaml"), timeout=900)
        if study.returncode != 0:
            return f"the study failed: {study.stderr[-300:]}"
        confirm = ["confirm", "--study", "conf", "--top", "1", "--seeds", "2", "--poll", "0.3"]
        first = c.run(*confirm, kill_at=f"{event}:1:{when}", journal="confirm.jsonl", timeout=900)
        again = c.run(*confirm, timeout=900)
        runs = mlflow_runs(c, "conf")
        retrains = [r for r in runs if r.data.tags.get("role") == "retrain"]
        confirms = [r for r in runs if r.data.tags.get("role") == "confirm"]
        ok = first.returncode == -9 and again.returncode == 0 and len(retrains) == 2 and all(
            r.info.status == "FINISHED" and "val_loss" in r.data.metrics for r in retrains) and \
            [r.info.status for r in confirms] == ["FINISHED"]
        return None if ok else (f"kill {first.returncode}, rerun {again.returncode}: "
                                f"{[(r.info.status, sorted(r.data.metrics)) for r in retrains]}, "
                                f"confirm {[r.info.status for r in confirms]}: {again.stderr[-200:]}")
    return case


RELIABILITY_2 = [
    ("confirm killed after a retrain is journaled", "its run created on the rerun",
     confirm_kill_window("retrain", "after")),
    ("confirm killed after a result is journaled", "its run FINISHED with val_loss",
     confirm_kill_window("result", "after")),
    ("a metric name MLflow refuses (dev.mmlu@5)", "renamed, mapping tagged, runs whole",
     refused_writes("tests.objectives:odd_metric", _metric_renamed)),
    ("a failure reason with a lone surrogate", "written (U+FFFD), nothing blocked",
     refused_writes("tests.objectives:undecodable_failure", _surrogate_written)),
    ("tracking URI htpp://host", "1 line, exit 2", unknown_scheme("htpp://127.0.0.1:5000")),
    ("tracking URI ftp://host", "1 line, exit 2", unknown_scheme("ftp://127.0.0.1/x")),
    ("tracking URI sqlite:/one/slash", "1 line, exit 2", unknown_scheme("sqlite:/tmp/x.db")),
    ("store deleted between kill and --resume", "6 trial runs + parent re-created",
     store_lost_between_kill_and_resume("deleted")),
    ("store restored from an older backup", "6 trial runs + parent re-created",
     store_lost_between_kill_and_resume("restored")),
    ("journal lost, outbox kept, study restarted", "old outbox moved aside, new runs", journal_lost_outbox_kept),
    ("two starts, the loser paused", "loser and --resume refused, winner intact", paused_loser),
    ("garbage line in the journal", "1 line, exit 2, nothing appended", damaged_journal("middle", "is not a JSON")),
    ("garbage last line in the journal", "1 line, exit 2, nothing appended", damaged_journal("last", "is not a JSON")),
    ("a result for an unknown trial", "1 line, exit 2", damaged_journal("unknown trial", "unknown trial")),
    ("a record with a missing field", "1 line, exit 2", damaged_journal("missing field", "lacks 'point'")),
    ("a damaged outbox", "1 line, exit 2, the honest fix", damaged_outbox),
    ("an empty warm-start journal", "1 line, exit 2, nothing made", damaged_warm_source),
    ("--config is a binary file", "1 line, exit 2", binary_config),
    ("no SLURM controller at all", "1 line, exit 2, nothing submitted", no_controller),
    ("debug executor: sys.exit(0)", "failed trials, the study ends", debug_executor(
        "tests.objectives:calls_exit", "sys.exit(0)")),
    ("debug executor: KeyboardInterrupt raised", "failed trials", debug_executor(
        "tests.objectives:raises_interrupt", "KeyboardInterrupt")),
    ("debug executor: endless loop", "failed after timeout_min", debug_executor(
        "tests.objectives:loops_forever", "time limit")),
    ("SIGTERM to the orchestrator", "exit 130, resume line; resume finishes", terminated_like_ctrl_c(15)),
    ("SIGHUP to the orchestrator", "exit 130, resume line; resume finishes", terminated_like_ctrl_c(1)),
]


CASES = [  # (case, expected, check): check returns None when it behaves as expected, else what it saw
    ("two --resume at once", "2nd refused naming pid+host; 6 evaluations", concurrent_resume),
    ("two default-named starts at once", "two studies, two names", default_names_together),
    ("kill -9 after a trial is journaled", "resume: 6 evaluated once, 1 parent", kill_window("trial", 3, "after")),
    ("kill -9 between batch intent and job ids", "jobs found, none run twice", kill_window("submitted", 2, "before")),
    ("kill -9 after the job ids are journaled", "jobs re-attached", kill_window("submitted", 2, "after")),
    ("kill -9 after a result is journaled", "resume: nothing lost or twice", kill_window("result", 3, "after")),
    ("kill -9 after the study started", "one parent run", kill_window("start", 1, "after")),
    ("kill -9 before the end record", "resume finishes once", kill_window("end", 1, "before")),
    ("kill -9 mid-study (tpe)", "resume: nothing lost or twice", kill_window("result", 2, "after", algo="tpe")),
    ("kill -9 mid-study (nomad)", "resume: nothing lost or twice", kill_window("result", 2, "after", algo="nomad")),
    ("torn last journal line", "resume and status work", torn_journal),
    ("missing objective module", "1 line, exit 2, nothing made", missing_objective),
    ("every evaluation fails", "exit 1", all_failed),
    ("job calls os._exit(3)", "failed: 'exit code 3', fast", dies_without_result("os_exit", "exit code 3")),
    ("job killed by SIGKILL (OOM killer)", "failed: 'SIGKILL', fast", dies_without_result("sigkill", "SIGKILL")),
    ("job calls sys.exit(2)", "failed: 'exit code 2', fast", dies_without_result("sys_exit", "exit code 2")),
    ("unwritable tracking store", "1 line, exit 2", bad_input("--tracking-uri", "sqlite:////proc/x/mlflow.db",
                                                            says="is not writable")),
    ("malformed tracking URI", "1 line, exit 2", bad_input("--tracking-uri", "nonsense", says="not one MLflow")),
    ("tracking server down", "1 line, exit 2, < 60 s", bad_input("--tracking-uri", "http://127.0.0.1:9",
                                                               says="no MLflow server answers")),
    ("--workdir is a file", "1 line, exit 2", bad_input("--workdir", "{file}", says="is a file")),
    ("unknown searcher option", "1 line, exit 2",
     yaml_input("algo: tpe\nsearcher_options: {n_startup_job: 3}\n", "searcher_options")),
    ("negative rank in the space", "1 line, exit 2", yaml_input("space:\n  r: {choice: [-4, 8], default: 8}\n",
                                                               "space.r")),
    ("dropout 2.0 in the space", "1 line, exit 2",
     yaml_input("space:\n  dropout: {choice: [0, 2.0], default: 0}\n", "space.dropout")),
    ("learning rate up to 10", "1 line, exit 2", yaml_input("space:\n  lr: {log: [1.0e-6, 10], default: 1.0e-5}\n",
                                                           "space.lr")),
    ("missing data file", "1 line, exit 2",
     yaml_input("trial: {data: {sources: [{name: {root}/missing.jsonl}]}}\n", "training data")),
    ("--resume with a changed flag", "refused, names budget/poll", resume_changed_flag),
    ("--resume of a finished study", "says so, journal unchanged", finished_resume_changes_nothing),
    ("50 MB objective return value", "journal < 100 kB", huge_return),
    ("kills during MLflow store creation", "next study works", store_creation_killed),
    ("two studies on a fresh store", "both work", fresh_store_two_studies),
] + RELIABILITY_2


# =========================================================================================== issue 20: security
# The sandbox's routes to a faked pass (tests/sandbox_attacks.py) and the lab server's secrets and accounts. The
# server cases share one `server start --auth` in a temporary folder (started by the first of them, stopped at
# exit); they need root (PostgreSQL runs as the postgres account) and the `server` extra.
def sandbox_attack(body: str, layers):
    def case(c: Case):
        from evaluation.sandbox import Limits, run_program
        from tests.sandbox_attacks import program

        out = run_program(program(body), Limits(timeout_s=3.0), layers=layers)
        return None if not out.passed else "the program faked a pass"
    return case


_LAB: dict = {}


def _server(folder: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", "server", "--dir", str(folder), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _lab() -> dict:
    """The shared server: {folder, url, admin password}; started once."""
    if not _LAB:
        import atexit
        import configparser

        folder = Path(tempfile.mkdtemp(prefix="attack-lab-", dir="/var/tmp"))
        folder.chmod(0o755)  # PostgreSQL (the postgres account) must enter it
        atexit.register(lambda: (_server(folder, "stop", timeout=120), shutil.rmtree(folder, ignore_errors=True)))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        started = _server(folder, "start", "--auth", "--port", str(port))
        if started.returncode != 0:
            raise RuntimeError(f"server start failed: {started.stderr.strip()[-300:]}")
        ini = configparser.ConfigParser()
        ini.read(folder / "auth" / "basic_auth.ini")
        _LAB.update(folder=folder, url=started.stdout.splitlines()[0], admin=ini["mlflow"]["admin_password"])
    return _LAB


def _login(lab: dict, user: str, password: str) -> int:
    import requests

    return requests.get(f"{lab['url']}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        auth=(user, password), timeout=60).status_code


def postgres_account_reads_users(c: Case):
    from orchestrator.tracking.postgres import PORT

    lab = _lab()
    psql = shutil.which("psql") or "psql"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGPASS")}
    proc = subprocess.run(["runuser", "-u", "postgres", "--", psql, "-w", "-h", str(lab["folder"] / "pg" / "run"),
                           "-p", str(PORT), "-U", "mlflow", "-d", "mlflow_auth", "-Atc",
                           "SELECT username, password_hash FROM users"], capture_output=True, text=True, env=env,
                          cwd="/", timeout=60)
    return None if proc.returncode != 0 and "admin" not in proc.stdout else f"it read: {proc.stdout[:80]!r}"


def bad_login(name: str, password: str | None, says: str):
    def case(c: Case):
        import requests

        lab = _lab()
        proc = _server(lab["folder"], "add-user", name, *(["--password", password] if password else []), timeout=120)
        lines = proc.stderr.strip().splitlines()
        got = requests.get(f"{lab['url']}/api/2.0/mlflow/users/get", params={"username": name},
                           auth=("admin", lab["admin"]), timeout=60).status_code
        ok = proc.returncode == 2 and len(lines) == 1 and says in lines[0] and got == 404
        return None if ok else f"exit {proc.returncode}, user lookup HTTP {got}: {proc.stderr.strip()[:160]}"
    return case


def password_guessing(c: Case):
    import secrets

    from orchestrator.tracking.server_auth import MAX_FAILURES

    lab = _lab()
    password = secrets.token_urlsafe(18)
    if _server(lab["folder"], "add-user", "victim", "--password", password, timeout=120).returncode != 0:
        return "could not create the user"
    codes = [_login(lab, "victim", f"guess-{i:04d}") for i in range(3 * MAX_FAILURES)]
    right, other = _login(lab, "victim", password), _login(lab, "admin", lab["admin"])
    ok = codes == [401] * MAX_FAILURES + [429] * (2 * MAX_FAILURES) and right == 429 and other == 200
    return None if ok else f"codes {sorted(set(codes))}, first 429 at {codes.index(429) if 429 in codes else None}, " \
                           f"right password {right}, another user {other}"


def backend_password(c: Case):
    import secrets

    from orchestrator.tracking.postgres import PORT, Postgres

    lab = _lab()
    password = "pw-" + secrets.token_hex(12)
    connection = Postgres(lab["folder"] / "pg", lab["folder"] / "log" / "postgres.log")._connect()
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE attack_backend LOGIN PASSWORD '{password}'")
        cursor.execute("CREATE DATABASE attack_backend OWNER attack_backend")
    connection.close()
    folder = Path(tempfile.mkdtemp(prefix="attack-backend-", dir="/var/tmp")) / "fresh"
    uri = (f"postgresql+psycopg2://attack_backend:{password}@/attack_backend?host={lab['folder'] / 'pg' / 'run'}"
           f"&port={PORT}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        started = _server(folder, "start", "--port", str(port), "--backend-uri", uri)
        if started.returncode != 0:
            return f"start: exit {started.returncode}: {started.stderr.strip()[-200:]}"
        holders = [p for p in folder.rglob("*") if p.is_file() and password.encode() in p.read_bytes()]
        pid = int((folder / "run" / "mlflow.pid").read_text())
        group = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _pgrp(d) == pid]
        on_cmdline = [d.name for d in group if password.encode() in (d / "cmdline").read_bytes()]
        private = all(p.stat().st_mode & 0o077 == 0 and p.parent.stat().st_mode & 0o077 == 0 for p in holders)
        ok = len(holders) == 1 and private and not on_cmdline and len(group) >= 2
        return None if ok else f"in files {[str(p.relative_to(folder)) for p in holders]}, on command lines " \
                               f"of {on_cmdline}"
    finally:
        _server(folder, "stop", timeout=120)
        shutil.rmtree(folder.parent, ignore_errors=True)


def _pgrp(proc_dir: Path) -> int | None:
    try:
        return int((proc_dir / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _security_cases() -> list:
    from tests.sandbox_attacks import DESIGN, ROUTES

    cases = [(f"sandbox: marker via {name}", "fails, no pass", sandbox_attack(*ROUTES[name])) for name in ROUTES]
    cases += [(f"sandbox: {name}", "fails, no pass", sandbox_attack(*DESIGN[name])) for name in DESIGN]
    return cases + [
        ("server: postgres account reads users", "refused: password needed", postgres_account_reads_users),
        ("server: user name with ':'", "1 line, exit 2, none made", bad_login("a:b", None, "user name 'a:b'")),
        ("server: user name with a newline", "1 line, exit 2, none made", bad_login("a\nb", None, "user name")),
        ("server: 100 kB password", "1 line, exit 2, none made", bad_login("carol", "x" * 100_000, "12 to 128")),
        ("server: 30 wrong passwords", "429 after 10, right one too", password_guessing),
        ("server: --backend-uri password, fresh --dir", "starts; pw in one 0600 file", backend_password),
    ]


CASES += _security_cases()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="pattern", help="only the cases whose name contains this")
    p.add_argument("--keep", action="store_true", help="keep each case's folder (printed)")
    args = p.parse_args(argv)
    rows, failed = [], 0
    for name, expected, case in CASES:
        if args.pattern and args.pattern not in name:
            continue
        root = Path(tempfile.mkdtemp(prefix="attack-"))
        t0 = time.time()
        try:
            problem = case(Case(root))
        except Exception as e:  # noqa: BLE001 - a case that crashes is a failure, reported, not a stop
            problem = f"{type(e).__name__}: {e}"
        failed += problem is not None
        rows.append((name, expected, problem or expected, "PASS" if problem is None else "FAIL",
                     f"{time.time() - t0:.0f}s"))
        print(f"{'PASS' if problem is None else 'FAIL'}  {name}" + (f": {problem}" if problem else ""), flush=True)
        if args.keep:
            print(f"      kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    w = [max(len(r[i]) for r in rows) for i in range(2)]
    print(f"\n| {'case':{w[0]}s} | {'expected':{w[1]}s} | got | result | time |")
    for name, expected, got, result, took in rows:
        print(f"| {name:{w[0]}s} | {expected:{w[1]}s} | {got} | {result} | {took} |")
    print(f"\n{len(rows) - failed}/{len(rows)} PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
