"""Pruning: the dependency-graph engine and its units, the filter criteria, the schedules and
unstructured magnitude masks."""

from icep.pruning.criteria import (
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
    prepare_criterion,
)
from icep.pruning.engine import (
    PruningEngine,
    Unit,
    ceil_share,
    count_macs_params,
    ignored_modules,
    select_global,
    uniform_widths,
)
from icep.pruning.unstructured import MagnitudePruner

__all__ = [
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
    "MagnitudePruner",
    "PruningEngine",
    "Unit",
    "prepare_criterion",
    "ceil_share",
    "count_macs_params",
    "ignored_modules",
    "select_global",
    "uniform_widths",
]
