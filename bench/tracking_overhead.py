"""What tracking costs the study loop: per-result bookkeeping (journal + MLflow) and the gap between a result and
the next submission, with a local SQLite store, with the lab's MLflow server, and during an outage of that server.

    .venv/bin/python bench/tracking_overhead.py                       # sqlite, server, outage; parallel 1 and 32
    .venv/bin/python bench/tracking_overhead.py --stores sqlite --parallel 1 --budget 32

Each row is one real study (python -m orchestrator, debug executor, an instant objective: the loop's own work is
all there is) whose journal timestamps give the figures:
- per result: the study's wall time from its start record to its last result, over the results;
- end -> next submission: for each result, the time until the next batch's dispatch record (the refill of the
  slot), median and 95th percentile. The loop only queues MLflow writes (a background thread does them), so this
  gap must not grow with a slower store or during an outage.
The server rows start `python -m orchestrator server` in a temporary folder (root and Debian's postgresql); the
outage row kills that server's MLflow process right after the study starts and restarts it once every trial
has finished, so that the study's queued writes drain and it exits.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(journal: Path) -> list[dict]:
    out = []
    for line in journal.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def figures(journal: Path) -> dict:
    rs = records(journal)
    start = next(r["time"] for r in rs if r["event"] == "start")
    results = [r["time"] for r in rs if r["event"] == "result"]
    dispatches = [r["time"] for r in rs if r["event"] == "dispatch"]
    gaps = []
    for t in results:
        later = [d for d in dispatches if d >= t]
        if later:
            gaps.append(later[0] - t)
    gaps.sort()
    return {"results": len(results), "per_result_ms": 1000 * (results[-1] - start) / len(results),
            "gap_median_ms": 1000 * statistics.median(gaps) if gaps else float("nan"),
            "gap_p95_ms": 1000 * gaps[int(0.95 * (len(gaps) - 1))] if gaps else float("nan")}


def run_study(root: Path, name: str, uri: str, parallel: int, budget: int, on_start=None, on_trials_done=None,
              env=None) -> dict:
    cmd = [sys.executable, "-m", "orchestrator", "--study", name, "--workdir", str(root / "runs"),
           "--tracking-uri", uri, "--algo", "random", "--budget", str(budget), "--parallel", str(parallel),
           "--executor", "debug", "--objective", "orchestrator.search.landscapes:paper_landscape", "--poll", "0.05"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    journal = root / "runs" / name / "journal.jsonl"
    hooks = [(on_start, lambda rs: any(r["event"] == "start" for r in rs)),
             (on_trials_done, lambda rs: sum(r["event"] == "result" for r in rs) >= budget)]
    for hook, ready in hooks:
        if hook is None:
            continue
        while not (journal.exists() and ready(records(journal))):
            if proc.poll() is not None:
                raise RuntimeError(f"study {name} ended early: {proc.stderr.read()[-500:]}")
            time.sleep(0.02)
        hook()
    if proc.wait(timeout=3600) != 0:
        raise RuntimeError(f"study {name} failed: {proc.stderr.read()[-500:]}")
    return figures(journal)


class Server:
    def __init__(self, root: Path):
        self.folder = Path(tempfile.mkdtemp(prefix="bench-mlflow-", dir="/var/tmp"))
        self.folder.chmod(0o755)
        self.port = free_port()

    def cli(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", "server", "--dir", str(self.folder), *args],
                              cwd=REPO, capture_output=True, text=True, timeout=900)

    def start(self) -> str:
        done = self.cli("start", "--port", str(self.port))
        if done.returncode != 0:
            raise RuntimeError(f"server start failed: {done.stderr.strip()[-300:]}")
        return done.stdout.splitlines()[0]

    def kill(self) -> None:
        from orchestrator.tracking.server import Layout, mlflow_pid
        os.killpg(mlflow_pid(Layout(self.folder)), signal.SIGKILL)

    def stop(self) -> None:
        self.cli("stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", nargs="+", default=["sqlite", "server", "outage"])
    p.add_argument("--parallel", nargs="+", type=int, default=[1, 32])
    p.add_argument("--budget", type=int, default=64)
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    server = None
    rows = []
    try:
        for store in args.stores:
            for k in args.parallel:
                name = f"{store}-k{k}"
                if store == "sqlite":
                    row = run_study(root, name, f"sqlite:///{root}/mlruns/mlflow.db", k, args.budget)
                else:
                    if server is None:
                        server = Server(root)
                    url = server.start()
                    if store == "server":
                        row = run_study(root, name, url, k, args.budget)
                    else:
                        row = run_study(root, name, url, k, args.budget, on_start=server.kill,
                                        on_trials_done=server.start)
                rows.append((store, k, row))
                print(f"{store:7s} parallel {k:3d}: {row['results']} results, {row['per_result_ms']:7.1f} ms per "
                      f"result, end->next submission median {row['gap_median_ms']:6.1f} ms, "
                      f"p95 {row['gap_p95_ms']:6.1f} ms", flush=True)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    base = {k: row for store, k, row in rows if store == "sqlite"}
    print("\n| store | parallel | ms per result | end->next submission median / p95 (ms) | vs sqlite (median gap) |")
    print("|---|---|---|---|---|")
    for store, k, row in rows:
        ratio = row["gap_median_ms"] / base[k]["gap_median_ms"] if k in base and base[k]["gap_median_ms"] else None
        print(f"| {store} | {k} | {row['per_result_ms']:.1f} | {row['gap_median_ms']:.1f} / {row['gap_p95_ms']:.1f} | "
              f"{f'{ratio:.2f}x' if ratio else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
