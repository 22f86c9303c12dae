"""NOMAD's own parameters pass through and are checked by NOMAD itself, in a short run in a subprocess (a bad
parameter would crash the orchestrator's process): not in the unit tier for that subprocess.

    .venv/bin/python -m pytest -q tests/test_nomad_options.py
"""
import pytest

from .test_searchers import build, drive

pytestmark = pytest.mark.timeout(120)


def test_nomad_options_pass_through_and_are_checked():
    searcher = build("nomad-paper", budget=12, parallel=4, MEGA_SEARCH_POLL=True, NM_SEARCH=False)
    told, _ = drive(searcher, parallel=4)
    searcher.close()
    assert len(told) == 12
    with pytest.raises(ValueError, match="DIRECTION_TYPE"):
        build("nomad", DIRECTION_TYPE="SIDEWAYS")
    with pytest.raises(ValueError, match="Unknown parameter"):
        build("nomad", NOT_A_NOMAD_PARAMETER=3)
    with pytest.raises(ValueError, match="MAX_BB_EVAL is set by the searcher"):
        build("nomad", MAX_BB_EVAL=10)
    with pytest.raises(ValueError, match="not a NOMAD parameter name"):
        build("nomad", direction_type="ORTHO 2N")
