"""InstructEval protocols on project-made fixtures: prompts, shot dropping, scoring, averages, data loading.

    .venv/bin/python -m pytest tests/test_eval_tasks.py -q        # no model, about a second
"""
import json
import random
from pathlib import Path

import pytest

from evaluation.data import read_split, read_subsets
from evaluation.generate import encode
from evaluation.runner import read_completions
from evaluation.tasks import bbh, drop, get_tasks, humaneval, mmlu
from evaluation.tasks.common import EvalError, blank_line_after_answer, fit_shots, macro, micro, starts_with

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def words(texts):
    """A stand-in token counter: one token per whitespace-separated word, plus BOS."""
    return [len(t.split()) + 1 for t in texts]


# ----------------------------------------------------------------------------------------------- MMLU
def test_mmlu_prompt_is_the_reference_text():
    raw = mmlu.load(FIXTURES)
    ex = mmlu.build(raw, words)[0]
    assert (ex.id, ex.group, ex.target, ex.n_shots) == ("astronomy/0", "astronomy", "A", 5)
    expected = (
        "The following are multiple choice questions (with answers) about  astronomy.\n\n"
        "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\nD. Mars\nAnswer: B\n\n"
        "What is the Sun mostly made of?\nA. Iron\nB. Oxygen\nC. Hydrogen\nD. Carbon\nAnswer: C\n\n"
        "How many moons does Mars have?\nA. Two\nB. None\nC. One\nD. Four\nAnswer: A\n\n"
        "Which planet has the largest mass?\nA. Saturn\nB. Neptune\nC. Earth\nD. Jupiter\nAnswer: D\n\n"
        "What kind of object is Polaris?\nA. A planet\nB. A star\nC. A comet\nD. A moon\nAnswer: B\n\n"
        "Which planet is known as the red planet?\nA. Mars\nB. Venus\nC. Jupiter\nD. Mercury\nAnswer:")
    assert ex.prompt == expected
    assert mmlu.header("high_school_geography").startswith(
        "The following are multiple choice questions (with answers) about  high school geography.\n\n")


def test_mmlu_subjects_sorted_limit_per_subject_and_gold_letters():
    examples = mmlu.build(mmlu.load(FIXTURES), words, limit=2)
    assert [e.id for e in examples] == ["astronomy/0", "astronomy/1", "elementary_mathematics/0",
                                        "elementary_mathematics/1", "high_school_geography/0",
                                        "high_school_geography/1"]
    assert [e.target for e in examples] == ["A", "C", "C", "A", "B", "C"]


def test_shots_are_dropped_from_the_end_until_the_prompt_fits():
    shots = [f"shot{i} " + "w " * 99 for i in range(5)]  # 100 words each
    head, end = "head ", "question Answer:"
    (prompt, k), = fit_shots([(head, shots, end)], words, max_tokens=350)
    assert k == 3 and prompt == head + "".join(shots[:3]) + end
    assert words([prompt])[0] <= 350 < words([head + "".join(shots[:4]) + end])[0]
    (prompt, k), = fit_shots([(head, shots, "x " * 1000)], words, max_tokens=350)  # never fits: no shots left
    assert k == 0 and prompt == head + "x " * 1000


def test_mmlu_drops_shots_at_2048_tokens():
    raw = mmlu.load(FIXTURES)
    raw["dev"] = [dict(r, question=r["question"] + " filler" * 450) if r["subject"] == "astronomy" else r
                  for r in raw["dev"]]
    examples = [e for e in mmlu.build(raw, words) if e.group == "astronomy"]
    assert {e.n_shots for e in examples} == {4}  # 5 shots of ~460 words exceed 2048, 4 fit
    assert all(words([e.prompt])[0] <= 2048 for e in examples)
    assert all(e.n_shots == 5 for e in mmlu.build(raw, words) if e.group != "astronomy")


def test_token_count_includes_bos_once():
    class Tok:
        bos_token_id = 1

        def __init__(self, adds_bos):
            self.adds_bos = adds_bos

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1] * self.adds_bos + [7] * len(t.split()) for t in texts]}

    assert encode(Tok(False), ["a b"]) == [[1, 7, 7]]
    assert encode(Tok(True), ["a b"]) == [[1, 7, 7]]


