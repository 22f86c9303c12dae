"""The HumanEval sandbox against hostile and broken programs: each fails cleanly, the host is unharmed.

    .venv/bin/python -m pytest tests/test_eval_sandbox.py -q          # about 15 s

Each isolation layer this host has ("netns", "nobody", "guard": evaluation.sandbox.isolation()) is also
tested alone where it is the one that must stop the attack, and a control run without any layer shows
that the attack would have worked (so these tests can fail).
"""
import os
import socket
import time
from pathlib import Path

import pytest

from evaluation.sandbox import GRACE_S, Limits, isolation, run_many, run_program

FAST = Limits(timeout_s=1.0)
LAYERS = isolation()["layers"]
GOOD = "def f(x):\n    return 2 * x\n\nassert f(2) == 4\n"


def alone(*names):
    """Parameters: each named layer by itself, where this host has it, and all layers together."""
    return [None] + [pytest.param([n], id=n) for n in names if n in LAYERS]


def test_a_correct_program_passes_and_broken_ones_fail():
    assert run_program(GOOD, FAST).passed
    cases = {"assert 1 == 2": "failed", "raise ValueError('x')": "failed", "import sys\nsys.exit(0)": "failed",
             "import os\nos._exit(0)": "failed", "def f(:\n": "failed"}
    for code, status in cases.items():
        out = run_program(code, FAST)
        assert (out.passed, out.status) == (False, status), (code, out)
    assert "exited before its tests finished" in run_program("import os\nos._exit(0)", FAST).detail


@pytest.mark.parametrize("layers", alone("nobody", "guard"))
def test_writing_outside_its_folder_fails_and_leaves_the_host_unchanged(tmp_path, layers):
    if layers == ["nobody"]:
        tmp_path.chmod(0o755)  # nobody may read the folder but not write it (it is root's)
    target, keep = tmp_path / "written", tmp_path / "keep"
    keep.write_text("mine")
    attacks = [f"open({str(target)!r}, 'w').write('x')", f"import os\nos.remove({str(keep)!r})",
               f"import os\nos.rename({str(keep)!r}, {str(target)!r})",
               f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
               f"import os\nfd = os.open({str(tmp_path)!r}, os.O_RDONLY)\n"
               "os.open('written', os.O_WRONLY | os.O_CREAT, dir_fd=fd)"]
    for code in attacks:
        out = run_program(code, FAST, layers=layers)
        assert not out.passed, code
        assert not target.exists() and keep.read_text() == "mine", code
    assert run_program("open('inside.txt', 'w').write('x')\nassert open('inside.txt').read() == 'x'", FAST,
                       layers=layers).passed


def test_control_without_layers_the_write_happens(tmp_path):
    target = tmp_path / "written"
    assert run_program(f"open({str(target)!r}, 'w').write('x')", FAST, layers=[]).passed
    assert target.read_text() == "x"


@pytest.mark.parametrize("layers", alone("netns", "guard"))
def test_sockets_cannot_reach_a_listening_server(layers):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\ns.sendall(b'x')"
        out = run_program(code, FAST, layers=layers)
        assert not out.passed and out.status in ("failed", "blocked")
        with pytest.raises(socket.timeout):
            server.accept()


def test_control_without_layers_the_connection_happens():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(5)
        port = server.getsockname()[1]
        assert run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
                           FAST, layers=[]).passed
        server.accept()[0].close()


def test_a_fork_bomb_fails_at_once():
    out = run_program("import os\nwhile True:\n    os.fork()\n", FAST)
    # stopped by the sandbox, not by the time limit (which would say "timeout"): no wall-clock bound, the
    # interpreter's start-up alone can take a second on a loaded machine
    assert not out.passed and out.status in ("blocked", "failed"), out


@pytest.mark.parametrize("layers", [pytest.param([n], id=n) for n in ("nobody", "guard") if n in LAYERS])
def test_each_layer_alone_stops_process_creation(layers):
    # bounded (20 children at most), in case a layer let it through
    code = "import os\nfor _ in range(20):\n    if os.fork() == 0:\n        os._exit(0)\n"
    assert not run_program(code, FAST, layers=layers).passed
    assert not run_program("import subprocess\nsubprocess.run(['true'])", FAST, layers=layers).passed


def test_allocating_tens_of_gigabytes_fails_with_memory_error():
    out = run_program("x = bytearray(30 * 2**30)", FAST)
    assert (out.passed, out.status) == (False, "memory"), out
    small = Limits(timeout_s=3.0, memory_bytes=256 << 20)  # a smaller cap, so that filling it stays quick
    out = run_program("a = []\nwhile True:\n    a.append(bytearray(2**24))", small)
    assert (out.passed, out.status) == (False, "memory"), out


