"""The sandbox's child side: the verdict keeper, limits, privilege drop and guards, then the untrusted program.

Not imported by the evaluator: evaluation/sandbox.py passes this file's text to `python -I -S -B -c` with a
JSON configuration as the first argument, in the program's throwaway folder (the cwd). Steps, in order:
  1. the verdict keeper, a thread of its own: it reads the run's pass marker (a per-run secret) from a pipe
     the evaluator filled, closes that pipe and waits. The marker is in no argument, variable of the
     environment, file or frame of the main thread; only the keeper writes it (then ends the process), and only
     when main() stands on the line that follows a normal end of the program (verdict_line below): a
     program that signals the keeper itself is failed ("sandbox: ... signalled the end of its tests itself");
  2. resource limits (CPU seconds, address space, file size, process count, open files, no core files);
  3. when started as root: import the usual stdlib modules (PRELOAD: the interpreter's folder may be
     unreadable to the unprivileged user, as under /root), then drop to that user, so that the process-count
     limit applies and the file system's permissions protect the host;
  4. with the "guard" layer, a Python audit hook that refuses writes outside the folder, process creation,
     signals to other processes, sockets, ctypes and raising limits (PEP 578; it cannot be removed once
     installed), and what InstructEval's reliability_guard does (human_eval/execution.py): the same
     functions are set to None (os.getcwd, os.remove, exit, ...), so a program that calls one fails here as
     it fails there;
  5. always, the seal: an audit hook that keeps the keeper out of the program's reach - no other thread's
     frames (sys._current_frames), no gc walks, no trace or profile functions, no further audit hooks, no
     /proc (the process's memory, its parent's), no relative os.open (a dir_fd could point anywhere), no
     ctypes, CPython's test modules or subinterpreters (they read memory or run code without these hooks),
     no new program (exec) and nothing at all on the keeper's thread. Both hooks hold their own copies of
     everything they use, so a program that rebinds this module's names or the builtins changes nothing;
  6. an interval timer that raises TimeoutError after the wall-time budget;
  7. the program, run as InstructEval runs it: `exec(program, {})`, so `__name__` is not "__main__" (an
     `if __name__ == "__main__":` block does not run), with sys.stdout/sys.stderr swallowed and sys.stdin
     raising on read (its swallow_io). It passes only if it ends normally: a raised exception, sys.exit(),
     os._exit() or a signal all fail, because only the keeper writes the pass marker, after it returns.
These are Python-level guards (checked on CPython 3.11), not a wall against native code: the "nobody" layer
and the network namespace are the kernel's part.
"""
import _thread
import builtins
import faulthandler
import io
import json
import os
import resource
import shutil
import signal
import sys
from types import MappingProxyType

PRELOAD = ("typing", "math", "cmath", "random", "copy", "string", "collections", "re", "hashlib", "itertools",
           "functools", "operator", "heapq", "bisect", "fractions", "decimal", "statistics", "datetime", "time",
           "json", "numbers", "dataclasses", "enum", "array", "textwrap", "unicodedata", "abc", "io", "calendar",
           "struct", "base64", "binascii", "zlib", "difflib", "pprint", "queue", "keyword", "ast", "contextlib",
           "weakref", "warnings", "types", "locale", "secrets", "zoneinfo", "fnmatch")
FORBIDDEN = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen", "pty.spawn",
    "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link", "socket.__new__", "socket.connect",
    "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
    "ctypes.call_function", "resource.setrlimit", "resource.prlimit", "os.chown", "os.setxattr", "os.removexattr"})
NO_IMPORT = frozenset({"_posixsubprocess", "_ctypes"})  # process creation and native calls without an audit event
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
# The seal: events that reach other threads' frames, every object, or install code that sees frames ...
SEALED = frozenset({"sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
                    "sys.monitoring.register_callback", "sys.addaudithook", "gc.get_objects", "gc.get_referrers",
                    "gc.get_referents",
                    # ... and new programs, which start without these hooks
                    "os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn"})
# modules (last dotted part) that read memory or run code without the hooks: ctypes, CPython's test modules,
# subinterpreters
NATIVE = ("_ctypes", "_test", "_xx", "xx", "_interp")


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


