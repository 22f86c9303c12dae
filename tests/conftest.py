"""Shared fixtures. The tiny base model is built once per test session into a private cache."""
import os
import tempfile
from pathlib import Path

import pytest

# Set before any project import: every process the tests start (subprocesses too) shares this cache, and
# nothing is written to the user's ~/.cache.
os.environ.setdefault("LORA_HPO_CACHE", tempfile.mkdtemp(prefix="lora-hpo-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir():
    from jobs.tiny import tiny_model_dir as build
    return build()


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def uri(tmp_path) -> str:
    """The test's own SQLite MLflow store."""
    return f"sqlite:///{tmp_path}/mlruns/mlflow.db"


def orchestrator_process(tmp_path, *args, env=None, cwd=REPO):
    """`python -m orchestrator ARGS` as a real process on the test's workdir and store (output in .stdout)."""
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--workdir", str(tmp_path / "runs"), "--tracking-uri", uri(tmp_path),
         *args], cwd=cwd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def kill_when(proc, condition, timeout_s: float, what: str) -> None:
    """SIGKILL a process at a moment the condition holds: it is frozen (SIGSTOP) while the condition is
    checked, so it cannot move on between the check and the kill (e.g. journal a trial but not its job)."""
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) while waiting for {what}:\n{proc.stdout.read()}")
        proc.send_signal(signal.SIGSTOP)
        try:
            met = condition()
        except BaseException:
            proc.kill()  # a failing check must not leave a frozen orchestrator behind
            raise
        if met:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        proc.send_signal(signal.SIGCONT)
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.1)
