"""Evaluation throughput: our batched generation against the reference's one-example-at-a-time fp32 loop.

    .venv/bin/python bench/eval_throughput.py                          # tiny model, CPU, synthetic data
    .venv/bin/python bench/eval_throughput.py --per-group 40 --batch-size 16
    .venv/bin/python bench/eval_throughput.py --suppress-eos --per-group 8 --limit 8   # full-length answers
    .venv/bin/python bench/eval_throughput.py --base meta-llama/Llama-2-7b-hf --data-dir DIR --limit 20  # a GPU

Both sides run the same protocol on the same prompts (built once by the task modules) with greedy decoding:
ours is `evaluation.generate.generate` (length-sorted left-padded batches, KV cache, per-task stop rule);
the reference is `generate_one_by_one` (one prompt per call, every new token up to the task's budget, as
InstructEval does). Outputs go through the same post-processing and scorer, and the per-example
correctness must be identical. Timed: generation only (scoring is shared code). Without --data-dir, the
benchmarks are synthesized in their real schemas from the bundled instruction sets (varied prompt lengths,
so padding is realistic); HumanEval uses the real problems. Prints one line per task and the overall ratio.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation.generate import generate, generate_one_by_one, token_counter  # noqa: E402
from evaluation.model import load  # noqa: E402
from evaluation.tasks import get_tasks  # noqa: E402
from jobs.data import load_rows  # noqa: E402


def synthesize(folder: Path, per_group: int, seed: int = 0) -> Path:
    """MMLU / BBH / DROP folders in the hub schemas, filled with the bundled instruction rows."""
    rng = random.Random(seed)
    rows = load_rows("bundled:tiny-alpaca") + load_rows("bundled:tiny-dolly")  # instruction, context, response
    rng.shuffle(rows)
    words = lambda text, n: " ".join(text.split()[:n]) or "none"  # noqa: E731
    pick = iter(rows * 20)

    def dump(path: Path, items: list[dict]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))

    mmlu = {"dev": [], "test": []}
    for subject in ("astronomy", "college_biology", "world_religions", "high_school_statistics"):
        for split, n in (("dev", 5), ("test", per_group)):
            for _ in range(n):
                r = next(pick)
                mmlu[split].append({"question": r["instruction"], "subject": subject, "answer": rng.randrange(4),
                                    "choices": [words(next(pick)["response"], rng.randint(2, 12)) for _ in range(4)]})
    for split, items in mmlu.items():
        dump(folder / "mmlu" / f"{split}.jsonl", items)
    for subset in ("navigate", "snarks", "web_of_lies"):
        dump(folder / "bbh" / f"{subset}.jsonl",
             [{"input": (r := next(pick))["instruction"] + ("\n" + r.get("context", "") if r.get("context") else ""),
               "target": words(r["response"], 1)} for _ in range(3 + per_group)])
    drop = []
    for i in range(per_group + 3):
        r = next(pick)
        passage = " ".join(next(pick)["context"] or next(pick)["response"] for _ in range(rng.randint(2, 12)))
        drop.append({"section_id": f"s{i}", "query_id": f"q{i}", "passage": passage, "question": r["instruction"],
                     "answers_spans": {"spans": [words(r["response"], 1)], "types": ["span"]}})
    dump(folder / "drop" / "validation.jsonl", drop)
    return folder


def compare(task, fast, ref_model, tokenizer, examples, batch_size: int, suppress_eos: bool = False,
            repeats: int = 1) -> dict:
    """Ours (`fast`: the model in our dtype) against the reference (`ref_model`: fp32, one at a time); the two
    sides alternate `repeats` times and the median times are kept (a shared node's load comes and goes)."""
    prompts = [e.prompt for e in examples]
    times = {"ours": [], "ref": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = generate(fast, tokenizer, prompts, task.max_new_tokens, task.stop, batch_size,
                        suppress_eos=suppress_eos)
        t1 = time.perf_counter()
        ref = generate_one_by_one(ref_model, tokenizer, prompts, task.max_new_tokens, suppress_eos=suppress_eos)
        times["ours"].append(t1 - t0)
        times["ref"].append(time.perf_counter() - t1)
    ok = [[r["correct"] for r in task.score(examples, [task.postprocess(t) for t in texts])] for texts in (ours, ref)]
    return {"task": task.name, "n": len(examples), "ours_s": statistics.median(times["ours"]),
            "ref_s": statistics.median(times["ref"]), "ours_score": sum(ok[0]) / len(ok[0]),
            "ref_score": sum(ok[1]) / len(ok[1]), "identical": ok[0] == ok[1],
            "same_outputs": sum(task.postprocess(a) == task.postprocess(b) for a, b in zip(ours, ref))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="tiny")
    p.add_argument("--adapter")
    p.add_argument("--tasks", default="mmlu,bbh,drop,humaneval")
    p.add_argument("--data-dir", help="real data in the evaluation/data.py layout (default: synthesized)")
    p.add_argument("--per-group", type=int, default=24, help="synthesized test rows per subject / subset")
    p.add_argument("--limit", type=int, default=None, help="first N per group (HumanEval: default 24)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device")
    p.add_argument("--dtype", default="auto", help="ours: auto = bf16 on GPU, fp32 on CPU (the reference: fp32)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (1: steadier on a shared node)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs per side; medians are reported")
    p.add_argument("--suppress-eos", action="store_true",
                   help="both sides: no EOS, so every answer runs to its budget or stop rule (a rambling base model)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or str(synthesize(Path(tmp), args.per_group))
        model, tokenizer, info = load(args.base, args.adapter, args.device, "fp32")
        same = args.dtype == "fp32" or (args.dtype == "auto" and info["device"] == "cpu")
        fast = model if same else load(args.base, args.adapter, args.device, args.dtype)[0]  # GPU: bf16
        print(f"model {info['base']} on {info['device']}; ours {args.dtype}, reference fp32, batch {args.batch_size}, "
              f"median of {args.repeats}{', EOS suppressed' if args.suppress_eos else ''}")
        generate(fast, tokenizer, ["warm up"], 4)  # first-call costs belong to neither side
        rows = []
        for task in get_tasks(args.tasks):
            limit = args.limit or (24 if task.name == "humaneval" else None)
            examples = task.build(task.load(data_dir), token_counter(tokenizer), limit, 0)
            row = compare(task, fast, model, tokenizer, examples, args.batch_size, args.suppress_eos, args.repeats)
            rows.append(row)
            print(f"{row['task']:<10} n={row['n']:<4} ours {row['n'] / row['ours_s']:8.2f} ex/s  reference "
                  f"{row['n'] / row['ref_s']:7.2f} ex/s  ratio {row['ref_s'] / row['ours_s']:5.2f}  scores "
                  f"{100 * row['ours_score']:.1f} / {100 * row['ref_score']:.1f}  identical={row['identical']}  "
                  f"same outputs {row['same_outputs']}/{row['n']}")
    n, ours_s, ref_s = (sum(r[k] for r in rows) for k in ("n", "ours_s", "ref_s"))
    print(f"overall: {n} examples, ours {n / ours_s:.2f} ex/s, reference {n / ref_s:.2f} ex/s, "
          f"ratio {ref_s / ours_s:.2f}, identical scores on every task: {all(r['identical'] for r in rows)}")
    return 0 if all(r["identical"] for r in rows) else 1  # in bf16 (GPU) small differences are expected


if __name__ == "__main__":
    sys.exit(main())
