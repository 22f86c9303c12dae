"""The study loop's stand-in for the searcher tests (no study, no executor): up to ``parallel`` suggestions
pending, the oldest answered first."""


def drive(searcher, answer, parallel=1, stop_after=None, running=(), key=None):
    """Ask and tell until the searcher is finished, has nothing more to propose, or ``stop_after`` results
    were told. ``answer(point)`` gives ``(value, constraints or None)``; ``running`` are suggestions pending
    already (adopted by a replay), answered first; ``key(point)``, when given, checks that no pending point is
    proposed again. Returns the told ``(suggestion, value, constraints)`` and the suggestions still pending."""
    pending, told = list(running), []
    while not searcher.finished and (stop_after is None or len(told) < stop_after):
        while len(pending) < parallel and (s := searcher.ask()) is not None:
            if key is not None:
                assert key(s.point) not in {key(p.point) for p in pending}, "a pending point was proposed again"
            pending.append(s)
        if not pending:
            break
        s = pending.pop(0)
        value, constraints = answer(s.point)
        searcher.tell(s.trial_id, value, constraints=constraints)
        told.append((s, value, constraints))
    return told, pending
