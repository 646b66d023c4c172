"""Which tuned parameters to keep: the Pareto front of (accuracy drop, pruning time) and the
selection rule. icep's rule (``tolerance``) is the fastest point within a tolerance of the best
drop. The reference's objective ``t/max(da,t) + da/max(da,t)`` (``reference``, for ``tune=paper``)
reduces to ``1 + da/t`` and so rewards slower runs; it is there to reproduce the paper."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrialResult:
    number: int
    drop: float  # accuracy drop in points on the tuning data (lower is better)
    seconds: float  # pruning time (lower is better)
    params: dict[str, Any] = field(default_factory=dict)


def _dominates(a: TrialResult, b: TrialResult) -> bool:
    return (
        a.drop <= b.drop and a.seconds <= b.seconds and (a.drop < b.drop or a.seconds < b.seconds)
    )


def pareto_front(trials: Sequence[TrialResult]) -> list[TrialResult]:
    """The trials no other trial beats on both drop and time, fastest first."""
    front = [t for t in trials if not any(_dominates(o, t) for o in trials if o is not t)]
    return sorted(front, key=lambda t: (t.seconds, t.drop, t.number))


def reference_score(trial: TrialResult) -> float:
    """The reference code's objective, minimised: ``t/max(da,t) + da/max(da,t)`` with t the
    trial's time and da its accuracy drop (METHOD.md section 3.4)."""
    scale = max(trial.drop, trial.seconds)
    return trial.seconds / scale + trial.drop / scale


def select_trial(
    trials: Sequence[TrialResult], tolerance: float, rule: str = "tolerance"
) -> TrialResult:
    """``tolerance``: the fastest Pareto point whose drop is within ``tolerance`` points of the
    best drop. The trial with the best drop is always within tolerance of itself, so the rule
    falls back to the smallest drop when nothing faster is close enough.

    ``reference``: the lowest :func:`reference_score` (the first trial among equals).
    """
    if not trials:
        raise ValueError("no finished trial to select from")
    if rule == "reference":
        return min(trials, key=lambda t: (reference_score(t), t.number))
    best_drop = min(t.drop for t in trials)
    close = [t for t in pareto_front(trials) if t.drop <= best_drop + tolerance]
    return close[0]
