"""The end of a study (and what `--resume` of an ended one does, and `register`): MLflow drained, the champion
registered once, the summary that says where everything is.

    finish(config, state, journal, tracker, judge, progress, best)   # the loop's last step
    already_ended(config, state, journal, tracker, judge, say)      # --resume of a finished study
    register_champion(config, state, journal, tracker, judge)      # queue it; journal it once MLflow took it

The champion is orchestrator/search/champion.py's: the same trial whoever asks (the study's end, `register`,
`evaluate --top`, `confirm`, `compare`, `status`).
"""
from __future__ import annotations

import os

from orchestrator.config import StudyConfig, space_to_dict
from orchestrator.search.champion import champion
from orchestrator.study import StudyError
from orchestrator.study.journal import Journal, StudyState, TrialState
from orchestrator.tracking.tracker import PARENT, trial_key

# At the end, wait for MLflow while its queued writes make progress, up to this long without any (an outage of
# the tracking server); then exit with the writes kept for `--resume`. $LORA_HPO_MLFLOW_WAIT_S changes it.
DRAIN_IDLE_S = float(os.environ.get("LORA_HPO_MLFLOW_WAIT_S") or 600)


def registry_tags(config: StudyConfig, best: TrialState) -> dict:
    return {"study": config.study, "algo": config.algo, "val_loss": best.value, "trial": best.trial,
            "base_model": config.trial.base_model, **{f"hp.{k}": v for k, v in best.point.items()}}


def queue_registration(config: StudyConfig, state: StudyState, tracker, judge) -> tuple[int, TrialState] | None:
    """Queue the champion's registration (once: the same trial gets the same version); None when the study
    registers nothing (register_as "", an objective function, no champion)."""
    best = champion(state.finished, judge)
    name = config.register_name
    if best is None or name is None:
        return None
    return tracker.register(name, trial_key(best.trial), registry_tags(config, best)), best


def journal_registration(config: StudyConfig, state: StudyState, journal: Journal, tracker, queued) -> dict:
    seq, best = queued
    name = config.register_name
    registered = {"name": name, "version": tracker.result_of(seq), "trial": best.trial,
                  "run_id": tracker.run_id(trial_key(best.trial)), "uri": f"models:/{name}@champion"}
    journal.append("registered", **registered)
    state.registered.append(registered)
    return registered


def already_ended(config: StudyConfig, state: StudyState, journal: Journal, tracker, judge, say,
                  reregister: bool = False) -> StudyState:
    """`--resume` of a finished study changes nothing in the study: it replays MLflow writes an outage left
    queued (a registration among them), and re-creates what the store lost (`reregister`: the champion's run
    or version was re-created)."""
    if reregister:  # the store lost runs: the parent's and children's records again, from the journal
        tracker.start_parent(state.config, space_to_dict(config.space))
        for t in sorted(state.finished, key=lambda t: t.trial):
            tracker.start_child(t.trial, t.point, t.encoded, config.algo)
            tracker.finish_child(t.trial, t.status, t.value, t.summary, t.reason, t.out)
        tracker.end_parent("FINISHED")
    pending = tracker.pending
    queued = queue_registration(config, state, tracker, judge) if not state.registered or reregister else None
    drained = tracker.close(wait_s=24 * 3600, idle_s=DRAIN_IDLE_S)
    if queued is not None and drained:
        journal_registration(config, state, journal, tracker, queued)
    best = champion(state.finished, judge)
    said = f"study {config.study!r} has finished already ({len(state.finished)} evaluations" + \
        (f", best {best.value:.4f} at trial {best.trial})" if best else ")")
    if pending:
        said += f"; {pending} queued MLflow writes " + ("replayed" if drained else "still wait (MLflow unreachable)")
    say(said + ": nothing else to do")
    note_run_ids(state, tracker)
    return state


def note_run_ids(state: StudyState, tracker) -> None:
    state.parent_run_id = tracker.run_id(PARENT)
    for t in state.trials.values():
        t.run_id = tracker.run_id(trial_key(t.trial))


def finish(config: StudyConfig, state: StudyState, journal: Journal, tracker, judge, progress, best) -> None:
    """The study's last step: the Pareto front (two objectives), the champion's registration, the parent run
    ended, MLflow drained (bounded), `end` journaled, the summary printed."""
    if judge.objectives:  # two objectives: the front on the parent run
        from orchestrator.reports.pareto import write_pareto
        write_pareto(state, judge, config.folder / "pareto", config.pareto_reference)
        tracker.log_artifacts_of(config.folder / "pareto", "pareto")
    queued = queue_registration(config, state, tracker, judge)
    tracker.end_parent("FINISHED")
    if tracker.pending > 20:
        progress.note(f"waiting for MLflow to take {tracker.pending} queued writes...")
    drained = tracker.close(wait_s=24 * 3600, idle_s=DRAIN_IDLE_S)
    registered = journal_registration(config, state, journal, tracker, queued) if queued and drained else None
    journal.append("end", mlflow_pending=0 if drained else tracker.pending)
    state.ended = True
    note_run_ids(state, tracker)
    shown = champion(state.finished, judge) if judge.objectives else best
    progress.summary(state, shown, config.space.default_point(), registered, where(config, journal))
    if not drained:
        raise StudyError(f"the study finished but MLflow took no write for {DRAIN_IDLE_S:.0f} s "
                         f"({tracker.status()}): the writes wait in {config.folder}/mlflow-outbox.jsonl; "
                         f"replay them with: python -m orchestrator --study {config.study} --resume")


def where(config: StudyConfig, journal: Journal) -> dict:
    """Every place a person looks at after a study (for the final summary)."""
    uri = config.tracking()
    ui = (f"python -m orchestrator ui --tracking-uri {uri}" if uri.startswith("sqlite:") else uri)
    return {"folder": str(config.folder), "tracking_uri": uri, "ui": ui,
            "plots": str(config.folder / "plots"), "journal": str(journal.path)}
