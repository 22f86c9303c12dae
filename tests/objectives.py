"""Blackboxes for the study tests (importable by jobs as tests.objectives:NAME)."""
import json
import os
import time
from pathlib import Path

from orchestrator.search.landscapes import paper_landscape


def _mark(point: dict) -> None:
    """Record every evaluation (one file per call) so tests can prove none ran twice."""
    folder = os.environ.get("LORA_HPO_TEST_MARKS")
    if folder:
        name = f"{time.time_ns()}-{os.getpid()}.json"
        Path(folder, name).write_text(json.dumps(point, sort_keys=True))


def landscape(point: dict) -> float:
    _mark(point)
    return paper_landscape(point)


def flaky(point: dict) -> dict:
    """Fails for dropout 1 (raises) and returns NaN for tiny ranks; otherwise a dict with the objective."""
    _mark(point)
    if point["dropout"] == 1:
        raise RuntimeError("adapter never trains with dropout 1")
    if point["r"] == 4:
        return {"objective": float("nan")}
    return {"objective": paper_landscape(point), "extra_metric": 1.5}


def slow_landscape(point: dict) -> float:
    _mark(point)
    time.sleep(float(os.environ.get("LORA_HPO_TEST_SLEEP", "1.0")))
    return paper_landscape(point)


def dies(point: dict) -> float:
    """A job that ends without a result the way real ones do: point["how"] says which."""
    import signal
    import sys

    _mark(point)
    how = point.get("how")
    print(f"about to die: {how}", file=sys.stderr, flush=True)
    if how == "os_exit":
        os._exit(3)
    if how == "sigkill":  # what the kernel's OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "sys_exit":
        sys.exit(2)
    if how == "raise":
        raise ValueError("boom")
    return paper_landscape(point)


def waits_for_file(point: dict) -> float:
    """Runs until the file named by $LORA_HPO_TEST_GATE exists (a test decides when it ends)."""
    _mark(point)
    gate = Path(os.environ["LORA_HPO_TEST_GATE"])
    while not gate.exists():
        time.sleep(0.05)
    return paper_landscape(point)


def always_fails(point: dict) -> float:
    _mark(point)
    raise RuntimeError("this objective never works")


def huge(point: dict) -> dict:
    """A 50 MB return value: the journal must keep a bounded summary of it, not a copy."""
    return {"objective": paper_landscape(point), "blob": "x" * 50_000_000, "many": list(range(10))}


def eats_memory(point: dict) -> float:
    """Holds 2 GB for a while: more than a default job's memory (DefMemPerCPU) on the production dev cluster."""
    blocks = [bytearray(256 * 2**20) for _ in range(8)]
    for block in blocks:
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not just reserved
    time.sleep(30)
    return paper_landscape(point) + len(blocks) * 0


def in_turn(point: dict) -> float:
    """Trials end one at a time, each only once the slot the previous one freed was refilled (deterministic on a
    loaded machine, where trials of unequal length may still end within one poll). $LORA_HPO_TEST_TURNS is a
    folder; $LORA_HPO_TEST_SLOTS and $LORA_HPO_TEST_BUDGET are the study's K and budget. The trial that started
    n-th ends after trial n-1 ended and once min(n + K, budget) trials have started; after 60 s it ends anyway
    (the test's assertions then say which slot was left empty)."""
    folder = Path(os.environ["LORA_HPO_TEST_TURNS"])
    k, budget = int(os.environ["LORA_HPO_TEST_SLOTS"]), int(os.environ["LORA_HPO_TEST_BUDGET"])
    n = 0
    while True:  # claim the next start number (O_EXCL: one process wins each)
        try:
            os.close(os.open(folder / f"start-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            break
        except FileExistsError:
            n += 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        previous_done = n == 0 or (folder / f"done-{n - 1}").exists()
        if previous_done and len(list(folder.glob("start-*"))) >= min(n + k, budget):
            break
        time.sleep(0.02)
    (folder / f"done-{n}").touch()
    return paper_landscape(point)


def costly(point: dict) -> dict:
    """The landscape with a fine-tune's costs that grow with the rank (as bench/multi_criteria.py models them):
    peak_memory_bytes (14 GiB + 14 GiB x r/128) and train_s (0.5 h + 0.5 h x r/128), the metrics constraints
    and a second objective read (peak_memory_gb, train_hours). Sleeps $LORA_HPO_TEST_SLEEP s (default 0)."""
    _mark(point)
    time.sleep(float(os.environ.get("LORA_HPO_TEST_SLEEP", "0")))
    r = int(point["r"])
    return {"objective": paper_landscape(point), "peak_memory_bytes": int((14 + 14 * r / 128) * 2**30),
            "train_s": 3600 * (0.5 + 0.5 * r / 128)}


def interrupted_once(point: dict) -> float:
    """Presses Ctrl-C in its own process (the debug executor's: the orchestrator) at the Nth call of a study, once:
    $LORA_HPO_TEST_INTERRUPT = "N:marker file"."""
    n, marker = os.environ["LORA_HPO_TEST_INTERRUPT"].split(":", 1)
    calls = Path(marker + ".calls")
    calls.write_text(str(int(calls.read_text()) + 1 if calls.exists() else 1))
    if int(calls.read_text()) == int(n) and not Path(marker).exists():
        Path(marker).touch()
        import signal
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    return paper_landscape(point)


def odd_metric(point: dict) -> dict:
    """Reports a metric whose name MLflow refuses (an @), beside the objective."""
    _mark(point)
    return {"objective": paper_landscape(point), "dev.mmlu@5": 0.3}


def undecodable_failure(point: dict) -> float:
    """Fails naming a file whose name is not UTF-8 (os.fsdecode gives a lone surrogate)."""
    _mark(point)
    name = os.fsdecode(b"data-\xff.jsonl")
    raise FileNotFoundError("no such file: " + name)


def calls_exit(point: dict) -> float:
    _mark(point)
    raise SystemExit(0)


def raises_interrupt(point: dict) -> float:
    _mark(point)
    raise KeyboardInterrupt


def loops_forever(point: dict) -> float:
    _mark(point)
    while True:
        time.sleep(0.1)
