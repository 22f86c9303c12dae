"""The orchestrator's own overhead: slot utilization and end-to-next-submission gaps with a sleep blackbox.

    .venv/bin/python bench/orchestrator_overhead.py                      # K=4 slots, 10 s jobs, local
    .venv/bin/python bench/orchestrator_overhead.py --executor slurm      # on the dev cluster (eval its env)

Runs a real study (random search, the `orchestrator.objectives:sleeper` blackbox, which sleeps a fixed time
and reports when it ran) through the real executor, then reads the study's journal:
- utilization = sum of the jobs' busy time / (K x wall time from the first submission to the last result);
- gap = for each finished job, the time from its end to the next submission (the slot's idle time as the
  orchestrator sees it: detection by polling, bookkeeping, MLflow writes, submission).
Target: utilization >= 0.95 at K = 4 with 10 s jobs. The job start-up (a Python process importing the
job's code) counts as overhead here too, since the slot is not busy with the blackbox.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.journal import Journal  # noqa: E402
from orchestrator.study import run_study  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--executor", default="local")
    p.add_argument("--poll", type=float, default=0.2)
    args = p.parse_args()
    os.environ["LORA_HPO_SLEEP_S"] = str(args.seconds)
    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = load_config(None, study="overhead", algo="random", budget=args.jobs, parallel=args.slots,
                      executor=args.executor, poll_s=args.poll, objective="orchestrator.objectives:sleeper",
                      workdir=str(work / "runs"), tracking_uri=f"sqlite:///{work}/mlflow.db",
                      resources={"timeout_min": 10})
    run_study(cfg, out=open(os.devnull, "w"))
    events = [e for e in _events(Journal(cfg.folder / "journal.jsonl"))]
    submits = sorted(e["time"] for e in events if e["event"] == "submitted")
    results = [e for e in events if e["event"] == "result"]
    busy = [(r["summary"]["busy_start"], r["summary"]["busy_end"]) for r in results]
    wall = max(r["time"] for r in results) - submits[0]
    utilization = sum(end - start for start, end in busy) / (args.slots * wall)
    gaps = [min((s for s in submits if s >= end), default=None) for _, end in busy]
    gaps = [g - end for g, (_, end) in zip(gaps, busy) if g is not None]
    startup = [start - sub for (start, _), sub in zip(sorted(busy), submits)]
    print(f"executor {args.executor}: {args.jobs} jobs of {args.seconds:g} s on {args.slots} slots, poll {args.poll} s")
    print(f"wall {wall:.1f} s (ideal {args.jobs / args.slots * args.seconds:.1f} s)   "
          f"utilization {utilization:.3f}   (target >= 0.95)")
    print(f"end -> next submission gap: median {statistics.median(gaps):.3f} s, max {max(gaps):.3f} s")
    print(f"submission -> blackbox start (job start-up): median {statistics.median(startup):.3f} s")


def _events(journal: Journal):
    import json
    for line in journal.path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


if __name__ == "__main__":
    main()