# ------------------------------------------------------------------------------------------- the hooks
# A hook runs while the program runs, and a signal handler or finalizer of the program can run inside it and see
# its frame. So a hook looks up no global or builtin name (the program may rebind them), keeps only C functions
# and immutable values in its closure and its locals (nothing there to change), and calls only C functions and
# methods of exact str, bytes and tuple objects (the program cannot change those).
def make_guard(root):
    """The host guard: no writes outside `root`, no processes, signals, sockets or ctypes."""
    forbidden, no_import, write_flags = FORBIDDEN, NO_IMPORT, WRITE_FLAGS
    path_events = MappingProxyType(dict(PATH_EVENTS))
    getcwd, decode, encoding, as_str = os.getcwd, bytes.decode, sys.getfilesystemencoding(), str.__str__
    str_, bytes_, int_, type_, len_, tuple_, error = str, bytes, int, type, len, tuple, PermissionError
    prefix = root + "/"

    def guard(event, args):
        if event in forbidden:
            raise error(f"sandbox: {event} is not allowed")
        if event == "import":
            if (args[0] if type_(args[0]) is str_ else as_str(args[0])) in no_import:
                raise error(f"sandbox: importing {args[0]} is not allowed")
            return
        if event == "open":
            path, mode, flags = args
            if mode is None:  # os.open, which may write relative to a dir_fd: refused whenever it writes
                if (flags or 0) & write_flags:
                    raise error(f"sandbox: writing {path!r} outside the sandbox folder is not allowed")
                return
            if "w" not in mode and "a" not in mode and "x" not in mode and "+" not in mode:
                return
            paths = (path,)
        elif event in path_events:
            indices, dir_fds = path_events[event]
            for i in dir_fds:
                if i < len_(args) and args[i] is not None and args[i] != -1:
                    raise error(f"sandbox: {event} outside the sandbox folder is not allowed")
            paths = ()
            for i in indices:
                paths = paths + (args[i],) if i < len_(args) else paths
        else:
            return
        for path in paths:
            if path is None or type_(path) is int_:
                continue  # an already open descriptor was checked when it was opened
            if type_(path) is bytes_:
                path = decode(path, encoding, "surrogateescape")
            elif type_(path) is not str_:  # a path object is converted again after this check
                raise error(f"sandbox: {event} takes a str or bytes path here")
            normal = ()
            for part in tuple_((path if path[:1] == "/" else getcwd() + "/" + path).split("/")):
                normal = normal[:-1] if part == ".." else normal if part in ("", ".") else normal + (part,)
            path = "/" + "/".join(normal)
            if path != root and path[:len_(prefix)] != prefix:
                raise error(f"sandbox: writing {path!r} outside the sandbox folder is not allowed"
                            if event == "open" else f"sandbox: {event} outside the sandbox folder is not allowed")
    return guard


def make_seal(keeper):
    """The seal (always installed): nothing the program can do reaches the keeper's thread or its memory."""
    sealed, native, ident, stat, lstat, as_str = SEALED, NATIVE, _thread.get_ident, os.stat, os.lstat, str.__str__
    str_, bytes_, int_, type_, len_, error, os_error = str, bytes, int, type, len, PermissionError, OSError
    try:
        proc = stat("/proc").st_dev
    except OSError:
        proc = None

    def seal(event, args):
        if ident() == keeper:
            raise error("sandbox: nothing may run on the verdict keeper's thread")
        if event in sealed:
            raise error(f"sandbox: {event} is not allowed")
        if event == "import":
            name = (args[0] if type_(args[0]) is str_ else as_str(args[0])).rpartition(".")[2]
            for start in native:
                if name[:len_(start)] == start:
                    raise error(f"sandbox: importing {args[0]} is not allowed")
        elif event[:7] == "ctypes.":
            raise error(f"sandbox: {event} is not allowed")
        elif event == "open" and args[0] is not None and type_(args[0]) is not int_:
            path, mode = args[0], args[1]
            if type_(path) is not str_ and type_(path) is not bytes_:
                raise error("sandbox: open() takes a str or bytes path here")
            if mode is None and path[:1] != "/" and path[:1] != b"/":
                raise error("sandbox: os.open of a relative path is not allowed (its dir_fd could point anywhere)")
            for look in (lstat, stat):  # lstat: /proc's own links (fd/N, cwd); stat: a link elsewhere into /proc
                try:
                    dev = look(path).st_dev
                except os_error:
                    continue
                if dev == proc:
                    raise error(f"sandbox: opening {path!r} (in /proc) is not allowed")
    return seal


