"""Structured pruning: the dependency-graph engine, its units and the filter criteria."""

from icep.pruning.criteria import CRITERIA, L1, L2, Criterion, FilterNorm, build_criterion
from icep.pruning.engine import (
    PruningEngine,
    Unit,
    count_macs_params,
    remaining_fraction,
    spatial_conv_weights,
)

__all__ = [
    "CRITERIA",
    "L1",
    "L2",
    "Criterion",
    "FilterNorm",
    "PruningEngine",
    "Unit",
    "build_criterion",
    "count_macs_params",
    "remaining_fraction",
    "spatial_conv_weights",
]
