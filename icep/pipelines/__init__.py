"""Pruning pipelines by name. Each takes a :class:`PruningRun` and its ``pipeline`` config and
returns the summary fields; ``python -m icep pipeline=NAME`` picks one."""

from __future__ import annotations

from icep.pipelines.agp import run_agp
from icep.pipelines.base import PruningRun
from icep.pipelines.checks import check_pipeline
from icep.pipelines.epi import run_epi
from icep.pipelines.hybrid import run_hybrid
from icep.pipelines.ice import run_ice
from icep.pipelines.iterative import run_iterative
from icep.pipelines.one_shot import run_one_shot

PIPELINES = {
    "iterative": run_iterative,
    "ice": run_ice,
    "one_shot": run_one_shot,
    "hybrid": run_hybrid,
    "agp": run_agp,
    "epi": run_epi,
}

__all__ = [
    "PIPELINES",
    "PruningRun",
    "check_pipeline",
    "run_agp",
    "run_epi",
    "run_hybrid",
    "run_ice",
    "run_iterative",
    "run_one_shot",
]