# ------------------------------------------------------------------------------------------- the verdict
def verdict_line(code) -> int:
    """The line of main()'s call to await_verdict(): the keeper believes a signal only while main() is there."""
    import dis

    starts = sorted((offset, line) for offset, line in dis.findlinestarts(code) if line is not None)
    calls = [i.offset for i in dis.get_instructions(code) if i.argval == "await_verdict"]
    lines = {max(line for start, line in starts if start <= offset) for offset in calls}
    if len(lines) != 1:
        raise RuntimeError(f"main() must call await_verdict() on exactly one line, found {sorted(lines)}")
    return lines.pop()


def keep_verdict(secret_fd, frame, line, ready, signalled, read, write, close, exit_, block):
    """The keeper's thread. Once the program runs it only waits in read() (no Python code runs here that the
    program could see: the seal refuses every event on this thread), then checks where main() stands: reading
    `frame.f_lineno` and comparing ints call nothing the program can replace."""
    try:
        block(signal.SIG_BLOCK, signal.valid_signals())  # the program's signals go to the main thread
        secret = b""
        while chunk := read(secret_fd, 64):
            secret += chunk
        close(secret_fd)
    except BaseException as e:  # noqa: BLE001 - no verdict can be given: fail the run, saying why
        write(2, f"\nsandbox: the verdict pipe could not be read ({e})\n".encode())
        exit_(3)
    ready.release()
    try:
        read(signalled, 1)
        if frame.f_lineno == line:
            write(1, b"\n" + secret + b"\n")
            exit_(0)
    finally:  # a signal from anywhere else, or no signal at all (its pipe closed): the program failed
        write(2, b"\nsandbox: the program signalled the end of its tests itself\n")
        exit_(1)


def start_keeper(secret_fd, frame) -> tuple[int, int]:
    """Start the keeper (before the limits: a thread counts against the process limit); returns the write end
    of the pipe main() signals it on, and the keeper's thread id. Returns once the secret pipe is closed."""
    signalled, signal_end = os.pipe()
    ready = _thread.allocate_lock()
    ready.acquire()
    keeper = _thread.start_new_thread(keep_verdict, (secret_fd, frame, verdict_line(main.__code__), ready, signalled,
                                                     os.read, os.write, os.close, os._exit, signal.pthread_sigmask))
    ready.acquire()
    return signal_end, keeper


def await_verdict(signal_end, write=os.write, lock=_thread.allocate_lock):
    """Signal the keeper, which writes the pass marker and ends the process; wait for that."""
    held = lock()
    held.acquire()
    write(signal_end, b"x")
    held.acquire()


def on_alarm(signum, frame):
    raise TimeoutError("timed out")


def main():
    here = sys._getframe()  # the keeper watches this frame
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    signal_end, keeper = start_keeper(cfg["verdict_fd"], here)
    set_limits(cfg)
    if cfg.get("uid") is not None:
        drop_privileges(cfg["uid"], cfg["gid"])
    root = os.getcwd()
    sys.argv = [cfg["program"]]
    code = compile(source, cfg["program"], "exec")
    if cfg.get("guard", True):
        sys.addaudithook(make_guard(root))
        like_the_reference()
    sys.addaudithook(make_seal(keeper))  # last: it refuses any later hook
    # kept here: the program may rebind the modules' attributes before its failure reaches the except clause
    write, exit_, setitimer, real = os.write, os._exit, signal.setitimer, signal.ITIMER_REAL
    signal.signal(signal.SIGALRM, on_alarm)
    setitimer(real, cfg["timeout_s"])
    sys.stdout = sys.stderr = sys.stdin = Swallowed()  # the verdict never depends on how much it prints
    try:
        exec(code, {})  # as the reference: __name__ is then the builtins module's, not "__main__"
    except BaseException as e:  # SystemExit too: a program that exits early has not passed its tests
        setitimer(real, 0)
        write(2, f"\n{type(e).__name__}: {str(e)[:300]}\n".encode(errors="replace"))
        exit_(1)
    else:
        setitimer(real, 0)
        await_verdict(signal_end)  # the only line on which the keeper writes the pass marker


main()
