"""The search space: paper defaults, encodings and their round trips, validation messages."""
import math

import numpy as np
import pytest

from orchestrator.search.space import SearchSpace, SpaceError, paper_space

pytestmark = pytest.mark.unit

PAPER = {
    "r": {"choice": [4, 8, 16, 32, 64, 128, 256, 512], "default": 8},
    "alpha": {"int": [1, 64], "default": 32},
    "dropout": {"choice": [0, 1e-4, 1e-3, 1e-2, 1e-1, 1], "default": 0.1},
    "lr": {"log": [1e-6, 1e-3], "default": 1e-5},
}


def test_paper_space_defaults_and_nomad_problem():
    space = paper_space()
    assert space.default_point() == {"r": 8, "alpha": 32, "dropout": 0.1, "lr": 1e-5}
    assert space.names == ["r", "alpha", "dropout", "lr"]   # the paper's table and figures...
    assert space.nomad_x0() == [2, 5, 32, -5.0]             # ...NOMAD: the authors' order and X0
    assert space.nomad_input_types() == ["I", "I", "I", "R"]
    assert space.nomad_bounds() == ([1, 1, 1, -6.0], [8, 6, 64, -3.0])


def test_paper_space_tpe_search_space():
    assert paper_space().tpe_search_space() == {
        "r": {"_type": "choice", "_value": [4, 8, 16, 32, 64, 128, 256, 512]},
        "alpha": {"_type": "uniform", "_value": [1, 64]},
        "dropout": {"_type": "choice", "_value": [0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]},
        "lr_log10": {"_type": "uniform", "_value": [-6.0, -3.0]},
    }


def test_from_dict_with_fixed_values_passes_them_through():
    space = SearchSpace.from_dict({**PAPER, "epochs": {"fixed": 2},
                                   "target_modules": {"fixed": ["q_proj", "v_proj"]}})
    point = space.from_nomad([8, 64, 1, -3.3])
    assert point["epochs"] == 2 and point["target_modules"] == ["q_proj", "v_proj"]
    assert space.names == ["r", "alpha", "dropout", "lr"]
    assert space.contains(point) and space.contains(space.default_point())
    assert not space.contains({**point, "epochs": 3})
    assert space.from_tpe(space.to_tpe(point)) == point


def test_nomad_round_trip_and_python_types():
    space, rng = paper_space(), np.random.default_rng(0)
    for _ in range(200):
        point = space.sample(rng)
        assert space.contains(point)
        back = space.from_nomad(space.to_nomad(point))
        assert back["r"] == point["r"] and back["alpha"] == point["alpha"]
        assert back["dropout"] == point["dropout"] and math.isclose(back["lr"], point["lr"], rel_tol=1e-12)
        assert space.key(back) == space.key(point)
        assert [type(back[k]) for k in ("r", "alpha", "dropout", "lr")] == [int, int, float, float]


def test_from_nomad_rounds_and_clips():
    space = paper_space()   # NOMAD vectors: (r index, dropout index, alpha, log10 lr)
    assert space.from_nomad([8.4, 0.2, 0.6, -2.5]) == {"r": 512, "alpha": 1, "dropout": 0.0, "lr": 1e-3}
    assert list(space.from_nomad([8.4, 0.2, 0.6, -2.5])) == ["r", "alpha", "dropout", "lr"]
    assert space.from_nomad([1.0, 6.0, 64.0, -6.0])["lr"] == pytest.approx(1e-6)


def test_tpe_round_trip_truncates_alpha_and_clips():
    space = paper_space()
    point = space.from_tpe({"r": 512, "alpha": 63.99, "dropout": 0.0, "lr_log10": -3.3})
    assert point["alpha"] == 63 and point["lr"] == pytest.approx(10 ** -3.3)
    assert space.from_tpe({"r": 4, "alpha": 64.5, "dropout": 1.0, "lr_log10": -2.0})["alpha"] == 64
    assert space.to_tpe(point) == {"r": 512, "alpha": 63.0, "dropout": 0.0, "lr_log10": pytest.approx(-3.3)}
    assert space.from_tpe(space.to_tpe(point)) == point


