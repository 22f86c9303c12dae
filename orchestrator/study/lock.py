"""One process at a time per study: an exclusive lock file held for the whole run.

    with StudyLock(folder / "study.lock", what="study tiny-nomad"):   # LockError if another process holds it
        ...

The lock is a file created with O_CREAT|O_EXCL (atomic on local file systems and on NFS v3 and later), holding
the owner's host, pid, process start time and a heartbeat: the owner rewrites its modification time every
`heartbeat_s` seconds from a background thread. Nothing relies on flock (which some NFS mounts do not
provide). A lock is stale, and is taken over, when

- its owner ran on this host and that process is gone (its pid is dead, or now belongs to another process:
  the start time differs), or
- its owner ran on another host and its heartbeat is older than `stale_after_s` (default 10 minutes; a host
  cannot see another's processes, so only silence tells), or
- it is empty or unreadable and older than WRITE_GRACE_S (a crash between its creation and its first write;
  a younger one is being written and is looked at again).

Taking over is serialized by a second O_EXCL file (`<lock>.takeover`), so two processes that find the same
stale lock cannot both win; a takeover file left by a process killed mid-takeover is itself stale after 60 s.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from slurm.local import process_start_time


WRITE_GRACE_S = 5.0  # an empty or unreadable lock older than this was left by a crash: taken over at once


class LockError(RuntimeError):
    """Another live process holds the lock; the message names it and what to do."""


class StudyLock:
    def __init__(self, path: str | Path, what: str, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
        self.path = Path(path)
        self.what = what
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # ------------------------------------------------------------------------------------------- acquire
    def acquire(self) -> "StudyLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3 + int(WRITE_GRACE_S / 0.25)):
            if self._create():
                self.held = True
                self._thread = threading.Thread(target=self._beat, name="study-lock", daemon=True)
                self._thread.start()
                return self
            owner = self._owner()
            if owner is not None and owner.get("unreadable") and not self._stale(owner):
                time.sleep(0.25)  # its creator is writing it right now: look again
                continue
            if owner is not None and not self._stale(owner):
                raise LockError(f"{self.what} is already run by pid {owner.get('pid')} on {owner.get('host')} "
                                f"(since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('time', 0)))}); "
                                f"wait for it to end or stop it first (lock file {self.path})")
            self._take_over(owner)
        raise LockError(f"{self.what}: could not take the lock {self.path} (it keeps changing hands); try again")

    def _create(self) -> bool:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start_time(os.getpid()),
              "time": time.time()}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return True

    def _owner(self) -> dict | None:
        try:
            owner = json.loads(self.path.read_text())
            owner["beat"] = self.path.stat().st_mtime
            return owner
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError, TypeError):  # empty (being written, or a crash right after
            try:                                                   # its creation) or damaged: judged by its age
                return {"unreadable": True, "time": 0, "beat": self.path.stat().st_mtime}
            except FileNotFoundError:
                return None

    def _stale(self, owner: dict) -> bool:
        if owner.get("unreadable"):  # a live creator writes its lock within milliseconds of creating it
            return time.time() - owner.get("beat", 0) > WRITE_GRACE_S
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            start = process_start_time(owner["pid"])
            return start is None or (owner.get("start") is not None and start != owner["start"])
        return time.time() - owner.get("beat", 0) > self.stale_after_s

    def _take_over(self, seen: dict | None) -> None:
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return
        os.close(fd)
        try:
            now = self._owner()  # still the stale owner we judged? (another process may have taken it)
            if now is not None and seen is not None and \
                    (now.get("pid"), now.get("host"), now.get("time")) == (seen.get("pid"), seen.get("host"),
                                                                           seen.get("time")):
                self.path.unlink()
        finally:
            guard.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------- hold
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        owner = self._owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "StudyLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def locked(workdir: str, study: str, lock: str, what: str, run):
    """`run()` on an existing study under the lock `<workdir>/<study>/<lock>` (evaluate and confirm: one process
    per study and subcommand); a missing study or a held lock is a one-line ConfigError."""
    from orchestrator.config import ConfigError

    folder = Path(workdir) / study
    if not (folder / "journal.jsonl").exists():
        raise ConfigError(f"no study {study!r} under {workdir}: check the name and --workdir")
    try:
        with StudyLock(folder / lock, what=f"{what} of study {study!r}"):
            return run()
    except LockError as e:
        raise ConfigError(str(e)) from None
