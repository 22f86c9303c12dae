"""Damage is a one-line message with the fix, exit 2, and nothing appended after it; a torn last line is cut off
before anything is appended; an empty lock is taken over at once.

    .venv/bin/python -m pytest -q tests/test_damage.py          # unit tier (studies on the debug executor,
                                                               # MLflow: the in-memory fake)
"""
import errno
import json
import os
import shutil
import time

import pytest

from orchestrator.__main__ import main
from orchestrator.jsonl import Appender, DamagedFile, read_records
from orchestrator.study.journal import Journal, JournalError
from orchestrator.study.lock import StudyLock

from .fakes import fake_mlflow

pytestmark = pytest.mark.unit
URI = "memory://damage"


def study_args(tmp_path, *extra, budget=2):
    return ["--study", "s", "--algo", "random", "--budget", str(budget), "--executor", "debug", "--poll", "0.05",
            "--objective", "tests.objectives:landscape", "--workdir", str(tmp_path), "--tracking-uri", URI, *extra]


@pytest.fixture(scope="module")
def a_finished_study(tmp_path_factory):
    """One finished study (debug executor), made once; each test damages its own copy."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as monkeypatch, fake_mlflow(monkeypatch):
        assert main(study_args(root)) == 0
    return root


@pytest.fixture
def finished(a_finished_study, tmp_path, monkeypatch):
    shutil.copytree(a_finished_study, tmp_path, dirs_exist_ok=True)
    with fake_mlflow(monkeypatch) as store:
        yield tmp_path / "s" / "journal.jsonl", store


def one_line_error(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_torn_last_line_never_happened_and_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"event": "a"}\n{"event": "b", "tr')
    assert [r["event"] for r in read_records(path)] == ["a"]
    with Appender(path) as f:
        f.write({"event": "c"})
    assert path.read_bytes() == b'{"event": "a"}\n{"event": "c"}\n'


@pytest.mark.parametrize("damage, where", [
    (lambda lines: lines[:1] + [b"garbage"] + lines[1:], ":2 is not a JSON record"),
    (lambda lines: lines + [b"garbage"], "is not a JSON record"),   # a whole bad last line is damage, not torn
    (lambda lines: lines + [b"[1, 2]"], "is not a JSON record"),
])
def test_a_damaged_journal_is_one_line_and_gets_no_append(finished, capsys, damage, where):
    journal, _ = finished
    lines = journal.read_bytes().splitlines()
    journal.write_bytes(b"\n".join(damage(lines)) + b"\n")
    before = journal.read_bytes()
    assert main(study_args(journal.parent.parent, "--resume", budget=3)) == 2
    one_line_error(capsys, where, "restore the journal from a backup")
    assert journal.read_bytes() == before, "something was appended to a damaged journal"


@pytest.mark.parametrize("record, says", [
    ({"event": "result", "trial": 99, "status": "ok", "value": 1.0}, "names an unknown trial or job 99"),
    ({"event": "trial", "trial": 7}, "lacks 'point'"),
    ({"event": "retry", "key": "42"}, "unknown trial or job '42'"),
])
def test_a_wrong_record_is_one_line_naming_it(finished, capsys, record, says):
    journal, _ = finished
    with open(journal, "a") as f:
        f.write(json.dumps(record) + "\n")
    assert main(study_args(journal.parent.parent, "--resume", budget=3)) == 2
    one_line_error(capsys, says, "the journal is damaged")


def test_a_damaged_outbox_is_one_line_with_the_honest_fix(finished, capsys):
    journal, _ = finished
    outbox = journal.with_name("mlflow-outbox.jsonl")
    outbox.write_bytes(outbox.read_bytes() + b"\x00\x01 not json\n")
    assert main(study_args(journal.parent.parent, "--resume", budget=3)) == 2
    one_line_error(capsys, "mlflow-outbox.jsonl", "queued MLflow writes are lost")


def test_a_damaged_warm_start_source_is_one_line(finished, capsys, monkeypatch):
    journal, _ = finished
    with open(journal, "a") as f:
        f.write(json.dumps({"event": "result", "trial": 99, "status": "ok"}) + "\n")
    with fake_mlflow(monkeypatch):
        assert main(study_args(journal.parent.parent, "--study", "s2", "--warm-start", "s")) == 2
    one_line_error(capsys, "warm_start")
    assert not (journal.parent.parent / "s2" / "journal.jsonl").exists()


@pytest.mark.parametrize("content, says", [(b"\x89PNG\r\n\x1a\n\x00\x00binary", "is not a text file"),
                                           (b"budget: [1,\n", "invalid YAML at line")])
def test_a_config_that_is_not_a_yaml_text_is_one_line(tmp_path, capsys, content, says):
    (tmp_path / "c.yaml").write_bytes(content)
    assert main(["--config", str(tmp_path / "c.yaml"), "--workdir", str(tmp_path)]) == 2
    one_line_error(capsys, says)


def test_a_bad_flag_value_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--budget", "ten"])
    assert e.value.code == 2
    one_line_error(capsys, "--budget", "invalid int value")


def test_a_full_disk_is_one_line_and_the_study_resumes(tmp_path, monkeypatch, capsys):
    original = Appender.write
    calls = {"n": 0}

    def full_after_the_third_record(self, record, sync=True):
        calls["n"] += 1
        if calls["n"] > 3 and "event" in record:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        original(self, record, sync)

    with fake_mlflow(monkeypatch):
        monkeypatch.setattr(Appender, "write", full_after_the_third_record)
        assert main(study_args(tmp_path, budget=3)) == 2
        one_line_error(capsys, "the disk is full", "--resume")
        monkeypatch.setattr(Appender, "write", original)
        assert main(study_args(tmp_path, "--resume", budget=3)) == 0
    state = Journal(tmp_path / "s" / "journal.jsonl").load()
    assert state.ended and len(state.finished) == 3


def test_an_empty_lock_left_by_a_crash_is_taken_over_at_once(tmp_path):
    lock = tmp_path / "study.lock"
    lock.write_text("")
    old = time.time() - 60
    os.utime(lock, (old, old))
    with StudyLock(lock, what="study 's'") as held:
        assert held.held and json.loads(lock.read_text())["pid"] == os.getpid()


def test_an_empty_lock_being_written_is_waited_for_not_reported_as_pid_unknown(tmp_path):
    from orchestrator.study.lock import LockError
    lock = tmp_path / "study.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "start": None,
                                "time": time.time()}))  # held by a live process (this one)
    with pytest.raises(LockError, match=f"already run by pid {os.getpid()}"):
        StudyLock(lock, what="study 's'").acquire()


def test_journal_error_is_a_damaged_file():
    assert issubclass(JournalError, DamagedFile)
