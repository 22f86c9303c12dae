"""Measure a real landscape: tiny-preset LoRA fine-tunes over a Latin hypercube of the paper's space, several seeds.

    nice -n 19 .venv/bin/python bench/measure_landscape.py                 # 50 points + X0, 3 seeds (hours on a CPU)
    .venv/bin/python bench/measure_landscape.py --points 4 --seeds 1 --out /tmp/l.json   # a smoke run

The design is a maximin Latin hypercube (``mads_steps.latin_hypercube``, seed ``DESIGN_SEED``) of ``--points``
points in NOMAD's encoding of ``paper_space()`` (r index 1..8, dropout index 1..6, alpha 1..64, log10 lr in
[-6, -3]), plus the default point (the paper's X0). Every point is fine-tuned with ``jobs.finetune.run`` (real
transformers + peft training of the embedded tiny Llama on the bundled data, on this CPU), once per training
seed 0..``--seeds``-1; the data split (its seed, 42) is the same for all, so the validation set is fixed and the
seed moves only the LoRA initialization, the dropout masks and the order of the examples. Runs go seed by seed
(all points with seed 0, then seed 1...), so a run cut short still holds a whole design.

The tiny preset is shortened to fit a CPU budget (``SETTINGS``: 60 optimizer steps of 8 examples, 800 rows mixed
70/30, 640 train / 160 validation); the landscape is the validation loss after those steps. The output JSON
(``bench/data/tiny_landscape.json`` by default) is rewritten after every run (atomically): the settings, the
design, one row per run (point, seed, val_loss or the failure, wall and CPU seconds) and the cost so far
(CPU-hours); re-running the command skips the runs already in it. ``orchestrator.search.landscapes.measured``
reads it as a tabular objective.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")   # one core per run: the machine is shared
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from orchestrator.search.searchers.mads_steps import Box, latin_hypercube  # noqa: E402
from orchestrator.search.space import paper_space  # noqa: E402

DESIGN_SEED = 2024
SETTINGS = {"preset": "tiny", "max_steps": 60, "per_device_batch": 8, "grad_accum": 1, "max_seq_len": 256,
            "data": {"total_rows": 800}, "log_every": 1000}
DEFAULT_OUT = REPO / "bench" / "data" / "tiny_landscape.json"


def design(points: int) -> list[dict]:
    """The default point, then ``points`` Latin-hypercube points (decoded), deterministic."""
    space = paper_space()
    box = Box.from_space(space)
    lh = latin_hypercube(box, points, np.random.default_rng(DESIGN_SEED), tries=200,
                         avoid=np.array([space.nomad_x0()], float))
    return [space.default_point()] + [space.from_nomad(list(x)) for x in lh]


def fine_tune(point: dict, seed: int) -> dict:
    """One real fine-tune; its validation loss (or failure) and its cost."""
    import torch

    from jobs.finetune import run
    from jobs.spec import preset
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="landscape-")
    settings = {k: v for k, v in SETTINGS.items() if k != "preset"}
    spec = preset(SETTINGS["preset"], out=out, seed=seed, **settings, **point)
    wall, cpu = time.time(), time.process_time()
    try:
        result = run(spec)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"val_loss": result.get("val_loss") if result["status"] == "ok" else None,
            "status": result["status"], "reason": result.get("reason"),
            "wall_s": round(time.time() - wall, 2), "cpu_s": round(time.process_time() - cpu, 2)}


def save(path: Path, points: list[dict], rows: list[dict]) -> None:
    cpu_h = sum(r["cpu_s"] for r in rows) / 3600
    wall_h = sum(r["wall_s"] for r in rows) / 3600
    doc = {"what": "validation loss of real tiny-preset LoRA fine-tunes (jobs.finetune.run, CPU) over a Latin "
                   "hypercube of paper_space() plus the default point; made by bench/measure_landscape.py",
           "settings": SETTINGS, "design_seed": DESIGN_SEED, "points": points,
           "cost": {"runs": len(rows), "cpu_hours": round(cpu_h, 3), "wall_hours": round(wall_h, 3),
                    "machine": "2 shared CPU cores, one torch thread per run, nice 19"},
           "rows": rows}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=50, help="Latin-hypercube points (the default point is added)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds 0..N-1 per point")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    points = design(args.points)
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    done = {(r["index"], r["seed"]) for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for index, point in enumerate(points):
            if (index, seed) in done:
                continue
            row = {"index": index, "point": point, "seed": seed, **fine_tune(point, seed)}
            rows.append(row)
            save(args.out, points, rows)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
