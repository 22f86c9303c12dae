"""Reference equivalence: for fixed items, the prompt we build is the one InstructEval's code builds, and the
scoring of given outputs follows its rules (declare-lab/instruct-eval: mmlu.py, bbh.py, drop.py,
human_eval/main.py). The expected strings are written out by hand from the reference's format rules (quoted
in each test), never produced by our code.

    .venv/bin/python -m pytest tests/test_eval_reference.py -q      # no model; HumanEval runs the sandbox
"""
from pathlib import Path

import pytest

from evaluation.tasks import bbh, drop, get_tasks, humaneval, mmlu

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def words(texts):
    return [len(t.split()) + 1 for t in texts]  # short prompts: no shot is dropped


# ----------------------------------------------------------------------------------------------- MMLU
# gen_prompt: "The following are multiple choice questions (with answers) about {}.\n\n".format(format_subject(s))
# with format_subject = "".join(" " + w for w in s.split("_")); format_example: question, "\n{}. {}" per choice,
# "\nAnswer:", and for shots " {}\n\n".format(label).
MMLU_MATH_0 = (
    "The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
    "What is 7 + 5?\nA. 11\nB. 12\nC. 13\nD. 14\nAnswer: B\n\n"
    "What is 9 - 4?\nA. 5\nB. 4\nC. 6\nD. 3\nAnswer: A\n\n"
    "What is 3 x 4?\nA. 7\nB. 10\nC. 12\nD. 14\nAnswer: C\n\n"
    "What is 20 / 5?\nA. 5\nB. 3\nC. 2\nD. 4\nAnswer: D\n\n"
    "What is half of 18?\nA. 8\nB. 9\nC. 6\nD. 7\nAnswer: B\n\n"
    "What is 6 + 8?\nA. 12\nB. 13\nC. 14\nD. 15\nAnswer:")


def test_mmlu_prompts_and_labels():
    examples = {e.id: e for e in mmlu.build(mmlu.load(FIXTURES), words)}
    ex = examples["elementary_mathematics/0"]
    assert (ex.prompt, ex.target, ex.n_shots) == (MMLU_MATH_0, "C", 5)
    assert examples["elementary_mathematics/1"].prompt == MMLU_MATH_0.rsplit("What is 6 + 8?", 1)[0] + \
        "What is 10 - 3?\nA. 7\nB. 6\nC. 8\nD. 5\nAnswer:"


def test_mmlu_scoring_is_startswith_after_strip_and_the_micro_average():
    examples = [e for e in mmlu.build(mmlu.load(FIXTURES), words)]
    by_id = {e.id: e for e in examples}
    # cor = pred.strip().startswith(label); the average is np.mean(np.concatenate(all_cors)): over questions
    outputs = {"astronomy/0": " A", "astronomy/1": "C.", "astronomy/2": "\nA", "elementary_mathematics/0": " C) 14",
               "elementary_mathematics/1": " a", "elementary_mathematics/2": "B", "high_school_geography/0": "",
               "high_school_geography/1": " C"}
    expected = {"astronomy/0": True, "astronomy/1": True, "astronomy/2": False, "elementary_mathematics/0": True,
                "elementary_mathematics/1": False, "elementary_mathematics/2": True,
                "high_school_geography/0": False, "high_school_geography/1": True}
    assert [by_id[k].target for k in outputs] == ["A", "C", "B", "C", "A", "B", "B", "C"]
    chosen = [by_id[k] for k in outputs]
    records = mmlu.TASK.score(chosen, list(outputs.values()))
    assert {r["id"]: r["correct"] for r in records} == expected
    summary = mmlu.TASK.aggregate(records)
    assert summary["score"] == pytest.approx(5 / 8) and summary["average"] == "micro"  # not (2/3+2/3+1/2)/3


# ----------------------------------------------------------------------------------------------- BBH
# BBHSample.as_prompt: input + "\nAnswer:" (+ " {}\n\n".format(target) for shots); shots = samples[:3],
# evaluated = samples[3:]; score per subset = mean(is_correct); the result = mean over subsets.
BBH_BOOL_3 = ("not ( True ) and ( True ) is\nAnswer: False\n\n"
              "True and not not ( not False ) is\nAnswer: True\n\n"
              "not True or ( False and True ) is\nAnswer: False\n\n"
              "False or not ( True ) is\nAnswer:")


def test_bbh_prompts_and_the_macro_average():
    examples = bbh.build(bbh.load(FIXTURES), words)
    by_id = {e.id: e for e in examples}
    assert (by_id["boolean_expressions/3"].prompt, by_id["boolean_expressions/3"].target) == (BBH_BOOL_3, "False")
    assert by_id["object_counting/5"].prompt.endswith(
        "I have a dog, a cat, and two fish. How many animals do I have?\nAnswer: 4\n\n"
        "I have a goat. How many animals do I have?\nAnswer:")
    outputs = {"boolean_expressions/3": " False\n\nQ", "boolean_expressions/4": "True", "boolean_expressions/5": "no",
               "boolean_expressions/6": "True", "boolean_expressions/7": " False.", "object_counting/3": " 2 vehicles",
               "object_counting/4": "four", "sports_understanding/3": " no"}
    records = bbh.TASK.score([by_id[k] for k in outputs], list(outputs.values()))
    assert [r["correct"] for r in records] == [True, True, False, True, True, True, False, True]
    # boolean 4/5, counting 1/2, sports 1/1: macro (0.8 + 0.5 + 1) / 3, not the micro 6/8
    assert bbh.TASK.aggregate(records)["score"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)


