"""A study's spend in GPU-hours (CPU-hours for jobs without GPUs), and whether one more trial fits its budget.

    budget: {gpu_hours: 500}          # in the study YAML (or {evaluations: 100, gpu_hours: 500})

Every attempt of every trial counts, retried and pruned ones included: elapsed x GPUs allocated, as SLURM
accounting reports them (sacct ElapsedRaw and AllocTRES; local and debug jobs: the wall time since they were
seen running x the GPUs, else the CPUs, asked for in `resources:`). A finished trial's spend is journaled in its
result (`gpu_hours`), so a resumed study keeps the count; a running trial's is read from the scheduler.

No trial is submitted when the spend so far, plus what the running trials are still expected to use, plus the
expected cost of one more trial would pass the budget. The expected cost of a trial is the mean spend of the
trials that finished so far (every trial of a study asks for the same resources); before the first one finishes
the first wave is submitted (at most `parallel` trials). A study whose budget is spent ends like one whose
evaluations are: its champion is registered.
"""
from __future__ import annotations

import statistics


class Spend:
    def __init__(self, budget_h: float | None, resources):
        self.budget_h = budget_h
        self.unit = "GPU-h" if resources.gpus_per_node else "CPU-h"

    @staticmethod
    def finished_hours(state) -> list[float]:
        return [float(t.summary["gpu_hours"]) for t in state.finished
                if isinstance(t.summary.get("gpu_hours"), (int, float)) and t.status != "infeasible"]

    def spent(self, state, running: dict[str, float]) -> float:
        """Resource-hours of the finished trials and of the running ones so far."""
        return sum(self.finished_hours(state)) + sum(running.values())

    def expected(self, state) -> float | None:
        """The expected cost of one trial: the mean of the finished trials' (None before the first)."""
        done = [h for h in self.finished_hours(state) if h > 0]
        return statistics.fmean(done) if done else None

    def fits_another(self, state, running: dict[str, float]) -> bool:
        """Whether one more trial fits the budget (always, without a GPU-hour budget)."""
        if self.budget_h is None:
            return True
        expected = self.expected(state)
        if expected is None:
            return self.spent(state, running) < self.budget_h
        committed = sum(max(0.0, expected - h) for h in running.values())
        return self.spent(state, running) + committed + expected <= self.budget_h

    def text(self, state, running: dict[str, float]) -> str:
        spent = self.spent(state, running)
        return f"{spent:.3g}/{self.budget_h:g} {self.unit}" if self.budget_h else f"{spent:.3g} {self.unit}"
