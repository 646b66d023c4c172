"""Pruning schedules (METHOD.md section 4): how much is pruned by each step.

A schedule is the cumulative pruned share after each step, as fractions of the ORIGINAL channel
(or weight) count: ``[c_1, ..., c_n]`` rising to the target T. :func:`increments` gives each
step's slice of the original, :func:`step_ratios` the share of what is left that each step
removes (what an engine that prunes "r of the current channels" needs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from icep.errors import ConfigError


def _check(target: float, steps: int, key: str = "pipeline") -> None:
    if not 0 < target < 1:
        raise ConfigError(f"{key}.target", f"got {target}; must be strictly between 0 and 1")
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"{key}.steps", f"got {steps!r}; must be an integer >= 1")


def one_shot(target: float, steps: int = 1) -> list[float]:
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
        raise ConfigError(
            "pipeline.one_shot",
            f"got {one_shot_share}; must be above 0 and below the target {target}",
        )
    keep = (1 - target) / (1 - one_shot_share)
    rest = [1 - (1 - one_shot_share) * keep ** (k / steps) for k in range(1, steps + 1)]
    return [one_shot_share, *rest]


def agp(target: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's gradual schedule ``s_f + (s_i - s_f) * (1 - t / n) ** 3`` at steps
    ``t = 1..n`` (t0 = 0, one step per pruning interval): fast early, slow at the end."""
    _check(target, steps)
    if not 0 <= initial < target:
        raise ConfigError("pipeline.initial", f"got {initial}; must be in [0, target {target})")
    return [target + (initial - target) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]


SCHEDULES: dict[str, Callable[..., list[float]]] = {
    "one_shot": one_shot,
    "constant": constant,
    "geometric": geometric,
    "hybrid": hybrid,
    "agp": agp,
}


def increments(cumulative: Sequence[float]) -> list[float]:
    """Each step's slice, as a share of the original count."""
    return [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


def step_ratios(cumulative: Sequence[float]) -> list[float]:
    """Each step's share of what is left before it: ``(c_k - c_{k-1}) / (1 - c_{k-1})``."""
    return [(b - a) / (1 - a) for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]


__all__ = [
    "SCHEDULES",
    "agp",
    "constant",
    "geometric",
    "hybrid",
    "increments",
    "one_shot",
    "step_ratios",
]
