"""The sandbox's verdict cannot be faked by the program under test (evaluation/_sandbox_child.py: the keeper and the
seal), and its guard cannot be switched off from inside.

    .venv/bin/python -m pytest tests/test_eval_sandbox_verdict.py -q      # about 20 s

Each attack in tests/sandbox_attacks.py ends with failing tests, so a pass can only come from a forged marker.
The ROUTES all faked a pass before the keeper (the marker was a nonce in the child's arguments and main()'s
locals); they are run here with the layers named there, /proc ones without the privilege drop, as on a host
where the evaluator is not root.
"""
import pytest

from evaluation.sandbox import Limits, run_program

from .sandbox_attacks import DESIGN, ROUTES, program

LIMITS = Limits(timeout_s=3.0)
GOOD = "def f(x):\n    return 2 * x\n\nassert f(2) == 4\n"


@pytest.mark.parametrize("layers", [None, [], ["guard"], ["nobody"], ["netns"]], ids=str)
def test_a_program_that_ends_normally_passes_with_any_layers(layers):
    assert run_program(GOOD, LIMITS, layers=layers).passed


def test_what_needs_frames_of_its_own_thread_still_works():
    """The seal leaves the program's own frames alone: TypeVar, namedtuple, enum, inspect, traceback use them."""
    code = ("import collections, enum, sys, typing\nT = typing.TypeVar('T')\n"
            "P = collections.namedtuple('P', 'x y')\nC = enum.Enum('C', 'RED GREEN')\n"
            "assert sys._getframe().f_code.co_name == '<module>'\n"
            "try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    assert e.__traceback__.tb_frame.f_back is not None\n"
            + GOOD)
    assert run_program(code, LIMITS).passed


@pytest.mark.parametrize("route", ROUTES)
def test_no_route_to_the_pass_marker(route):
    body, layers = ROUTES[route]
    out = run_program(program(body), LIMITS, layers=layers)
    assert (out.passed, out.status) in ((False, "failed"), (False, "blocked")), (route, out)


@pytest.mark.parametrize("attack", DESIGN)
def test_the_keeper_cannot_be_reached_or_tricked(attack):
    body, layers = DESIGN[attack]
    out = run_program(program(body), LIMITS, layers=layers)
    assert not out.passed, (attack, out)


def test_a_program_that_signals_the_keeper_itself_is_failed_saying_so():
    out = run_program(program(DESIGN["signalling the keeper itself"][0]), LIMITS)
    assert (out.passed, out.status) == (False, "blocked")
    assert "signalled the end of its tests itself" in out.detail


def test_the_seal_holds_without_the_guard():
    """layers=[] turns the host guard off (tests use it as a control): the seal stays."""
    for code in ("import gc\ngc.get_objects()", "import sys\nsys.settrace(None)", "open('/proc/self/environ')",
                 "import ctypes", "import sys\nsys._current_frames()"):
        out = run_program(code, LIMITS, layers=[])
        assert (out.passed, out.status) == (False, "blocked"), (code, out)


def test_the_guard_cannot_be_switched_off_by_rebinding_names(tmp_path):
    """The stub's tables and the builtins the guard used were the program's to change."""
    target = tmp_path / "written"
    for code in ("import sys\nstub = sys.modules['__main__']\nstub.FORBIDDEN = stub.NO_IMPORT = set()\n"
                 "import subprocess\nsubprocess.run(['true'])",
                 f"import builtins\nbuiltins.any = lambda it: False\nbuiltins.isinstance = lambda *a: True\n"
                 f"open({str(target)!r}, 'w').write('x')"):
        out = run_program(code, LIMITS, layers=["guard"])
        assert (out.passed, out.status) == (False, "blocked"), (code, out)
    assert not target.exists()


def test_code_run_inside_a_hook_finds_nothing_to_change(tmp_path):
    """A str subclass makes the guard run the program's code (formatting its refusal); from there the guard's
    frame is visible, but holds nothing that changes what the guard decides next."""
    target = tmp_path / "written"
    code = ("import sys\nclass Name(str):\n    def __format__(self, spec):\n"
            "        for value in list(sys._getframe(1).f_locals.values()):\n"
            "            for cell in getattr(value, '__closure__', None) or ():\n"
            "                try:\n                    if type(cell.cell_contents) is str:\n"
            "                        cell.cell_contents = ''\n                except ValueError:\n"
            "                    pass\n        return str(self)\n"
            "try:\n    __import__(Name('_posixsubprocess'))\nexcept PermissionError:\n    pass\n"
            f"open({str(target)!r}, 'w').write('x')\n")
    out = run_program(code, LIMITS, layers=["guard"])
    assert (out.passed, out.status) == (False, "blocked"), out
    assert not target.exists()