def test_key_is_stable_and_tolerates_float_jitter():
    space = paper_space()
    a = space.from_nomad([3, 2, 10, -4.2])
    b = space.from_nomad([3, 2, 10, -4.2 + 1e-12])
    c = space.from_nomad([3, 2, 10, -4.2 + 1e-6])
    assert space.key(a) == space.key(b) != space.key(c)
    assert space.key(space.default_point()) == "r=8,alpha=32,dropout=0.1,lr=10^-5.000000000"


def test_a_space_declared_like_the_paper_keeps_its_declaration_order_for_nomad():
    space = SearchSpace.from_dict(PAPER)
    assert space.nomad_x0() == [2, 32, 5, -5.0] and space.from_nomad([2, 32, 5, -5.0]) == space.default_point()
    with pytest.raises(SpaceError, match="must list each of"):
        SearchSpace(space.dims, nomad_order=("r", "alpha", "lr"))


def test_contains_rejects_points_outside():
    space, p = paper_space(), paper_space().default_point()
    assert not space.contains({**p, "r": 5})
    assert not space.contains({**p, "alpha": 65})
    assert not space.contains({**p, "alpha": 3.5})
    assert not space.contains({**p, "lr": 2e-3})
    assert not space.contains({k: v for k, v in p.items() if k != "lr"})
    assert not space.contains({**p, "extra": 1})


def test_numeric_strings_from_yaml_are_numbers():
    space = SearchSpace.from_dict({"lr": {"log": ["1e-6", "1e-3"], "default": "1e-5"}})
    assert space.default_point() == {"lr": 1e-5}


@pytest.mark.parametrize("key, spec, words", [
    ("r", {"categorical": [4, 8], "default": 4}, "unknown key"),
    ("r", {"choice": [4, 8], "int": [1, 2], "default": 4}, "exactly one kind"),
    ("r", {"default": 4}, "exactly one kind"),
    ("r", {"choice": [], "default": 4}, "non-empty"),
    ("r", {"choice": [8, 4], "default": 4}, "strictly increasing"),
    ("r", {"choice": [4, 4, 8], "default": 4}, "strictly increasing"),
    ("r", {"choice": [4, "big"], "default": 4}, "must be a number"),
    ("r", {"choice": [4, 8], "default": 5}, "not one of the choices"),
    ("r", {"choice": [4, 8]}, "missing 'default'"),
    ("alpha", {"int": [64, 1], "default": 32}, "low >= high"),
    ("alpha", {"int": [1, 1], "default": 1}, "low >= high"),
    ("alpha", {"int": [1.5, 64], "default": 32}, "must be integers"),
    ("alpha", {"int": [1], "default": 1}, "[low, high]"),
    ("alpha", {"int": [1, 64], "default": 65}, "not an integer in [1, 64]"),
    ("alpha", {"int": [1, 64], "default": 2.5}, "not an integer in [1, 64]"),
    ("lr", {"log": [0, 1e-3], "default": 1e-5}, "must be > 0"),
    ("lr", {"log": [-1e-6, 1e-3], "default": 1e-5}, "must be > 0"),
    ("lr", {"log": [1e-3, 1e-6], "default": 1e-5}, "low >= high"),
    ("lr", {"log": [1e-6, 1e-3], "default": 1e-2}, "outside"),
    ("lr", {"log": [1e-6, float("nan")], "default": 1e-5}, "finite"),
    ("lr", {"log": [1e-6, 1e-3], "default": True}, "must be a number"),
    ("epochs", {"fixed": 2, "default": 2}, "takes no default"),
    ("epochs", 2, "expected a mapping"),
])
def test_invalid_entries_name_the_key_and_the_fix(key, spec, words):
    with pytest.raises(SpaceError) as err:
        SearchSpace.from_dict({**PAPER, key: spec})
    message = str(err.value)
    assert f"space.{key}" in message and words in message and ";" in message
    assert "\n" not in message


@pytest.mark.parametrize("d, words", [
    ({}, "expected a mapping"),
    ([("r", 1)], "expected a mapping"),
    ({"epochs": {"fixed": 2}}, "nothing to search"),
    ({"learning-rate": {"log": [1e-6, 1e-3], "default": 1e-5}}, "not an identifier"),
    ({**PAPER, "lr_log10": {"fixed": 1}}, "space.lr_log10"),
])
def test_invalid_spaces(d, words):
    with pytest.raises(SpaceError, match="space") as err:
        SearchSpace.from_dict(d)
    assert words in str(err.value)


def test_space_error_is_a_value_error():
    assert issubclass(SpaceError, ValueError)
