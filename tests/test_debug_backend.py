"""The debug executor (slurm/debug.py) runs jobs in this process, but a job that misbehaves is only a failed trial,
as under the local executor: an exception, sys.exit, a KeyboardInterrupt it raised itself, its time limit.

    .venv/bin/python -m pytest -q tests/test_debug_backend.py     # unit tier
"""
import os
import signal
import sys
import time

import pytest
from submitit.core.utils import FailedJobError

from slurm.debug import DebugJob

pytestmark = pytest.mark.unit


def calls_exit():
    sys.exit(0)


def raises_interrupt():
    raise KeyboardInterrupt


def loops_forever():
    while True:
        time.sleep(0.01)


def returns():
    return {"status": "ok", "val_loss": 1.0}


@pytest.mark.parametrize("fn, says", [(calls_exit, r"called sys\.exit\(0\)"),
                                      (raises_interrupt, "raised KeyboardInterrupt"),
                                      (loops_forever, "ran past its time limit"),
                                      (lambda: 1 / 0, "ZeroDivisionError: division by zero")])
def test_a_misbehaving_job_is_a_failure_not_the_end_of_the_study(fn, says):
    job = DebugJob(fn, (), timeout_s=0.5)
    with pytest.raises(FailedJobError, match=says):
        job.result()
    assert job.done and "SUBMITIT_DEBUG_JOB_ID" not in os.environ


def test_a_real_ctrl_c_still_interrupts():
    def presses_ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)

    with pytest.raises(KeyboardInterrupt):
        DebugJob(presses_ctrl_c, (), timeout_s=30).result()


def test_a_good_job_returns_its_value_once():
    calls = []
    job = DebugJob(lambda: calls.append(1) or returns(), (), timeout_s=5)
    assert job.result() == returns() and job.result() == returns() and calls == [1]
