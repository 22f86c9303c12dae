"""`python -m orchestrator ui`: the MLflow UI on the project's store, for one person on this machine.

    python -m orchestrator ui [--tracking-uri sqlite:///mlruns/mlflow.db] [--port 5000]

Runs `mlflow server` with this Python (no venv on PATH needed), bound to 127.0.0.1, one worker, MLflow's GenAI job
workers off, in its own process group: Ctrl-C (or SIGTERM) stops the server and every process it started
(none is left behind). For a lab's shared server with logins: `python -m orchestrator server start --auth`.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from jobs import tracking_store


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m orchestrator ui", description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", dest="tracking_uri", help="default: $MLFLOW_TRACKING_URI, else the project's "
                   f"store ({tracking_store.DEFAULT_TRACKING_URI})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    args = p.parse_args(argv)
    uri = tracking_store.resolve(args.tracking_uri)
    if not uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
        print(f"error: {uri} is a server already: open it in a browser", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", args.host,
           "--port", str(args.port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning "
          "(Ctrl-C stops it)", flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and everything it started
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
