"""The study plots: files written for every shape of study, axes from the search space, artifacts logged."""
import math
import subprocess
import sys

import pytest

from orchestrator.study.journal import StudyState, TrialState
from orchestrator.reports.plots import write_plots
from orchestrator.reports.view import axes_of, view_of

from .conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FILES = {f"{name}.{ext}" for name in ("history", "history_time", "parallel", "params") for ext in ("png", "html")}


def trial(i, status="ok", value=None, **point):
    point = point or {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-5}
    reason = "out of memory" if status == "failed" else None
    return TrialState(i, point, status=status, value=value, reason=reason, summary={"total_s": 60})


def state(*trials, space=None, study="demo", algo="nomad"):
    config = {"study": study, "algo": algo, "space": space or {}}
    return StudyState(config=config, parent_run_id="p", trials={t.trial: t for t in trials})


def paper_trials():
    points = [dict(r=8, alpha=32, dropout=0.1, lr=1e-5), dict(r=512, alpha=64, dropout=0, lr=4.8e-4),
              dict(r=4, alpha=1, dropout=1, lr=1e-6), dict(r=64, alpha=16, dropout=1e-3, lr=1e-4)]
    return [trial(0, value=1.1672, **points[0]), trial(1, value=0.9607, **points[1]),
            trial(2, "failed", **points[2]), trial(3, value=1.05, **points[3]), trial(4, None, **points[0])]


def assert_files(paths, folder, title_bits=()):
    assert {p.name for p in paths} == FILES and all(p.parent == folder for p in paths)
    for p in paths:
        data = p.read_bytes()
        if p.suffix == ".png":
            assert data.startswith(PNG_MAGIC) and len(data) > 5000, p
        else:
            text = data.decode()
            # self-contained: plotly.js is inlined, no script is fetched from a CDN
            assert "Plotly.newPlot" in text and "<script src=" not in text and len(text) > 1_000_000, p
            for bit in title_bits:
                assert bit in text, (p, bit)


def test_paper_space_axes_are_the_papers_figure_axes():
    axes = axes_of(state(*paper_trials()))
    assert [a.label for a in axes] == ["r (log2)", "alpha", "dropout (ordinal)", "log10 lr"]
    r, alpha, dropout, lr = axes
    assert (r.lo, r.hi) == (2, 9) and r.at({"r": 512}) == 9 and [s for _, s in r.ticks][0] == "4"
    assert (alpha.lo, alpha.hi) == (1, 64)
    assert dropout.at({"dropout": 0}) == 0 and dropout.at({"dropout": 1}) == 5 and dropout.at({"dropout": 0.5}) != 0.5
    assert math.isnan(dropout.at({"dropout": 0.5}))  # off the grid: not drawn rather than drawn wrong
    assert lr.at({"lr": 1e-4}) == pytest.approx(-4) and [s for _, s in lr.ticks] == ["1e-6", "1e-5", "1e-4", "1e-3"]


def test_view_counts_best_so_far_and_default():
    v = view_of(state(*paper_trials()))
    assert [t.trial for t in v.ok] == [0, 1, 3] and [t.trial for t in v.failed] == [2] and v.running == 1
    assert v.default.trial == 0  # r=8 alpha=32 dropout=0.1 lr=1e-5 is the paper's default point
    assert "4 evaluations, 1 failed, 1 running" in v.title and "best 0.9607 (trial 1)" in v.title
    from orchestrator.reports.view import best_so_far
    assert best_so_far(v) == ([0, 1, 3], [1.1672, 0.9607, 0.9607])


def test_a_study_with_successes_failures_and_running_trials(tmp_path):
    paths = write_plots(state(*paper_trials()), tmp_path / "plots")
    assert_files(paths, tmp_path / "plots", ["demo (nomad)", "failed"])
    assert "r (log2)" in (tmp_path / "plots" / "parallel.html").read_text()


@pytest.mark.parametrize("case", ["empty", "no-config", "all-failed", "one-ok", "only-running", "one-failed"])
def test_edge_cases_still_write_every_file(tmp_path, case):
    s = {"empty": state(),
         "no-config": StudyState(),
         "all-failed": state(trial(0, "failed"), trial(1, "failed", r=16, alpha=2, dropout=0, lr=1e-3)),
         "one-ok": state(trial(0, value=1.2)),
         "only-running": state(trial(0, None)),
         "one-failed": state(trial(0, "failed"))}[case]
    assert_files(write_plots(s, tmp_path), tmp_path)


