"""The orchestrator's own overhead, against submitit alone and raw `sbatch --wait`, with a sleep blackbox.

    .venv/bin/python bench/orchestrator_overhead.py                                   # local, K=4, 16 x 10 s
    eval "$(slurm/dev-cluster.sh env)"
    .venv/bin/python bench/orchestrator_overhead.py --executor slurm --seconds 5 --jobs 12

The same blackbox (`orchestrator.search.landscapes:sleeper`: a Python process that imports the objectives module,
sleeps a fixed time and reports when it was busy) runs `--jobs` times, `--slots` at a time, three ways:
- orchestrator: a real study (random search; journal, MLflow, batched polling, code snapshot);
- submitit: a plain loop keeping K submitit jobs in flight, polling `job.done()` every `--poll` seconds;
- sbatch: K threads each running `sbatch --wait` back to back (SLURM only).
Per way: wall time from the first submission to the last result; utilization = busy time / (K x wall);
submission -> blackbox start latency (queueing, job start-up, imports); end -> next submission gap (how
long a freed slot stays idle: detection, bookkeeping, tracking). A submission time is taken just before
the submit call (for the study: when it journals the trial, before MLflow and submission).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.config import load_config  # noqa: E402
from orchestrator.study.journal import Journal  # noqa: E402
from orchestrator.study.loop import run_study  # noqa: E402
from slurm.backend import make_executor
from slurm.executors import Resources  # noqa: E402

POINT = {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-4}
RESOURCES = {"cpus_per_task": 1, "timeout_min": 10}


def orchestrator(args, work: Path) -> list[dict]:
    cfg = load_config(None, study="overhead", algo="random", budget=args.jobs, parallel=args.slots,
                      executor=args.executor, poll_s=args.poll, objective="orchestrator.search.landscapes:sleeper",
                      workdir=str(work / "runs"), tracking_uri=f"sqlite:///{work}/mlflow.db", resources=RESOURCES)
    run_study(cfg, out=open(os.devnull, "w"))
    events = [json.loads(line) for line in Journal(cfg.folder / "journal.jsonl").path.read_text().splitlines()]
    submitted = {e["trial"]: e["time"] for e in events if e["event"] == "trial"}
    return [{"submit": submitted[e["trial"]], "start": e["summary"]["busy_start"], "end": e["summary"]["busy_end"],
             "seen": e["time"]} for e in events if e["event"] == "result"]


def submitit_loop(args, work: Path) -> list[dict]:
    from orchestrator.search.landscapes import sleeper
    executor = make_executor(args.executor, work / "submitit", Resources.from_dict(RESOURCES), job_name="plain")
    records, live, left = [], [], args.jobs
    while left or live:
        while left and len(live) < args.slots:
            t = time.time()
            live.append((executor.submit(sleeper, POINT), t))
            left -= 1
        for job, t in [item for item in live if item[0].done()]:
            result = job.result()
            records.append({"submit": t, "start": result["busy_start"], "end": result["busy_end"], "seen": time.time()})
            live.remove((job, t))
        time.sleep(args.poll)
    return records


def sbatch_loop(args, work: Path) -> list[dict]:
    code = f"import json; from orchestrator.search.landscapes import sleeper; print(json.dumps(sleeper({POINT!r})))"
    queue, records, lock = list(range(args.jobs)), [], threading.Lock()

    def slot():
        while True:
            with lock:
                if not queue:
                    return
                n = queue.pop()
            out = work / f"sbatch-{n}.out"
            t = time.time()
            subprocess.run(["sbatch", "--wait", "--parsable", "-J", "raw-sbatch", "-c", "1", "-t", "10",
                            "-o", str(out), "--wrap", f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"],
                           check=True, capture_output=True, cwd=REPO)
            seen = time.time()
            result = json.loads(out.read_text().strip().splitlines()[-1])
            with lock:
                records.append({"submit": t, "start": result["busy_start"], "end": result["busy_end"], "seen": seen})

    threads = [threading.Thread(target=slot) for _ in range(args.slots)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


def summarize(records: list[dict], slots: int) -> dict:
    submits = sorted(r["submit"] for r in records)
    wall = max(r["seen"] for r in records) - submits[0]
    busy = sum(r["end"] - r["start"] for r in records)
    latency = [r["start"] - r["submit"] for r in records]
    gaps = [min((s for s in submits if s >= r["end"]), default=None) for r in records]
    gaps = [g - r["end"] for g, r in zip(gaps, records) if g is not None]
    return {"wall": wall, "utilization": busy / (slots * wall), "latency": statistics.median(latency),
            "latency_max": max(latency), "gap": statistics.median(gaps) if gaps else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--executor", default="local", choices=("local", "slurm"))
    p.add_argument("--poll", type=float, default=0.2)
    p.add_argument("--ways", default="orchestrator,submitit,sbatch", help="comma-separated subset to run")
    args = p.parse_args()
    os.environ["LORA_HPO_SLEEP_S"] = str(args.seconds)
    os.chdir(REPO)  # submitit and sbatch jobs import orchestrator.search.landscapes from their working directory
    ways = {"orchestrator": orchestrator, "submitit": submitit_loop, "sbatch": sbatch_loop}
    chosen = [w for w in args.ways.split(",") if w != "sbatch" or args.executor == "slurm"]
    print(f"executor {args.executor}: {args.jobs} jobs of {args.seconds:g} s on {args.slots} slots, "
          f"poll {args.poll} s; ideal wall {args.jobs / args.slots * args.seconds:.1f} s\n")
    print(f"{'way':<13} {'wall s':>7} {'utilization':>11} {'submit->start s':>15} {'(max)':>6} {'end->next s':>11}")
    for way in chosen:
        work = Path(tempfile.mkdtemp(prefix=f"bench-overhead-{way}-"))
        s = summarize(ways[way](args, work), args.slots)
        print(f"{way:<13} {s['wall']:>7.1f} {s['utilization']:>11.3f} {s['latency']:>15.2f} "
              f"{s['latency_max']:>6.2f} {s['gap']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
