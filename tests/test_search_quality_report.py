"""bench/search_quality.py's ``--anchor-rows``: the anchors' cells read back from an earlier report.

The study cache is not committed (18 MB), and the GP anchor's cells cost hours; the anchors do not depend on our
code, so a report after a change of our searchers takes their rows from the last committed report. These tests
pin that a printed row reads back as the figures it printed, and that only anchors' rows are taken.
"""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import search_quality as sq  # noqa: E402

pytestmark = pytest.mark.unit


def row(name, t, hits, n):
    return {"name": name, "t": t, "t25": 3.25, "t75": math.inf, "hits": hits, "n": n, "evals": 14.0,
            "marks": [0.9232, 0.92, 0.9201], "infeasible": 10.5, "util": 1.0,
            "champion": {"best": 0.9201, "mean": 0.9203}, "secs": 12.0}


def test_a_printed_anchor_row_reads_back_as_printed(tmp_path, capsys):
    print("# a comment line\nbudget 100, ...")
    print(sq.HEADER)
    sq.print_row("paper", 1, row("nomad-async", 10.3, 10, 10), None)
    sq.print_row("paper", 4, row("optuna-gp/cat", 5.08, 5, 5), None)
    sq.print_row("two_basins", 8, row("optuna-tpe-mv/ord", math.inf, 4, 10), None)
    print("\ntargets (issue 24):\n  [met] paper K=1: ...")
    report = tmp_path / "report.txt"
    report.write_text(capsys.readouterr().out)
    rows = sq.report_rows(report)
    assert set(rows) == {("paper", "optuna-gp", 4), ("two_basins", "optuna-tpe-mv", 8)}   # ours are not taken
    gp = rows["paper", "optuna-gp", 4]
    assert (gp["name"], gp["t"], gp["hits"], gp["n"], gp["infeasible"]) == ("optuna-gp/cat", 5.1, 5, 5, 10.5)
    assert gp["marks"] == [0.9232, 0.92, 0.9201] and gp["champion"] == {"best": 0.9201, "mean": 0.9203}
    assert math.isinf(rows["two_basins", "optuna-tpe-mv", 8]["t"]) and rows["two_basins", "optuna-tpe-mv", 8]["t25"] == 3.2


def test_the_committed_report_has_every_anchor_cell():
    rows = sq.report_rows(Path(__file__).resolve().parents[1] / "bench" / "data" / "search_quality_output.txt")
    assert {(name, algo, k) for name in sq.suite() for algo in sq.pe.ANCHORS for k in (1, 4, 8)} <= set(rows)


def test_a_file_without_a_report_table_gives_no_rows(tmp_path):
    (tmp_path / "x.txt").write_text("not a report\n")
    assert sq.report_rows(tmp_path / "x.txt") == {}


def test_anchor_rows_from_a_file_that_is_no_report_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("not a report\n")
    with pytest.raises(SystemExit) as exit:
        sq.main(["--anchor-rows", str(tmp_path / "x.txt"), "--landscapes", "paper", "--k", "1", "--seeds", "1"])
    assert exit.value.code == 2 and "no anchor row found" in capsys.readouterr().err
