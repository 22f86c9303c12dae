"""The MLflow UI shows what a study recorded, seen by a browser: a real `mlflow server` on a study's store,
driven by headless Chromium (Playwright), with screenshots of every page checked.

    .venv/bin/python -m pytest -q -m ui tests/test_ui.py        # prints where the screenshots are

A synthetic study (debug executor, some failures), its plots logged by `orchestrator.reports.plots.log_plots`, and a
champion registered through the project's own registration path (the study's outbox, as `register` does) on the best trial, whose `adapter/` artifact is a
real PEFT adapter (adapter_config.json + adapter_model.safetensors) of a randomly initialised tiny Llama
(no fine-tune: the registry is what is under test here; tests/test_e2e.py registers a trained one).

Needs Debian's `chromium` (or LORA_HPO_CHROMIUM=/path) and the `playwright` Python package (its own browser
downloads are not used); skips, saying what to install, where either is missing. Screenshots go to
LORA_HPO_UI_SCREENSHOTS if set, else to a pytest temporary folder.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.study.loop import run_study
from orchestrator.study.end import registry_tags
from orchestrator.tracking.tracker import Tracker, trial_key

pytestmark = pytest.mark.ui

CHROMIUM = os.environ.get("LORA_HPO_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # the React app renders in seconds; a shared 2-core machine can be slow
ML = "workflowType=machine_learning"  # MLflow 3 opens in its GenAI view; runs live in "Model training"


def _require_browser():
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("the UI test needs the playwright package: .venv/bin/pip install playwright "
                    "(no `playwright install`: it drives Debian's chromium)")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"the UI test needs Chromium at {CHROMIUM}: apt-get install chromium "
                    "(or set LORA_HPO_CHROMIUM to a chromium binary)")


# ------------------------------------------------------------------------------------------- fixtures
def _tiny_peft_adapter(folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A finished study in a SQLite store: parent, children (one failed at least), plots, a champion."""
    _require_browser()
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    cfg = load_config(None, study="ui-study", algo="random", budget=12, parallel=2, executor="debug", poll_s=0.05,
                      seed=3, objective="tests.objectives:flaky", workdir=str(tmp / "runs"),
                      tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db")
    state = run_study(cfg, out=open(os.devnull, "w"))
    ok = [t for t in state.finished if t.status == "ok"]
    failed = [t for t in state.finished if t.status == "failed"]
    assert ok and failed, "seed 3 of the flaky objective gives both successes and failures"
    client = MlflowClient(cfg.tracking())
    logged = {a.path for a in client.list_artifacts(state.parent_run_id, "plots")}  # the study logged its plots
    assert {f"plots/{n}.{e}" for n in ("history", "history_time", "parallel", "params") for e in ("png", "html")} \
        == logged, logged
    best = min(ok, key=lambda t: t.value)
    client.log_artifacts(best.run_id, str(_tiny_peft_adapter(tmp / "adapter")), "adapter")
    champion = _register(cfg, state, best)
    experiment = client.get_experiment_by_name(cfg.study).experiment_id
    return dict(tmp=tmp, uri=cfg.tracking(), study=cfg.study, experiment=experiment, state=state, best=best,
                failed=failed[0], champion=champion)


def _register(cfg, state, best) -> dict:
    """What `python -m orchestrator register` does, for a study whose objective was a function (which the command
    refuses: such a study has no adapter; this one got one logged above)."""
    tracker = Tracker(cfg.tracking(), cfg.study, Path(cfg.workdir) / cfg.study / "mlflow-outbox.jsonl",
                      state.study_uid or "", log=print)
    name = f"{cfg.study}-adapter"
    seq = tracker.register(name, trial_key(best.trial), registry_tags(cfg, best))
    assert tracker.close(wait_s=300, idle_s=120), tracker.status()
    return {"name": name, "version": tracker.result_of(seq)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(recorded):
    """`mlflow server` on the study's store, as a person would start it on a login node."""
    port = _free_port()
    log = open(recorded["tmp"] / "mlflow-server.log", "w")
    # no GenAI job runner (a process tree of 8 busy workers, for judges and scorers), no telemetry
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", recorded["uri"],
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=recorded["tmp"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: stopped whole at the end
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (recorded["tmp"] / "mlflow-server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL whatever of it is left after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        time.sleep(0.5)  # the server's children exit after it
        os.killpg(proc.pid, signal.SIGKILL)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already
        pass
    proc.wait()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("LORA_HPO_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, args=CHROMIUM_ARGS,
            headless=True, viewport={"width": 1440, "height": 960})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        yield page
        context.close()


def _open(page, url: str, ready: str) -> None:
    """Go to `url`, wait for the text `ready`, and close the assistant side panel that MLflow opens."""
    page.goto(url)
    page.get_by_text(ready, exact=True).first.wait_for()
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count() and close.first.is_visible():
        close.first.click()


def _shot(page, shots: Path, capsys, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with capsys.disabled():
        print(f"\n  screenshot: {path}")
    return path


def _body(page) -> str:
    return page.inner_text("body")


# ------------------------------------------------------------------------------------------- tests
def test_experiment_page_lists_the_study_run_and_its_trials(recorded, server, page, shots, capsys):
    state = recorded["state"]
    _open(page, f"{server}/#/experiments/{recorded['experiment']}?{ML}", "Runs")
    parent = page.get_by_role("link", name=recorded["study"], exact=True)
    parent.first.wait_for()
    assert page.get_by_text(recorded["study"], exact=True).count() >= 2  # the experiment's name, the study run
    page.get_by_text(f"{len(state.trials) + 1} matching runs").wait_for()  # the parent and every child
    row = page.locator("[role=row]", has=parent)
    row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # expand the parent
    for t in sorted(state.trials.values(), key=lambda t: t.trial)[:8]:  # the first rows of the nested list
        page.get_by_role("link", name=f"trial-{t.trial:03d}", exact=True).first.wait_for()
    _shot(page, shots, capsys, "1-experiment-runs")


def _shown(value) -> list[str]:
    """How the UI may write a logged number: as logged, or in plain decimal notation (JavaScript's)."""
    return [str(value), format(Decimal(repr(value)), "f")] if isinstance(value, float) else [str(value)]


def test_a_trial_run_page_shows_its_params_and_metrics(recorded, server, page, shots, capsys):
    best = recorded["best"]
    _open(page, f"{server}/#/experiments/{recorded['experiment']}/runs/{best.run_id}?{ML}",
          f"trial-{best.trial:03d}")
    page.get_by_text("Parameters", exact=False).first.wait_for()
    page.get_by_text("val_loss", exact=True).first.wait_for()
    text = _body(page)
    for name, value in best.point.items():
        assert re.search(rf"^{name}$", text, re.M), f"param {name} not shown"
        assert any(s in text for s in _shown(value)), f"param {name}={value} not shown"
    assert any(s in text for s in _shown(best.value)), "metric val_loss's value not shown"
    assert "Finished" in text and recorded["study"] in text  # status, and the link to the parent run
    _shot(page, shots, capsys, "2-trial-run")


def test_a_failed_trial_shows_failed_and_its_reason(recorded, server, page, shots, capsys):
    t = recorded["failed"]
    _open(page, f"{server}/#/experiments/{recorded['experiment']}/runs/{t.run_id}?{ML}", f"trial-{t.trial:03d}")
    page.get_by_text("failure_reason", exact=True).first.wait_for()
    text = _body(page)
    assert "Failed" in text and t.reason in text
    _shot(page, shots, capsys, "3-failed-trial-run")


def test_the_plots_are_artifacts_of_the_study_run(recorded, server, page, shots, capsys):
    parent = recorded["state"].parent_run_id
    _open(page, f"{server}/#/experiments/{recorded['experiment']}/runs/{parent}/artifacts?{ML}", "plots")
    page.get_by_text("plots", exact=True).first.click()
    for name in ("history", "parallel", "params"):
        for ext in ("png", "html"):
            page.get_by_text(f"{name}.{ext}", exact=True).first.wait_for()
    page.get_by_text("history.png", exact=True).first.click()
    image = page.locator("img[src^='blob:']").first  # MLflow fetches the artifact, shows it as a blob
    image.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    _shot(page, shots, capsys, "4-study-run-plot-png")
    page.get_by_text("parallel.html", exact=True).first.click()
    frame = page.frame_locator("iframe").first
    frame.locator(".js-plotly-plot").first.wait_for()  # plotly drew inside MLflow's HTML preview
    frame.get_by_text("val_loss").first.wait_for()
    _shot(page, shots, capsys, "5-study-run-plot-html")


def test_the_registered_model_has_its_champion(recorded, server, page, shots, capsys):
    name, version, best = recorded["champion"]["name"], recorded["champion"]["version"], recorded["best"]
    _open(page, f"{server}/#/models/{name}?{ML}", name)
    page.get_by_text(f"Version {version}", exact=True).first.wait_for()
    page.get_by_text("champion").first.wait_for()
    _shot(page, shots, capsys, "6-registered-model")
    _open(page, f"{server}/#/models/{name}/versions/{version}?{ML}", f"Version {version}")
    page.get_by_text(f"trial-{best.trial:03d}", exact=True).first.wait_for()  # the source run, linked
    page.get_by_text("champion").first.wait_for()
    text = _body(page)
    tags = {"val_loss": best.value, "trial": best.trial, **{f"hp.{k}": v for k, v in best.point.items()}}
    for tag, value in tags.items():  # the version's tags say what the champion is
        assert re.search(rf"^{re.escape(tag)}\s*$", text, re.M), f"tag {tag} not shown"
        assert str(value) in text, f"tag {tag}={value} not shown"
    _shot(page, shots, capsys, "7-champion-version")


def test_the_server_serves_the_plot_files(recorded, server):
    """What the UI fetched, checked byte for byte: the local artifact store is served as is."""
    parent = recorded["state"].parent_run_id
    with urllib.request.urlopen(f"{server}/get-artifact?path=plots/history.png&run_uuid={parent}") as r:
        served = r.read()
    local = Path(json.loads(urllib.request.urlopen(
        f"{server}/ajax-api/2.0/mlflow/artifacts/list?run_id={parent}&path=plots").read())["root_uri"][7:])
    assert served == (local / "plots" / "history.png").read_bytes()
