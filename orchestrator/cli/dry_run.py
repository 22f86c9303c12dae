"""`python -m orchestrator --config study.yaml --dry-run`: what a study would do, without doing any of it.

Prints the resolved configuration (preset < YAML < flags, validated), the searcher's first suggestions (as many
as there are slots), the first trial's fine-tune spec (what jobs/finetune.py would run), its peak GPU memory per rank
(jobs/memory.py, on nodes x tasks_per_node ranks) and the batch script SLURM would get for it (submitit's own
writer). Nothing is submitted and nothing is written: no study folder, no MLflow store, no data preparation.
"""
from __future__ import annotations

import json
import sys

import yaml

from jobs.memory import estimate_spec, world_size
from orchestrator.config import StudyConfig
from orchestrator.search.criteria import searcher_criteria
from orchestrator.search.searchers import make_searcher
from slurm.backend import submission_preview


def dry_run(config: StudyConfig, out=None) -> dict:
    out = out or sys.stdout
    searcher = make_searcher(config.algo, config.space, budget=config.budget, parallel=config.parallel,
                             seed=config.seed, options=config.searcher_options, **searcher_criteria(config))
    try:
        suggestions = []
        while len(suggestions) < config.parallel and (s := searcher.ask()) is not None:
            suggestions.append(s)
    finally:
        searcher.close()
    first = suggestions[0] if suggestions else None
    trial_out = str(config.folder / "trials" / "0000")
    spec = (config.trial_spec(first.point, trial_out).to_dict() if first and config.function is None
            else {"objective": config.function, "point": first.point if first else None, "out": trial_out})
    said, script = submission_preview(config.executor, config.resources, config.folder / "submitit",
                                      f"{config.study}.<batch>", code_dir=config.folder / "code")
    memory = estimate_spec(spec, world_size(config.resources.to_dict())) if config.function is None else None
    print("# resolved configuration", file=out)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None).rstrip(), file=out)
    print(f"\n# first suggestions ({config.algo}, {len(suggestions)} of {config.parallel} slots)", file=out)
    for s in suggestions:
        print(f"trial {s.trial_id}: {json.dumps(s.point)}", file=out)
    print("\n# the first trial's spec (jobs/finetune.py)" if config.function is None else
          "\n# the first trial (objective)", file=out)
    print(json.dumps(spec, indent=2, default=str), file=out)
    if config.function is None:
        print(f"\n# its peak GPU memory per rank (jobs/memory.py; {world_size(config.resources.to_dict())} ranks)",
              file=out)
        print(json.dumps(memory, indent=2) if memory else "unknown: the base model's config.json is not here", file=out)
    print(f"\n# {said}", file=out)
    if script is not None:
        print(script, file=out)
    print("# dry run: nothing was submitted or written", file=out)
    return {"config": config.to_dict(), "suggestions": [s.point for s in suggestions], "spec": spec,
            "memory": memory, "sbatch": script}
