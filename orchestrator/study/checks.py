"""Checks a study makes before anything is submitted, in a subprocess where they could import anything."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from slurm.executors import pinned_path


def check_objective(target: str, code_dir: Path | None) -> None:
    """Import the objective the way jobs will (in a subprocess: it may import anything) before any submission."""
    script = "import sys\nfrom jobs.entry import load_objective\nload_objective(sys.argv[1])\n"
    env = dict(os.environ)
    cmd = [sys.executable, "-c", script, target]
    if code_dir is not None and sys.version_info >= (3, 11):
        env["PYTHONPATH"] = pinned_path(code_dir) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        cmd.insert(1, "-P")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        said = lines[-1] if lines else f"objective {target!r} cannot be loaded"
        raise ValueError(said.removeprefix("ValueError: ") + " (nothing was submitted)")


