"""Structured pruning: the dependency-graph engine, its units and the filter criteria."""

from icep.pruning.criteria import (
    CRITERIA,
    FPGM,
    L1,
    L2,
    BNScale,
    Criterion,
    Entropy,
    FilterNorm,
    MeanActivation,
    Random,
    Taylor,
    build_criterion,
    list_criteria,
    prepare_criterion,
)
from icep.pruning.engine import (
    PruningEngine,
    Unit,
    count_macs_params,
    remaining_fraction,
    spatial_conv_weights,
)

__all__ = [
    "CRITERIA",
    "FPGM",
    "L1",
    "L2",
    "BNScale",
    "Criterion",
    "Entropy",
    "FilterNorm",
    "MeanActivation",
    "Random",
    "Taylor",
    "PruningEngine",
    "Unit",
    "build_criterion",
    "list_criteria",
    "prepare_criterion",
    "count_macs_params",
    "remaining_fraction",
    "spatial_conv_weights",
]
