"""The modern search space (`space: modern`): categorical and boolean dimensions, how each searcher encodes them,
every value reaching the fine-tune's spec, and the contract of every searcher on it (real NOMAD, NNI, Optuna)
with resume, warm start and constraints."""
import json
import math

import numpy as np
import pytest

from orchestrator.config import ConfigError, load_config, space_to_dict
from orchestrator.search.category import label
from orchestrator.search.criteria import Judge
from orchestrator.search.landscapes import modern_landscape, modern_optimum
from orchestrator.search.searchers import Observation, Pending, make_searcher
from orchestrator.search.space import SearchSpace, SpaceError, modern_space

from .drive import drive as drive_searcher

pytestmark = pytest.mark.timeout(120)

SPACE = modern_space()
PROFILES = {"nomad-paper": ("nomad", {"profile": "paper"}), "nomad-async": ("nomad", {"profile": "async"})}
LEARNING = ("nomad-paper", "nomad-async", "tpe", "random")
TYPES = {"r": int, "alpha_ratio": float, "dropout": float, "lr": float, "use_rslora": bool, "use_dora": bool,
         "epochs": int, "warmup_ratio": float, "weight_decay": float, "effective_batch": int}


def build(algo, budget=30, parallel=1, seed=0, n_objectives=1, kinds=()):
    algo, profile = PROFILES.get(algo, (algo, {}))
    return make_searcher(algo, SPACE, budget=budget, parallel=parallel, seed=seed, options=profile,
                         n_objectives=n_objectives, constraints=kinds)


def drive(searcher, parallel=1, stop_after=None, running=(), constraint=None, objective=modern_landscape):
    """tests/drive.py's loop: the told (suggestion, value) pairs and the suggestions still pending."""
    told, pending = drive_searcher(searcher, lambda p: (objective(p), [constraint(p)] if constraint else None),
                                   parallel, stop_after, running)
    return [(s, value) for s, value, _ in told], pending


def keys(suggestions):
    return [SPACE.key(s.point) for s in suggestions]


# ------------------------------------------------------------------------------------------- the dimension
@pytest.mark.unit
def test_category_encodings_round_trip_in_the_declared_order():
    dim = next(d for d in SPACE.dims if d.name == "target_modules")
    assert dim.labels == ("q_proj+v_proj", "attention", "all-linear")
    assert [dim.to_nomad(v) for v in (["q_proj", "v_proj"], "attention", "all-linear")] == [1, 2, 3]
    assert dim.from_nomad(0.6) == ["q_proj", "v_proj"] and dim.from_nomad(7) == "all-linear"
    assert dim.tpe() == ("target_modules", {"_type": "choice", "_value": ["q_proj+v_proj", "attention", "all-linear"]})
    assert dim.from_tpe({"target_modules": "q_proj+v_proj"}) == ["q_proj", "v_proj"]
    boolean = next(d for d in SPACE.dims if d.name == "use_dora")
    assert boolean.contains(True) and not boolean.contains(1) and not boolean.contains("yes")
    assert (boolean.to_nomad(False), boolean.to_nomad(True)) == (1, 2)
    assert SPACE.nomad_input_types() == ["I", "I", "I", "R", "I", "I", "I", "I", "I", "I", "I"]


@pytest.mark.unit
def test_default_point_and_every_encoding_round_trip():
    point = SPACE.default_point()
    assert point["target_modules"] == "all-linear" and point["use_dora"] is False
    rng = np.random.default_rng(0)
    for p in [point] + [SPACE.sample(rng) for _ in range(50)]:
        assert SPACE.contains(p)
        assert SPACE.key(SPACE.from_nomad(SPACE.to_nomad(p))) == SPACE.key(p)
        assert SPACE.key(SPACE.from_tpe(SPACE.to_tpe(p))) == SPACE.key(p)
        assert isinstance(p["target_modules"], (str, list))


@pytest.mark.unit
@pytest.mark.parametrize("spec,words", [
    ({"category": [], "default": 1}, "non-empty list"),
    ({"category": ["a", "a"], "default": "a"}, "repeat"),
    ({"category": ["a", "b"], "default": "c"}, "default 'c' is not one of"),
    ({"category": [{"x": 1}], "default": 1}, "not a string, boolean"),
    ({"category": [False, True]}, "missing 'default'"),
])
def test_invalid_categories_name_the_key_and_the_fix(spec, words):
    with pytest.raises(SpaceError, match=words) as e:
        SearchSpace.from_dict({"x": spec})
    assert "space.x" in str(e.value)


# ------------------------------------------------------------------------------------------- the study config
def _config(tmp_path, text):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return load_config(str(path), workdir=str(tmp_path / "runs"))


