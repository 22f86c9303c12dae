"""The end of a study (and what `--resume` of an ended one does): MLflow drained, the champion registered once,
the summary that says where everything is. Functions of the running `Study` (orchestrator/study/loop.py).
"""
from __future__ import annotations

import os

from orchestrator.config import StudyConfig
from orchestrator.study.journal import StudyState, TrialState
from orchestrator.tracking.tracker import PARENT, trial_key

# At the end, wait for MLflow while its queued writes make progress, up to this long without any (an outage of
# the tracking server); then exit with the writes kept for `--resume`. $LORA_HPO_MLFLOW_WAIT_S changes it.
DRAIN_IDLE_S = float(os.environ.get("LORA_HPO_MLFLOW_WAIT_S") or 600)


def already_ended(study) -> StudyState:
    """`--resume` of a finished study changes nothing: it only replays MLflow writes an outage left queued
    (a registration among them)."""
    study.searcher.close()
    for t in study.state.finished:
        study._update_best(t)
    pending = study.tracker.outbox.pending
    seq = queue_registration(study) if not study.state.registered else None
    drained = study.tracker.close(wait_s=24 * 3600, idle_s=DRAIN_IDLE_S)
    if seq is not None and drained:
        journal_registration(study, seq)
    said = f"study {study.config.study!r} has finished already ({len(study.state.finished)} evaluations" + \
        (f", best {study.best.value:.4f} at trial {study.best.trial})" if study.best else ")")
    if pending:
        said += f"; {pending} queued MLflow writes " + ("replayed" if drained else "still wait (MLflow unreachable)")
    study._warn(said + ": nothing else to do")
    note_run_ids(study)
    return study.state

def note_run_ids(study) -> None:
    study.state.parent_run_id = study.tracker.run_id(PARENT)
    for t in study.state.trials.values():
        t.run_id = study.tracker.run_id(trial_key(t.trial))

def queue_registration(study) -> int | None:
    if study.best is None or study.config.function is not None or study.config.register_as == "":
        return None
    name = study.config.register_as or f"{study.config.study}-adapter"
    return study.tracker.register(name, study.best.trial, registry_tags(study.config, study.best))

def journal_registration(study, seq: int) -> dict:
    name = study.config.register_as or f"{study.config.study}-adapter"
    registered = {"name": name, "version": study.tracker.outbox.result(seq), "trial": study.best.trial,
                  "run_id": study.tracker.run_id(trial_key(study.best.trial)), "uri": f"models:/{name}@champion"}
    study.journal.append("registered", **registered)
    study.state.registered.append(registered)
    return registered

def finish(study) -> None:
    study._track(final=True)
    if study.judge.objectives:  # two objectives: the front on the parent run, the champion by the rule
        from orchestrator.search.pareto import champion_of, write_pareto
        write_pareto(study.state, study.judge, study.folder / "pareto", study.config.pareto_reference)
        study.tracker.log_artifacts_of(study.folder / "pareto", "pareto")
        study.best = champion_of(study.state, study.judge)
    seq = queue_registration(study)
    study.tracker.end_parent("FINISHED")
    pending = study.tracker.outbox.pending
    if pending > 20:
        study._warn(f"waiting for MLflow to take {pending} queued writes...")
    drained = study.tracker.close(wait_s=24 * 3600, idle_s=DRAIN_IDLE_S)
    registered = journal_registration(study, seq) if seq is not None and drained else None
    study.journal.append("end", mlflow_pending=0 if drained else study.tracker.outbox.pending)
    study.state.ended = True
    note_run_ids(study)
    study.progress.summary(study.state, study.best, study.space.default_point(), registered, where(study))
    if not drained:
        from orchestrator.study.loop import StudyError
        raise StudyError(f"the study finished but MLflow took no write for {DRAIN_IDLE_S:.0f} s "
                         f"({study.tracker.outbox.status()}): the writes wait in {study.folder}/mlflow-outbox.jsonl; "
                         f"replay them with: python -m orchestrator --study {study.config.study} --resume")



def where(study) -> dict:
    """Every place a person looks at after a study (for the final summary)."""
    uri = study.config.tracking()
    ui = (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000" if uri.startswith("sqlite:")
          else uri)
    return {"folder": str(study.folder), "tracking_uri": uri, "ui": ui,
            "plots": str(study.folder / "plots"), "journal": str(study.journal.path)}


def registry_tags(config: StudyConfig, best: TrialState) -> dict:
    return {"study": config.study, "algo": config.algo, "val_loss": best.value, "trial": best.trial,
            "base_model": config.trial.get("base_model", ""), **{f"hp.{k}": v for k, v in best.point.items()}}


