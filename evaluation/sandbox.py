"""Run untrusted generated code (HumanEval completions) without letting it touch the evaluator or the host.

    python -m evaluation --tasks humaneval --canonical            # the real solutions: 164/164 pass
    python -m evaluation.sandbox                                  # print which isolation this host gives

`run_program(code)` runs one program; `run_many(programs)` runs them in parallel with a thread pool (each
thread only waits on its own subprocess). Per program:
  - a fresh subprocess (`python -I -S -B`: no site, no user paths, no bytecode written), never this process;
  - a throwaway folder as its cwd, HOME and TMPDIR, removed afterwards; a cleaned environment; stdin closed;
    stdout/stderr into unnamed files outside that folder, capped by the file size limit;
  - limits set in the child (evaluation/_sandbox_child.py): RLIMIT_CPU, RLIMIT_AS (memory), RLIMIT_FSIZE,
    RLIMIT_NPROC (no new processes), RLIMIT_NOFILE, no core files;
  - network: a fresh, empty network namespace (`unshare --net`) when this host allows it (root, or user
    namespaces), else only the socket guard below (`isolation()` says which);
  - as root: the child drops to the unprivileged `nobody` user after loading the usual stdlib modules, so
    the kernel enforces the process limit and the file permissions;
  - a Python audit hook: no writes outside the folder, no process creation, no signals, no sockets, no ctypes;
    with it, the functions InstructEval's reliability_guard sets to None are None here too;
  - a wall-time budget (InstructEval: 3 s) raised inside the program, and past budget + grace the whole
    process group is killed (it is also killed after a normal exit, to reap strays);
  - a verdict the program cannot fake: "passed" needs exit status 0 and, as the last line of its output, a
    per-run secret that reaches the child through a pipe (never its arguments, environment or a file) and is
    held by a keeper thread that writes it only once the program has returned normally; an always-on audit
    hook (the seal) keeps the program away from that thread, from /proc (its own memory, its parent's), from
    gc walks, tracing and ctypes (evaluation/_sandbox_child.py lists the routes, tests/sandbox_attacks.py
    tries each).
The program itself runs as InstructEval's harness runs it (`exec(program, {})`: `__name__` is not "__main__";
stdout and stderr swallowed, stdin raising on read), so what changes a verdict there changes it here.
The hook is a Python-level guard: it stops accidents and the usual attacks, not a determined native-code
escape; when not run as root (no privilege drop) the user's own files are protected by that guard only.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

CHILD = Path(__file__).with_name("_sandbox_child.py")
GRACE_S = 2.0  # interpreter start-up and teardown on a loaded node, on top of the program's budget
TAIL = 2000  # characters of stderr kept as the failure detail


@dataclass
class Limits:
    timeout_s: float = 3.0  # wall time of the program itself (the reference's timeout)
    # Address space. InstructEval sets no limit, so a program that passes there must not fail here for memory.
    # Within its 3 s a program can fill only so much: in the sandbox the fastest ways (bytearray(n), bytes *
    # n, [0] * n) wrote at most 0.6 GiB/s on a 2-core server (bench/sandbox_memory.py), and 2.1 GiB/s in a warm
    # process outside it, so 3 s fill 1.8 to 6.4 GiB: 16 GiB is 2.5x the most seen. Above it only untouched
    # reservations (bytes(20 << 30)) fail, which pass there only where the kernel's overcommit allows them:
    # no HumanEval solution needs one.
    memory_bytes: int = 16 << 30
    fsize_bytes: int = 16 << 20  # largest file it may write (its stdout and stderr included)
    nproc: int = 1  # processes of its user: 1 means it cannot fork


@dataclass
class Outcome:
    passed: bool
    status: str  # passed, failed, timeout, memory, blocked, crashed
    detail: str  # the exception line or how it ended
    seconds: float


@lru_cache(maxsize=None)
def isolation() -> dict:
    """The layers this host gives: "netns" (empty network namespace), "nobody" (privilege drop, as root),
    "guard" (the audit hook, always), with the command prefix that enters the namespace."""
    prefix = None
    if shutil.which("unshare"):
        cand = ["unshare", "--net", "--"] if os.geteuid() == 0 else ["unshare", "--user", "--net", "--"]
        try:
            ok = subprocess.run([*cand, "true"], stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
            prefix = cand if ok.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    layers = ["netns"] * bool(prefix) + ["nobody"] * (os.geteuid() == 0) + ["guard"]
    return {"layers": layers, "network": "netns" if prefix else "guard", "prefix": prefix or [],
            "user": "nobody" if "nobody" in layers else "invoking user"}


def _nobody() -> tuple[int, int]:
    import pwd
    try:
        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        return 65534, 65534


def run_program(code: str, limits: Limits | None = None, layers=None) -> Outcome:
    """Run `code` as a program in the sandbox; passed means it ended normally within the limits. `layers`
    (default: all this host has) picks among "netns", "nobody" and "guard" - tests use it to check each."""
    limits = limits or Limits()
    iso = isolation()
    layers = set(iso["layers"] if layers is None else layers) & set(iso["layers"])
    folder = Path(tempfile.mkdtemp(prefix="sandbox-"))
    secret = secrets.token_hex(16)  # the pass marker: only in this process and, in the child, in its keeper
    verdict_fd, filler = os.pipe()
    t0 = time.monotonic()
    try:
        os.write(filler, secret.encode())
        os.close(filler)  # the keeper reads up to the end of the pipe
        (folder / "program.py").write_text(code)
        cfg = {"program": "program.py", "verdict_fd": verdict_fd, "timeout_s": limits.timeout_s,
               "cpu_s": int(limits.timeout_s) + 1, "memory_bytes": limits.memory_bytes,
               "fsize_bytes": limits.fsize_bytes, "nproc": limits.nproc, "guard": "guard" in layers,
               "uid": None, "gid": None}
        if "nobody" in layers:
            cfg["uid"], cfg["gid"] = _nobody()
            for path in (folder, folder / "program.py"):
                os.chown(path, cfg["uid"], cfg["gid"])
        prefix = iso["prefix"] if "netns" in layers else []
        cmd = [*prefix, sys.executable, "-I", "-S", "-B", "-c", CHILD.read_text(), json.dumps(cfg)]
        rc, timed_out, out, err = _execute(cmd, folder, limits.timeout_s + GRACE_S, verdict_fd)
        return _classify(rc, timed_out, out, err, secret, time.monotonic() - t0)
    finally:
        os.close(verdict_fd)
        shutil.rmtree(folder, ignore_errors=True)


def _execute(cmd, folder: Path, deadline_s: float, verdict_fd: int) -> tuple[int, bool, str, str]:
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(folder), "TMPDIR": str(folder)}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True, pass_fds=(verdict_fd,))
        timed_out = False
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)
            proc.wait()
        return proc.returncode, timed_out, _tail(out), _tail(err)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - TAIL))
    return f.read().decode(errors="replace")


def _classify(rc: int, timed_out: bool, out: str, err: str, secret: str, seconds: float) -> Outcome:
    last = (err.strip().splitlines() or [""])[-1][:300]
    if timed_out:
        return Outcome(False, "timeout", "killed after the wall-time budget", seconds)
    if rc == 0 and out.rstrip().endswith(secret):
        return Outcome(True, "passed", "", seconds)
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        status = {"SIGXCPU": "timeout", "SIGXFSZ": "blocked"}.get(name, "crashed")
        return Outcome(False, status, f"killed by {name}", seconds)
    if rc == 0:
        return Outcome(False, "failed", "exited before its tests finished", seconds)
    status = ("timeout" if last.startswith("TimeoutError") else "memory" if last.startswith("MemoryError")
              else "blocked" if "sandbox:" in last else "failed")
    return Outcome(False, status, last or f"exit code {rc}", seconds)


def run_many(programs: list[str], timeout: float = 3.0, workers: int | None = None,
             limits: Limits | None = None) -> list[Outcome]:
    """Outcomes in the order of `programs`, run `workers` at a time (default: the CPU count, at most 8)."""
    limits = limits or Limits(timeout_s=timeout)
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda code: run_program(code, limits), programs))


if __name__ == "__main__":
    print(json.dumps({k: v for k, v in isolation().items() if k != "prefix"}))