def test_space_modern_reaches_every_spec_field_and_survives_the_journal(tmp_path):
    config = _config(tmp_path, "space: modern\ntrial: {per_device_batch: 8}\n")
    assert config.space == SPACE
    point = {**SPACE.default_point(), "r": 64, "alpha_ratio": 0.5, "target_modules": ["q_proj", "v_proj"],
             "use_rslora": True, "use_dora": True, "epochs": 3, "warmup_ratio": 0.1, "weight_decay": 0.01,
             "effective_batch": 32}
    spec = config.trial_spec(point, out=str(tmp_path / "t"))
    assert (spec.r, spec.alpha, spec.target_modules, spec.use_rslora, spec.use_dora) == \
        (64, 32.0, ["q_proj", "v_proj"], True, True, )
    assert (spec.epochs, spec.warmup_ratio, spec.weight_decay, spec.grad_accum) == (3, 0.1, 0.01, 4)
    # the journaled config (plain YAML/JSON) rebuilds the same space on resume and for warm starts
    stored = json.loads(json.dumps(config.to_dict(), default=str))  # as the journal writes it
    assert SearchSpace.from_dict(stored["space"]) == SPACE == SearchSpace.from_dict(space_to_dict(SPACE))


def test_a_value_the_fine_tune_refuses_is_a_config_error_naming_the_dimension(tmp_path):
    # per_device_batch 32 divides the default effective batch (128) but not the smallest (16): refused before
    # anything runs, naming the dimension and the value
    with pytest.raises(ConfigError, match="space.effective_batch': value 16 .*per_device_batch=32"):
        _config(tmp_path, "space: modern\ntrial: {per_device_batch: 32}\n")
    with pytest.raises(ConfigError, match="'space'.*'ancient' is not a named space.*paper, modern"):
        _config(tmp_path, "space: ancient\n")


def test_trainable_params_constraints_are_checked_before_submission_on_categorical_points(tmp_path):
    config = _config(tmp_path, "space: modern\ntrial: {per_device_batch: 8}\n"
                               "constraints: [{metric: trainable_params, max: 5.0e+5, kind: eb}]\n")
    judge = Judge(config)
    small = {**SPACE.default_point(), "r": 4, "target_modules": ["q_proj", "v_proj"]}
    large = {**small, "r": 256, "target_modules": "all-linear"}
    (prior_small, why_small), (prior_large, why_large) = judge.before(small), judge.before(large)
    assert why_small is None and why_large.startswith("infeasible before training: trainable_params")
    # the tiny Llama: 2 layers, hidden 128, MLP 344; DoRA adds one magnitude per output feature
    assert prior_small["trainable_params"] == 2 * 4 * (256 + 256)
    assert prior_large["trainable_params"] == 2 * 256 * (4 * 256 + 2 * (128 + 344) + (344 + 128))
    dora = judge.before({**small, "use_dora": True})[0]["trainable_params"]
    assert dora == prior_small["trainable_params"] + 2 * (128 + 128)


# ------------------------------------------------------------------------------------------- searchers
@pytest.mark.parametrize("algo", LEARNING + ("default",))
def test_points_are_in_the_space_with_python_types(algo):
    searcher = build(algo, budget=25)
    told, _ = drive(searcher)
    searcher.close()
    assert len(told) == (25 if algo != "default" else 1)
    assert len(set(keys([s for s, _ in told]))) == len(told)
    for s, _ in told:
        assert SPACE.contains(s.point)
        assert {k: type(s.point[k]) for k in TYPES} == TYPES
        assert s.point["target_modules"] in (["q_proj", "v_proj"], "attention", "all-linear")


@pytest.mark.parametrize("algo", LEARNING)
def test_every_category_is_explored(algo):
    searcher = build(algo, budget=40)
    told, _ = drive(searcher)
    searcher.close()
    for name in ("target_modules", "use_rslora", "use_dora"):
        seen = {label(s.point[name]) for s, _ in told}
        assert len(seen) >= 2, f"{algo} never moved {name} off {seen}"


@pytest.mark.parametrize("algo,k", [("nomad-paper", 1), ("nomad-async", 3), ("tpe", 3), ("random", 2)])
def test_resume_adopts_running_trials_and_never_repeats_a_point(algo, k):
    first = build(algo, budget=20, parallel=k)
    told, pending = drive(first, parallel=k, stop_after=8)
    first.close()
    resumed = build(algo, budget=20, parallel=k)
    adopted = resumed.replay([Observation(s.point, v, s.trial_id) for s, v in told],
                             [Pending(s.point, s.trial_id) for s in pending])
    assert [s.trial_id for s in adopted] == [s.trial_id for s in pending]
    more, left = drive(resumed, parallel=k, running=adopted)
    resumed.close()
    everything = [s for s, _ in told + more]
    assert not left and len(everything) == 20 and len(set(keys(everything))) == 20


@pytest.mark.parametrize("algo", ("nomad-paper", "nomad-async", "tpe"))
def test_warm_start_is_learned_and_its_points_never_proposed(algo):
    rng = np.random.default_rng(3)
    warm = [Observation(p, modern_landscape(p), trial_id=k) for k, p in enumerate(SPACE.sample(rng) for _ in range(20))]
    cold = build(algo)
    first_cold = cold.ask()
    cold.close()
    searcher = build(algo, budget=15)
    searcher.warm_start(warm)
    told, _ = drive(searcher)
    searcher.close()
    assert told[0][0].point != first_cold.point
    assert len(told) == 15 and not set(keys([s for s, _ in told])) & {SPACE.key(o.point) for o in warm}


