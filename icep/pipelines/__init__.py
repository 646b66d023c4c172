"""Pruning pipelines by name. Each takes a :class:`PruningRun` and its ``pipeline`` config and
returns the summary fields; ``python -m icep pipeline=NAME`` picks one."""

from __future__ import annotations

from icep.pipelines.base import PruningRun
from icep.pipelines.iterative import run_iterative

PIPELINES = {
    "iterative": run_iterative,
}

__all__ = ["PIPELINES", "PruningRun", "run_iterative"]
