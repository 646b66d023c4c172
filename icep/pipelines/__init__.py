"""Pruning pipelines by name. Each takes a :class:`PruningRun` and its ``pipeline`` config and
returns the summary fields; ``python -m icep pipeline=NAME`` picks one."""

from __future__ import annotations

from icep.pipelines.base import PruningRun
from icep.pipelines.ice import run_ice
from icep.pipelines.iterative import run_iterative

PIPELINES = {
    "iterative": run_iterative,
    "ice": run_ice,
}

__all__ = ["PIPELINES", "PruningRun", "run_ice", "run_iterative"]