@pytest.mark.parametrize("algo", ("nomad-paper", "nomad-async", "tpe"))
def test_a_constraint_on_a_boolean_steers_the_search_off_it(algo):
    # the objective favours DoRA; an extreme barrier forbids it: each learner then leaves it (NOMAD rejects the
    # points, TPE is told a penalty), where without the constraint it ends on it
    def favoured(p):
        return modern_landscape(p) - (0.05 if p["use_dora"] else 0.0)

    shares = {}
    for kinds in ((), ("eb",)):
        searcher = build(algo, budget=30, kinds=kinds)
        told, _ = drive(searcher, objective=favoured,
                        constraint=(lambda p: 1.0 if p["use_dora"] else -1.0) if kinds else None)
        searcher.close()
        assert len(told) == 30
        shares[kinds] = sum(bool(s.point["use_dora"]) for s, _ in told[15:])
    assert shares[()] >= 10 and shares[("eb",)] <= 3, shares


def test_two_objectives_with_optuna_take_categories_as_labels():
    searcher = build("tpe", budget=15, parallel=2, n_objectives=2)
    pending, told = [], 0
    while not searcher.finished:
        while len(pending) < 2 and (s := searcher.ask()) is not None:
            pending.append(s)
        if not pending:
            break
        s = pending.pop(0)
        assert SPACE.contains(s.point)
        searcher.tell(s.trial_id, (modern_landscape(s.point), float(s.point["r"])))
        told += 1
    searcher.close()
    assert told == 15


# ------------------------------------------------------------------------------------------- the landscape
@pytest.mark.unit
def test_modern_landscape_has_its_stated_effects():
    base = {**SPACE.default_point(), "r": 256, "lr": 4e-4 * 0.7 / 2 * math.sqrt(2)}
    assert modern_landscape(base) > modern_landscape({**base, "use_rslora": True, "lr": base["lr"] / 16})
    low_rank = {**base, "r": 4}
    assert modern_landscape({**low_rank, "use_dora": True}) < modern_landscape(low_rank)
    assert modern_landscape({**base, "use_dora": True}) == modern_landscape(base)
    assert modern_landscape({**base, "target_modules": ["q_proj", "v_proj"]}) > modern_landscape(base)


@pytest.mark.slow
def test_modern_optimum_is_the_minimum_over_the_grid():
    value, point = modern_optimum()
    assert value == pytest.approx(0.942) and SPACE.contains(point)
    assert modern_landscape(point) == value < modern_landscape(SPACE.default_point())
    rng = np.random.default_rng(1)
    assert min(modern_landscape(SPACE.sample(rng)) for _ in range(2000)) > value


# ------------------------------------------------------------------------------------------- the chat examples
@pytest.mark.parametrize("name", ["study.yaml", "tiny.yaml"])
def test_the_chat_examples_dry_run_without_writing(name, tmp_path, monkeypatch, capsys):
    from orchestrator.__main__ import main

    from .conftest import REPO

    monkeypatch.chdir(tmp_path)
    assert main(["--config", str(REPO / "examples" / "chat" / name), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for section in ("# first suggestions", '"prompt_template": "chat"', '"use_dora": ', "category:",
                    "nothing was submitted"):
        assert section in out, section
    assert list(tmp_path.iterdir()) == [], "a dry run wrote something"


def test_the_readme_shows_the_chat_example_as_it_is():
    from .conftest import REPO

    lines = (REPO / "examples" / "chat" / "study.yaml").read_text().splitlines()
    body = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("preset:")):])
    assert body in (REPO / "README.md").read_text()


def test_plots_draw_categorical_axes_with_their_labels(tmp_path):
    from orchestrator.config import space_to_dict
    from orchestrator.reports.plots import write_plots
    from orchestrator.reports.view import axes_of
    from orchestrator.study.journal import StudyState, TrialState

    rng = np.random.default_rng(0)
    points = [SPACE.sample(rng) for _ in range(6)]
    trials = {i: TrialState(i, p, status="ok", value=modern_landscape(p), summary={"total_s": 60})
              for i, p in enumerate(points)}
    state = StudyState(config={"study": "modern", "algo": "tpe", "space": space_to_dict(SPACE)}, parent_run_id="p",
                       trials=trials)
    axes = {a.name: a for a in axes_of(state)}
    modules = axes["target_modules"]
    assert [t for _, t in modules.ticks] == ["q_proj+v_proj", "attention", "all-linear"]
    assert [modules.at(p) for p in points] == [float(["q_proj+v_proj", "attention", "all-linear"].index(
        label(p["target_modules"]))) for p in points]
    assert axes["use_dora"].at({"use_dora": True}) == 1.0 and math.isnan(axes["use_dora"].at({"use_dora": "x"}))
    written = write_plots(state, tmp_path)
    assert len(written) == 8 and "all-linear" in (tmp_path / "parallel.html").read_text()
