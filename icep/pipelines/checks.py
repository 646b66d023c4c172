"""Checks on a pipeline's own keys, run before any training: a bad value ends with one line that
names the key and what is allowed (:class:`icep.errors.ConfigError`). Keys a pipeline does not
have are skipped, so one table serves them all."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from icep.errors import ConfigError
from icep.pipelines.schedule import ITERATIVE_SCHEDULES, cumulative_schedule

SCHEDULE_PIPELINES = ("one_shot", "hybrid", "agp")


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), (
        f"an integer >= {low}"
    )


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "finetune_policy": (lambda v: v in ("fixed", "patience"), "fixed or patience"),
    "patience": _int_at_least(1),
    "max_epochs": _int_at_least(1),
    "min_delta": (lambda v: _number(v) and v >= 0, "a number >= 0 (accuracy points)"),
    "schedule": (lambda v: v in ITERATIVE_SCHEDULES, " or ".join(ITERATIVE_SCHEDULES)),
    "scope": (lambda v: v in ("uniform", "global"), "uniform or global"),
    "structure": (lambda v: v in ("structured", "unstructured"), "structured or unstructured"),
    "min_channels_share": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "epochs": _int_at_least(1),
    "start_epoch": _int_at_least(1),
    "frequency": _int_at_least(1),
    "alpha": (lambda v: _number(v) and 0 < v < 1, "a number strictly between 0 and 1"),
    "tau": (_number, "a number"),
    "window": _int_at_least(1),
}


def check_pipeline(pipeline: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first bad setting of the ``pipeline`` config node."""
    for key, (test, allowed) in RULES.items():
        value = OmegaConf.select(pipeline, key, default="<absent>")
        if value != "<absent>" and not test(value):
            raise ConfigError(f"pipeline.{key}", f"got {value!r}; must be {allowed}")
    if pipeline.name in SCHEDULE_PIPELINES or pipeline.get("schedule", "blockwise") != "blockwise":
        cumulative_schedule(pipeline)  # raises for a bad target, steps, one_shot or initial
        _check_reachable(pipeline, pipeline.target)
    elif pipeline.get("structure") == "unstructured":
        raise ConfigError(
            "pipeline.structure",
            "unstructured pruning needs a schedule; set pipeline.schedule=constant or geometric",
        )
    if pipeline.name == "epi":
        _check_reachable(pipeline, pipeline.alpha)
    if pipeline.name == "agp":
        last = pipeline.start_epoch + (pipeline.steps - 1) * pipeline.frequency
        if last > pipeline.epochs:
            raise ConfigError(
                "pipeline.epochs",
                f"got {pipeline.epochs}; the last AGP step comes at epoch {last} "
                "(start_epoch + (steps - 1) * frequency): raise epochs or lower the others",
            )


def _check_reachable(pipeline: DictConfig, target: float) -> None:
    """The global scope's floor caps how much it can prune."""
    if (
        pipeline.get("structure", "structured") != "structured"
        or pipeline.get("scope") == "uniform"
    ):
        return
    floor = pipeline.min_channels_share
    if target > 1 - floor:
        raise ConfigError(
            "pipeline.min_channels_share",
            f"got {floor}; every layer keeps that share, so the target {target} cannot be "
            f"reached: lower it below {1 - target:.4g}",
        )
