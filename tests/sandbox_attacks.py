"""Programs that try to fake a pass in the HumanEval sandbox (evaluation/sandbox.py): shared by
tests/test_eval_sandbox_verdict.py and bench/attack_replay.py.

Each program fails its "tests" (it ends raising AssertionError), so it can only pass by producing the pass
marker some other way: `leak(text)` writes the first 32-hex-digit token of `text` as the last line of stdout and
exits 0, which is what the sandbox took for a pass before the marker moved into the keeper thread. ROUTES faked a
pass on that code (the commit before the keeper); DESIGN tries what the keeper itself could be open to.
"""
LEAK = r'''import os, re
def leak(text):
    for token in re.findall(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", text):
        os.write(1, ("\n" + token + "\n").encode())
        os._exit(0)
def leak_frames(frame):
    while frame is not None:
        leak(repr(frame.f_locals))
        frame = frame.f_back
def leak_memory(pid):
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        regions = [line.split()[:2] for line in maps]
        for pattern in (rb'nonce": "([0-9a-f]{32})"', rb"(?<![0-9a-f])([0-9a-f]{32})(?![0-9a-f])"):
            for span, perms in regions:
                lo, hi = (int(x, 16) for x in span.split("-"))
                if not perms.startswith("rw") or hi - lo > 1 << 28:
                    continue
                try:
                    mem.seek(lo)
                    found = re.search(pattern, mem.read(hi - lo))
                except (OSError, OverflowError):
                    continue
                if found:
                    leak(found.group(1).decode())
'''
FAIL = "\nraise AssertionError('the tests failed')\n"
# run in a subinterpreter, which imports nothing from the stdlib's folder (unreadable to nobody under /root)
SUB = (
    "import posix\ntext = open('/proc/self/cmdline').read()\nat = text.find('nonce\": \"') + 9\n"
    "posix.write(1, ('\\n' + text[at:at + 32] + '\\n').encode())\nposix._exit(0)\n")
NO_NOBODY = ["netns", "guard"]  # as on a host without root: the kernel does not keep /proc from the program

# name -> (program, layers): None is every layer this host has
ROUTES = {
    "the caller's frame (sys._getframe)": ("import sys\nleak_frames(sys._getframe(1))", None),
    "a frame from a traceback": ("try:\n    raise ValueError\nexcept ValueError as e:\n"
                                 "    leak_frames(e.__traceback__.tb_frame)", None),
    "a frame from a generator": ("def g():\n    yield leak_frames(gen.gi_frame)\ngen = g()\nnext(gen)", None),
    "a frame from a signal handler": ("import signal, time\n"
                                      "signal.signal(signal.SIGALRM, lambda s, f: leak_frames(f))\n"
                                      "signal.setitimer(signal.ITIMER_REAL, 0.01)\nt = time.monotonic()\n"
                                      "while time.monotonic() - t < 0.5:\n    pass", None),
    "a trace function": ("import sys\nsys.settrace(lambda f, e, a: leak_frames(f))\ndef f():\n    pass\nf()", None),
    "/proc/self/cmdline": ("leak(open('/proc/self/cmdline').read())", None),
    "sys.orig_argv": ("import sys\nleak(repr(sys.orig_argv))", None),
    "a gc walk": ("import gc\nfor o in gc.get_objects():\n    if type(o) in (list, dict):\n        leak(repr(o))",
                  None),
    "its own memory (/proc/self/mem)": ("leak_memory('self')", NO_NOBODY),
    "its parent's memory (/proc/PPID/mem)": ("leak_memory(os.getppid())", NO_NOBODY),
    "a subinterpreter without the hooks": ("import _xxsubinterpreters as si\nsi.run_string(si.create(), SUB)",
                                           NO_NOBODY),
}
DESIGN = {
    "inherited descriptors and the environment": (
        "for fd in range(3, 64):\n    try:\n        os.set_blocking(fd, False)\n"
        "        leak(os.read(fd, 4096).decode(errors='replace'))\n"
        "    except OSError:\n        pass\nleak(repr(dict(os.environ)))", None),
    "signalling the keeper itself": (
        "import time\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x')\n    except OSError:\n"
        "        pass\ntime.sleep(1)", None),
    "rebinding what the stub calls": (
        "import builtins, signal, sys\nexit_ = os._exit\nos._exit = lambda code: exit_(0)\n"
        "os.write = lambda fd, data: len(data)\nsignal.setitimer = lambda *a: (0.0, 0.0)\n"
        "builtins.type = lambda *a: BaseException\nstub = sys.modules['__main__']\n"
        "stub.await_verdict = lambda *a: exit_(0)\nstub.SEALED = stub.FORBIDDEN = frozenset()", None),
    "running main() again": (
        "import builtins, sys\nif not hasattr(builtins, 'again'):\n    builtins.again = True\n"
        "    sys.argv = sys.orig_argv[-2:]\n    sys.modules['__main__'].main()", None),
    "a new audit hook": ("import sys\nsys.addaudithook(lambda event, args: None)", None),
}


def program(body: str) -> str:
    """The attack as the sandbox runs it: the helpers, the attack, then tests that fail."""
    return LEAK + f"SUB = {SUB!r}\n" + body + FAIL