def test_custom_space_with_other_names_and_fixed_values(tmp_path):
    space = {"width": {"int": [16, 256], "default": 64}, "depth": {"choice": [1, 3, 5], "default": 3},
             "wd": {"log": [1e-5, 1e-1], "default": 1e-3}, "heads": {"choice": [4], "default": 4},
             "epochs": {"fixed": 2}}
    trials = [trial(i, value=2.0 - i / 10, width=16 * (i + 1), depth=[1, 3, 5][i % 3], wd=10 ** -(i % 4 + 1),
                    heads=4, epochs=2) for i in range(5)]
    s = state(*trials, space=space, study="custom", algo="tpe")
    axes = axes_of(s)
    assert [a.label for a in axes] == ["width", "depth (ordinal)", "log10 wd", "heads (log2)"]
    heads = axes[3]
    assert heads.lo < heads.at({"heads": 4}) < heads.hi  # a single-valued axis is padded, not divided by zero
    assert_files(write_plots(s, tmp_path), tmp_path, ["custom (tpe)"])
    for name in ("parallel.html", "params.html"):
        text = (tmp_path / name).read_text()
        assert "log10 wd" in text and "heads (log2)" in text and "epochs=" not in text


def test_points_that_match_no_space_get_inferred_axes(tmp_path):
    trials = [trial(i, value=1.0 + i, x=i, scale=10.0 ** (i - 3), tag="a", flag=True) for i in range(4)]
    trials.append(trial(4, value=0.5, x=2, scale=10.0, tag="b", flag=False))
    axes = axes_of(state(*trials))  # the config says paper space, the points say otherwise
    assert [a.label for a in axes] == ["x", "log10 scale"]
    assert_files(write_plots(state(*trials), tmp_path), tmp_path)


def test_the_tracker_puts_them_under_plots_of_the_parent_run(tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestrator.tracking.tracker import Tracker
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("plots", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp).info.run_id
    for trials in (paper_trials(), paper_trials()[:2]):  # a later drawing replaces the first
        write_plots(state(*trials), tmp_path / "plots")
        tracker = Tracker(uri, "plots", tmp_path / "outbox.jsonl", "t")
        tracker.log_artifacts_of(tmp_path / "plots", "plots", key=f"run:{run_id}", run_id=run_id)
        assert tracker.close(wait_s=60), tracker.status()
        assert {a.path for a in client.list_artifacts(run_id, "plots")} == {f"plots/{f}" for f in FILES}


def test_a_drawing_that_fails_warns_instead_of_stopping_the_study(tmp_path):
    from orchestrator.reports.plots import draw_plots

    broken = state(*paper_trials())
    broken.trials = None  # not a study state any more
    with pytest.warns(UserWarning, match="study plots not drawn"):
        assert draw_plots(broken, tmp_path) == []


def test_drawing_needs_no_torch_and_no_pyplot(tmp_path):
    script = ("import sys\n"
              "from orchestrator.reports.plots import write_plots\n"
              "from tests.test_plots import state, paper_trials\n"
              f"write_plots(state(*paper_trials()), r'{tmp_path}')\n"
              "print('LOADED', [m for m in ('torch', 'transformers', 'matplotlib.pyplot') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


def test_command_line_writes_the_plots_of_a_study_folder(tmp_path):
    from orchestrator.study.journal import Journal
    journal = Journal(tmp_path / "study" / "journal.jsonl")
    journal.append("start", config={"study": "study", "algo": "random", "space": {}}, parent_run_id="p")
    journal.append("trial", trial=0, point={"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-5})
    journal.append("result", trial=0, status="ok", value=1.2, summary={})
    out = subprocess.run([sys.executable, "-m", "orchestrator", "plots", "--study", "study", "--workdir",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {p.split("/")[-1] for p in out.stdout.split()} == FILES
    assert (tmp_path / "study" / "plots" / "history.png").exists()


def test_the_wall_time_history_places_each_result_at_its_hour():
    trials = paper_trials()
    s = state(*trials)
    s.started_at = 1000.0
    for k, t in enumerate(trials):
        t.finished_at = 1000.0 + 1800.0 * (len(trials) - k)  # later trials finished earlier (parallel slots)
    v = view_of(s).by_hours()
    assert v.x_label == "hours since the study started"
    assert [v.x(t) for t in v.ok] == [2.5, 2.0, 1.0]
    xs, ys = __import__("orchestrator.reports.view", fromlist=["best_so_far"]).best_so_far(v)
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # best-so-far in the order results came
