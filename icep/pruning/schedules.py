"""Pruning schedules (METHOD.md section 4): how much is pruned by each step.

A schedule is the cumulative pruned share after each step, as fractions of the ORIGINAL channel
(or weight) count: ``[c_1, ..., c_n]`` rising to the target T. The config's values are checked
before a run starts (:mod:`icep.config`); these functions refuse impossible ones with a
ValueError.
"""

from __future__ import annotations


def _check(target: float, steps: int) -> None:
    if not 0 < target < 1:
        raise ValueError(f"target {target} must be strictly between 0 and 1")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps {steps!r} must be an integer >= 1")


def one_shot(target: float) -> list[float]:
    """Everything in one step."""
    _check(target, 1)
    return [target]


def constant(target: float, steps: int) -> list[float]:
    """``steps`` equal slices of the target."""
    _check(target, steps)
    return [target * k / steps for k in range(1, steps + 1)]


def geometric(target: float, steps: int) -> list[float]:
    """The same share ``1 - (1 - T) ** (1 / steps)`` of what remains, every step."""
    _check(target, steps)
    return [1 - (1 - target) ** (k / steps) for k in range(1, steps + 1)]


def hybrid(target: float, steps: int, one_shot_share: float) -> list[float]:
    """A one-shot slice ``o`` first, then a geometric schedule over ``steps`` steps for the rest
    (``steps + 1`` steps in all)."""
    _check(target, steps)
    if not 0 < one_shot_share < target:
        raise ValueError(f"one_shot {one_shot_share} must be above 0 and below the target {target}")
    keep = (1 - target) / (1 - one_shot_share)
    rest = [1 - (1 - one_shot_share) * keep ** (k / steps) for k in range(1, steps + 1)]
    return [one_shot_share, *rest]


def agp(target: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's gradual schedule ``s_f + (s_i - s_f) * (1 - t / n) ** 3`` at steps
    ``t = 1..n`` (t0 = 0, one step per pruning interval): fast early, slow at the end."""
    _check(target, steps)
    if not 0 <= initial < target:
        raise ValueError(f"initial {initial} must be in [0, target {target})")
    return [target + (initial - target) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]


__all__ = ["agp", "constant", "geometric", "hybrid", "one_shot"]