def test_infinite_loops_time_out():
    for code in ("while True:\n    pass", "n = 0\nwhile True:\n    try:\n        while True:\n            n += 1\n"
                 "    except BaseException:\n        pass"):
        t0 = time.monotonic()
        out = run_program(code, FAST)
        assert (out.passed, out.status) == (False, "timeout") and time.monotonic() - t0 < 1.0 + GRACE_S + 10


def test_a_program_ignoring_the_alarm_is_killed_with_its_children(tmp_path):
    # no layers, so that the child can be started: this checks the process-group kill itself
    pid_file = tmp_path / "pid"
    code = ("import os, signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            f"if os.fork() == 0:\n    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n    time.sleep(60)\n"
            "time.sleep(60)\n")
    t0 = time.monotonic()
    out = run_program(code, Limits(timeout_s=0.5), layers=[])
    assert out.status == "timeout" and time.monotonic() - t0 < 0.5 + GRACE_S + 10
    stat = Path(f"/proc/{pid_file.read_text()}/stat")
    time.sleep(0.2)
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone (or a reaped-later zombie)


def test_clean_environment_closed_stdin_throwaway_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    code = ("import os\nassert 'SECRET_TOKEN' not in os.environ\nassert os.read(0, 1) == b''  # /dev/null\n"
            "try:\n    input()\n    raise SystemExit('stdin was readable')\nexcept OSError:\n"
            "    pass  # as InstructEval's swallow_io: reading stdin raises\n")
    assert run_program(code, FAST).passed
    where = tmp_path / "cwd"
    assert run_program(f"import os\nopen({str(where)!r}, 'w').write(os.getcwd())", FAST, layers=[]).passed
    assert Path(where.read_text()).name.startswith("sandbox-")
    assert not Path(where.read_text()).exists()  # the folder is removed afterwards


# ----------------------------------------------------------------------------------------------- as the reference
def test_the_program_does_not_run_as_main():
    """InstructEval runs exec(program, {}): __name__ is not "__main__", so such a block never runs there."""
    code = GOOD + "assert __name__ != '__main__'\nif __name__ == '__main__':\n    raise SystemExit('ran as main')\n"
    assert run_program(code, FAST).passed
    assert run_program(code, FAST, layers=[]).passed  # not a guard's doing


def test_what_reliability_guard_disables_fails_here_too():
    for code in ("import os\nos.getcwd()", "exit()", "import shutil\nshutil.move('a', 'b')",
                 "import resource"):
        out = run_program(code, FAST)
        assert (out.passed, out.status) == (False, "failed"), (code, out)
    assert run_program("import os\nos.getcwd()", FAST, layers=[]).passed  # the control: it is the guard


def test_printing_does_not_change_a_verdict_but_the_file_limit_holds():
    """The reference swallows stdout: 40 MB of prints pass (beyond the 16 MiB file limit of the output file),
    while writing past that limit through the file descriptor is still stopped."""
    assert run_program(GOOD + "for _ in range(40_000):\n    print('x' * 1000)\n", Limits(timeout_s=3.0)).passed
    assert not run_program("import os\nos.write(1, b'x' * (32 << 20))", FAST).passed


def test_memory_a_program_can_use_within_its_budget_is_not_failed():
    """A program that reserves 3 GiB and fills 1 GiB passes in the reference (no limit); the former 1 GiB limit
    failed it, the default does not (what 3 s can fill: bench/sandbox_memory.py)."""
    code = "reserved = bytes(3 << 30)\nfilled = [0] * (1 << 27)\nassert len(filled) == 1 << 27\n"
    # a generous time limit: this is about memory, and a loaded machine may take more than 3 s to fill 1 GiB
    assert run_program(code, Limits(timeout_s=60.0)).passed
    out = run_program(code, Limits(timeout_s=60.0, memory_bytes=1 << 30))
    assert (out.passed, out.status) == (False, "memory"), out


def test_the_run_goes_on_in_parallel_and_good_programs_still_pass(tmp_path):
    bad = ["import os\nwhile True:\n    os.fork()\n", "x = bytearray(30 * 2**30)", "while True:\n    pass",
           f"open({str(tmp_path / 'w')!r}, 'w').write('x')", "import socket\nsocket.socket()", "import os\nos._exit(0)"]
    programs = [p for b in bad for p in (GOOD, b)] + [GOOD]
    outcomes = run_many(programs, timeout=1.0, workers=3)
    assert [o.passed for o in outcomes] == [p == GOOD for p in programs]
    assert not (tmp_path / "w").exists() and os.getpid() > 0
