"""The sandbox's child side: limits, privilege drop and guard, then the untrusted program (stdlib only).

Not imported by the evaluator: evaluation/sandbox.py passes this file's text to `python -I -S -B -c` with a
JSON configuration as the first argument, in the program's throwaway folder (the cwd). Steps, in order:
  1. resource limits (CPU seconds, address space, file size, process count, open files, no core files);
  2. when started as root: import the usual stdlib modules (PRELOAD: the interpreter's folder may be
     unreadable to the unprivileged user, as under /root), then drop to that user, so that the process-count
     limit applies and the file system's permissions protect the host;
  3. a Python audit hook that refuses writes outside the folder, process creation, signals to other
     processes, sockets, ctypes and raising limits (PEP 578; it cannot be removed once installed);
     With the guard, also what InstructEval's reliability_guard does (human_eval/execution.py): the same
     functions are set to None (os.getcwd, os.remove, exit, ...), so a program that calls one fails here as
     it fails there;
  4. an interval timer that raises TimeoutError after the wall-time budget;
  5. the program, run as InstructEval runs it: `exec(program, {})`, so `__name__` is not "__main__" (an
     `if __name__ == "__main__":` block does not run), with sys.stdout/sys.stderr swallowed and sys.stdin
     raising on read (its swallow_io). It passes only if it ends normally: a raised exception, sys.exit(),
     os._exit() or a signal all fail, because the pass marker (a per-run nonce) is written after it returns.
"""
import builtins
import faulthandler
import io
import json
import os
import resource
import shutil
import signal
import sys

PRELOAD = ("typing", "math", "cmath", "random", "copy", "string", "collections", "re", "hashlib", "itertools",
           "functools", "operator", "heapq", "bisect", "fractions", "decimal", "statistics", "datetime", "time",
           "json", "numbers", "dataclasses", "enum", "array", "textwrap", "unicodedata", "abc", "io", "calendar",
           "struct", "base64", "binascii", "zlib", "difflib", "pprint", "queue", "keyword", "ast", "contextlib",
           "weakref", "warnings", "types", "locale", "secrets", "zoneinfo", "fnmatch")
FORBIDDEN = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
             "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link",
             "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
             "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "resource.setrlimit",
             "resource.prlimit", "os.chown", "os.setxattr", "os.removexattr"}
NO_IMPORT = {"_posixsubprocess", "_ctypes"}  # process creation and native calls without an audit event
PATH_EVENTS = {  # event -> (indices of path arguments, indices of dir_fd arguments)
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
    "os.chmod": ((0,), (2,)), "shutil.rmtree": ((0,), (1,)), "shutil.copyfile": ((1,), ()),
    "shutil.copytree": ((1,), ()), "shutil.move": ((1,), ()),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
REFERENCE_NONE = {  # module -> attributes InstructEval's reliability_guard sets to None
    os: ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
         "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
         "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    shutil: ("rmtree", "move", "chown"),
    builtins: ("exit", "quit", "help"),
}
REFERENCE_NO_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")  # sys.modules[name] = None there


def set_limits(cfg):
    cpu = int(cfg["cpu_s"])
    for name, soft, hard in (("RLIMIT_CPU", cpu, cpu + 1), ("RLIMIT_AS", cfg["memory_bytes"], None),
                             ("RLIMIT_FSIZE", cfg["fsize_bytes"], None), ("RLIMIT_NPROC", cfg["nproc"], None),
                             ("RLIMIT_NOFILE", 64, None), ("RLIMIT_CORE", 0, None)):
        resource.setrlimit(getattr(resource, name), (soft, soft if hard is None else hard))


def drop_privileges(uid, gid):
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def like_the_reference():
    """What reliability_guard changes in the process that runs the program (subprocess.Popen too, but importing
    subprocess is refused here anyway: it needs _posixsubprocess)."""
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    for module, names in REFERENCE_NONE.items():
        for name in names:
            setattr(module, name, None)
    for name in REFERENCE_NO_MODULES:
        sys.modules[name] = None


class Swallowed(io.TextIOBase):
    """InstructEval's WriteOnlyStringIO, without keeping the text: writes vanish, reads raise OSError."""

    def writable(self):
        return True

    def write(self, text):
        return len(text)

    def readable(self):
        return False

    def read(self, *args, **kwargs):
        raise OSError("not readable")

    readline = read


def make_guard(root):
    getcwd, join, normpath = os.getcwd, os.path.join, os.path.normpath  # os.getcwd is None once the program runs

    def inside(path):
        if isinstance(path, int) or path is None:
            return True  # an already open descriptor was checked when it was opened
        path = normpath(join(getcwd(), os.fsdecode(path)))
        return path == root or path.startswith(root + os.sep)

    def guard(event, args):
        if event in FORBIDDEN:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in NO_IMPORT:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
            if writes and (mode is None or not inside(path)):  # os.open may write relative to a dir_fd
                raise PermissionError(f"sandbox: writing {path!r} outside the sandbox folder is not allowed")
        elif event in PATH_EVENTS:
            paths, dir_fds = PATH_EVENTS[event]
            bad_fd = any(i < len(args) and args[i] not in (None, -1) for i in dir_fds)
            if bad_fd or not all(inside(args[i]) for i in paths if i < len(args)):
                raise PermissionError(f"sandbox: {event} outside the sandbox folder is not allowed")
    return guard


def on_alarm(signum, frame):
    raise TimeoutError("timed out")


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    set_limits(cfg)
    if cfg.get("uid") is not None:
        drop_privileges(cfg["uid"], cfg["gid"])
    root = os.getcwd()
    nonce = cfg["nonce"]
    sys.argv = [cfg["program"]]
    code = compile(source, cfg["program"], "exec")
    if cfg.get("guard", True):
        sys.addaudithook(make_guard(root))
        like_the_reference()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"])
    sys.stdout = sys.stderr = sys.stdin = Swallowed()  # the verdict never depends on how much it prints
    try:
        exec(code, {})  # as the reference: __name__ is then the builtins module's, not "__main__"
    except BaseException as e:  # SystemExit too: a program that exits early has not passed its tests
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.write(2, f"\n{type(e).__name__}: {str(e)[:300]}\n".encode(errors="replace"))
        os._exit(1)
    signal.setitimer(signal.ITIMER_REAL, 0)
    os.write(1, f"\n{nonce}\n".encode())
    os._exit(0)  # skip whatever the program registered with atexit


main()
