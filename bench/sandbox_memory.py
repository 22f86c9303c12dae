"""How much memory a HumanEval program can fill within its time budget: the basis of the sandbox's memory cap.

    .venv/bin/python bench/sandbox_memory.py            # each way of filling memory, 0.5 s each, in the sandbox

InstructEval sets no memory limit, so the sandbox's cap (evaluation/sandbox.py Limits.memory_bytes) must
never fail a program that passes there. A program has 3 s; this measures, for the fastest ways Python has to
fill memory, how many GiB per second they write on this machine (in a sandboxed subprocess, no other
limit than the cap), and prints what 3 s would fill against the cap. Memory reserved but never written (e.g.
bytes(n), which the kernel maps lazily) costs no time and is what the cap alone can fail.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.sandbox import Limits, run_program  # noqa: E402

WAYS = {  # name -> an expression that fills about n bytes (n a multiple of 8)
    "[0] * n/8 (list of one object)": "[0] * (n // 8)",
    "b'x' * n (bytes)": "b'x' * n",
    "bytearray(n) (zeroed)": "bytearray(n)",
    "list(range(n/36)) (int objects)": "list(range(n // 36))",
    "{i: i} for n/100 keys (dict)": "{i: i for i in range(n // 100)}",
}
PROBE = """import time
n = {n}
t = time.perf_counter()
x = {expr}
dt = time.perf_counter() - t
peak = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]
raise SystemExit('RESULT %f %d' % (dt, int(peak) * 1024))
"""


def rate(expr: str, n: int) -> tuple[float, int]:
    """(seconds, peak resident bytes) to fill about n bytes with `expr`, in the sandbox (results via the exit
    message: the sandbox keeps only its stderr)."""
    out = run_program(PROBE.format(n=n, expr=expr), Limits(timeout_s=20.0))
    if "RESULT" not in out.detail:
        raise RuntimeError(f"{expr}: {out.status} {out.detail}")
    seconds, rss = out.detail.split("RESULT")[1].split()[:2]
    return float(seconds), int(rss)


def main() -> None:
    cap = Limits().memory_bytes
    budget = Limits().timeout_s
    print(f"memory cap {cap / 2**30:.0f} GiB, time budget {budget:.0f} s")
    print(f"{'how':<34} {'GiB/s':>7} {'GiB in the budget':>18}")
    results = {}
    for name, expr in WAYS.items():
        seconds, rss = rate(expr, 1 << 30)  # about 1 GiB
        speed = rss / 2**30 / seconds
        results[name] = speed
        print(f"{name:<34} {speed:>7.2f} {speed * budget:>18.1f}")
    most = max(results.values()) * budget
    print(f"the most a program fills in {budget:.0f} s here: {most:.1f} GiB = {most * 2**30 / cap:.0%} of the cap")
    print(json.dumps({"cap_gib": cap / 2**30, "gib_per_s": results}))


if __name__ == "__main__":
    main()