# ----------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("output, target, correct", [
    (" B", "B", True), ("\nB.", "B", True), ("B) Mercury", "B", True), (" C", "B", False), ("b", "B", False),
    ("", "B", False), (" (A) yes", "(A)", True), ("A", "(A)", False), (" 1,200 residents", "1,200", True),
    ("1200", "1,200", False), (" True\n\nFalse", "True", True)])
def test_starts_with_is_the_reference_rule(output, target, correct):
    assert starts_with(output, target) is correct


def test_stopping_at_a_blank_line_never_changes_a_starts_with_score():
    targets = ["A", "True", "(B)", "1,200", "the summer exhibit on ancient ships"]
    rng = random.Random(0)
    pieces = ["\n", "\n\n", " ", "A", "True", "(B)", "1,200", "the summer", " exhibit on ancient ships", "x"]
    for _ in range(2000):
        full = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        cut = next((full[:i] for i in range(1, len(full) + 1) if blank_line_after_answer(full[:i])), full)
        for t in targets:
            assert starts_with(cut, t) == starts_with(full, t), (full, cut, t)


def test_micro_and_macro_averages_differ_as_specified():
    records = [{"group": "a", "correct": c} for c in (True, True, True, False)] + \
              [{"group": "b", "correct": False}, {"group": "b", "correct": True}]
    assert micro(records)["score"] == pytest.approx(4 / 6)
    assert macro(records)["score"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert macro(records)["groups"]["a"] == {"score": 0.75, "n": 4, "correct": 3}


# ----------------------------------------------------------------------------------------------- BBH
def test_bbh_first_three_rows_are_the_shots_and_the_score_is_macro():
    raw = bbh.load(FIXTURES)
    examples = bbh.build(raw, words)
    counting = [e for e in examples if e.group == "object_counting"]
    assert [e.id for e in counting] == ["object_counting/3", "object_counting/4", "object_counting/5"]
    rows = raw["object_counting"]
    shots = "".join(f"{r['input']}\nAnswer: {r['target']}\n\n" for r in rows[:3])
    assert counting[0].prompt == shots + rows[3]["input"] + "\nAnswer:" and counting[0].target == "2"
    assert len([e for e in bbh.build(raw, words, limit=1)]) == 3  # limit: per subset
    assert bbh.TASK.aggregate is macro and bbh.TASK.max_new_tokens == 32 and len(bbh.SUBSETS) == 27


# ----------------------------------------------------------------------------------------------- DROP
def test_drop_keeps_only_questions_whose_spans_agree():
    kept = [r["query_id"] for r in drop.agreeing(drop.load(FIXTURES))]
    assert kept == ["q01", "q02", "q04", "q05", "q07", "q08", "q10", "q11", "q12", "q13", "q14"]


def test_drop_demonstrations_are_one_seeded_draw_and_their_passages_leave_the_test_set():
    rows = drop.agreeing(drop.load(FIXTURES))
    demos, test = drop.split_demos(rows, seed=0)
    random.seed(0)  # the reference: random.seed(0); random.sample(samples, k=3)
    assert [r["query_id"] for r in demos] == [r["query_id"] for r in random.sample(rows, k=3)]
    assert drop.split_demos(rows, seed=0) == (demos, test)
    assert not {r["passage"] for r in demos} & {r["passage"] for r in test}
    assert {r["query_id"] for r in test} == {r["query_id"] for r in rows
                                             if r["passage"] not in {d["passage"] for d in demos}}
    draws = {tuple(r["query_id"] for r in drop.split_demos(rows, seed=s)[0]) for s in range(5)}
    assert len(draws) > 1  # the seed matters


def test_drop_prompt_format_and_targets():
    raw = drop.load(FIXTURES)
    demos, test = drop.split_demos(drop.agreeing(raw), seed=0)
    ex = drop.build(raw, words)
    shots = "".join(f"{d['passage'].strip()} {d['question'].strip()}\nAnswer: {drop.answers(d)[0]}\n\n"
                    for d in demos)
    assert ex[0].prompt == shots + f"{test[0]['passage']} {test[0]['question']}\nAnswer:"
    assert [e.id for e in ex] == [r["query_id"] for r in test]
    assert [e.target for e in ex] == [drop.answers(r)[0] for r in test]
    q02 = next(r for r in raw if r["query_id"] == "q02")
    assert q02["answers_spans"]["spans"] == ["1952", "1952 "] and drop.answers(q02) == ["1952", "1952"]


# ----------------------------------------------------------------------------------------------- HumanEval
def test_humaneval_prompt_prefix_and_real_problems():
    problems = humaneval.load(None)
    examples = humaneval.build(problems)
    assert len(examples) == 164 and examples[0].id == "HumanEval/0"
    assert examples[0].prompt == ("Please complete the following Python code without providing any additional "
                                  "tasks such as testing or explanations\n") + problems[0]["prompt"]
    assert humaneval.TASK.temperature == 0.1 and humaneval.TASK.max_new_tokens == 512


def test_humaneval_completion_cuts():
    text = "\n\n   return x\n  y = 1\nprint(f(1))\n\ndef g():\n    pass"
    assert humaneval.fix_indents("   a\n  b\n c") == "    a\n  b\n  c"
    assert humaneval.postprocess(text) == "    return x\n  y = 1\nprint(f(1))"  # the reference's cut
    assert humaneval.postprocess(text, top_level=True) == "    return x\n  y = 1"
    assert humaneval.postprocess("    return 1\ndef helper():\n    pass", top_level=True) == "    return 1"
    nested = "    if x:\n        return 1\n    return 2"
    assert humaneval.postprocess(nested, top_level=True) == nested
    assert humaneval.postprocess("    return 1\nifx = 2", top_level=True) == "    return 1\nifx = 2"  # whole words
    for cut in ("top-level", "blank-line"):
        task = get_tasks(["humaneval"], humaneval_cut=cut)[0]
        for i in range(len(text) + 1):  # the stop rule fires exactly when the cut is final
            if task.stop(text[:i]):
                assert task.postprocess(text[:i]) == task.postprocess(text)


def test_humaneval_program_is_prompt_completion_tests_check():
    p = {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"}
    assert humaneval.program(p, "    return 1") == \
        "def f():\n    return 1\ndef check(c):\n    assert c() == 1\n\ncheck(f)\n"


# ----------------------------------------------------------------------------------------------- data, names
def test_local_folders_in_every_supported_format(tmp_path):
    rows = [{"input": "1 + 1 =", "target": "2"}] * 4
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "a.json").write_text(json.dumps(rows))
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bbh" / "b.parquet"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "bbh" / "c"))
    assert read_subsets(tmp_path / "bbh") == {"a": rows, "b": rows, "c": rows}
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "d"))
    assert read_split(tmp_path / "d", "validation") == rows
    with pytest.raises(EvalError, match="has no split 'train'"):
        read_split(tmp_path / "d", "train")


def test_hub_failure_is_clear_and_suggests_data_dir(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for task in (mmlu, drop):
        with pytest.raises(EvalError, match=r"could not be loaded from the hub.*save_to_disk.*--data-dir DIR"):
            task.load(None)
    with pytest.raises(EvalError, match="no mmlu/ folder"):
        mmlu.load(FIXTURES / "bbh")


def test_task_names_and_completion_files(tmp_path):
    with pytest.raises(EvalError, match="unknown task 'mmlu5'.*mmlu, bbh, drop, humaneval"):
        get_tasks("mmlu5,bbh")
    assert [t.name for t in get_tasks("bbh, mmlu,bbh")] == ["bbh", "mmlu"]
    path = tmp_path / "c.jsonl"
    path.write_text('{"task_id": "HumanEval/0", "completion": "x"}\n{"task_id": "HumanEval/0", "completion": "y"}\n')
    with pytest.raises(EvalError, match="line 2: second completion for HumanEval/0"):
        read_completions(str(path))
    path.write_text("not json\n")
    with pytest.raises(EvalError, match="line 1: expected a JSON object"):
        read_completions(str(path))
