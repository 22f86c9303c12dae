"""A study: its loop (loop.py), the trial runner that every job-running command shares (runner.py), its journal
and lock, its end, and the commands that run jobs beside it (evaluate.py, confirm.py)."""


class StudyError(RuntimeError):
    """The study cannot go on (not an evaluation failure): the message says why and what to do."""