# ----------------------------------------------------------------------------------------------- DROP
# filter_dataset keeps samples with len(set(stripped spans)) == 1; train_test_split: random.seed(0);
# random.sample(samples, k=3) - on the fixture that draws q10, q14, q01 - and the test set drops every sample
# sharing a passage with them (q04, q05, q07, q08 remain); as_prompt: passage.strip() + " " +
# question.strip() + "\nAnswer:" (+ " {answer}\n\n" for shots).
DROP_DEMOS = (
    "Maria planted 25 apple trees and 15 pear trees in spring. Six of the pear trees did not survive the winter, so "
    "she replaced them with cherry trees. How many pear trees survived the winter?\nAnswer: 9\n\n"
    "The bridge was built in 1887 and repaired in 1931. A second bridge, made of steel, opened downstream in 1964 "
    "and carried trains until 1999. How many years after it was built was the first bridge repaired?\nAnswer: 44\n\n"
    "The town of Alder had 1,200 residents in 1900. By 1950 the population had grown to 3,400, and a new school "
    "opened in 1952 with 300 pupils. How many residents did Alder have in 1900?\nAnswer: 1,200\n\n")
DROP_Q04 = DROP_DEMOS + (
    "In the match, the Rovers scored first with a 12-yard run by Tom Hale. The Hawks answered with two field goals by "
    "Max Reed, from 40 and 35 yards, before halftime. Who scored the first touchdown?\nAnswer:")


def test_drop_prompts_test_set_and_scoring():
    examples = drop.build(drop.load(FIXTURES), words)
    assert [e.id for e in examples] == ["q04", "q05", "q07", "q08"]
    assert (examples[0].prompt, examples[0].target) == (DROP_Q04, "Tom Hale")
    # pred = model.run(prompt).strip(); is_correct = pred.startswith(label)
    outputs = [" Tom Hale scored", "two", "11,000\n\nThe", " The summer exhibit on ancient ships"]
    records = drop.TASK.score(examples, outputs)
    assert [r["correct"] for r in records] == [True, False, True, False]  # "2" is not "two"; case matters
    assert drop.TASK.aggregate(records)["score"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------- HumanEval
PREFIX = ("Please complete the following Python code without providing any additional tasks such as testing or "
          "explanations\n")


def test_humaneval_prompt_is_the_prefix_and_the_problem():
    problems = humaneval.load(None)
    for ex, p in zip(humaneval.build(problems, limit=3), problems):
        assert ex.prompt == PREFIX + p["prompt"]


# Generated texts for HumanEval/2 (truncate_number) and HumanEval/0 (has_close_elements). The reference keeps
# fix_indents(text).lstrip("\n").split("\n\n")[0]; the top-level cut also stops before a top-level
# def/class/if/print line. Expected completions and verdicts are written out per cut.
GENERATED = [  # (problem index, generated text, completion (blank-line), passes, completion (top-level), passes)
    (2, "    return number % 1.0\n", "    return number % 1.0\n", True, "    return number % 1.0\n", True),
    (2, "   return number % 1.0\n\nprint('x')", "    return number % 1.0", True, "    return number % 1.0", True),
    (2, "\n\n    return number % 1.0\nif __name__ == '__main__':\n    print(truncate_number(3.5",  # budget ran out
     "    return number % 1.0\nif __name__ == '__main__':\n    print(truncate_number(3.5", False,
     "    return number % 1.0", True),
    (0, "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
        "print(has_close_elements([1.0, 2.0], 0.5)",
     "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
     "print(has_close_elements([1.0, 2.0], 0.5)", False,
     "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])", True),
    (0, "    return _close(numbers, threshold)\ndef _close(xs, t):\n"
        "    return any(abs(a - b) < t for i, a in enumerate(xs) for b in xs[i + 1:])\n",
     "    return _close(numbers, threshold)\ndef _close(xs, t):\n"
     "    return any(abs(a - b) < t for i, a in enumerate(xs) for b in xs[i + 1:])\n", True,
     "    return _close(numbers, threshold)", False),  # the top-level cut drops the helper it calls
    (2, "    return number\n", "    return number\n", False, "    return number\n", False),
]


@pytest.mark.parametrize("cut, column", [("blank-line", 2), ("top-level", 4)])
def test_humaneval_pass_at_1_of_given_completions_under_each_cut(cut, column):
    problems = humaneval.load(None)
    examples = humaneval.build(problems, limit=3)
    task = get_tasks(["humaneval"], humaneval_cut=cut)[0]
    chosen = [examples[row[0]] for row in GENERATED]
    completions = [task.postprocess(row[1]) for row in GENERATED]
    assert completions == [row[column] for row in GENERATED]
    records = task.score(chosen, completions, workers=2)
    assert [r["correct"] for r in records] == [row[column + 1] for row in GENERATED], records
    expected = sum(row[column + 1] for row in GENERATED) / len(GENERATED)  # pass@1, one sample per problem
    assert task.aggregate(records)["score"] == pytest.approx(expected)


def test_the_default_cut_is_the_references():
    assert [humaneval.make().postprocess(row[1]) for row in GENERATED] == [row[2] for row in GENERATED]
