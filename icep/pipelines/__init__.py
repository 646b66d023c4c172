"""Pruning pipelines, one module each. A pipeline is built from its config node
(conf/pipeline/NAME.yaml, whose ``_target_`` names its class) by ``hydra.utils.instantiate`` and
called with a :class:`PruningRun`; it returns the summary fields. ``python -m icep pipeline=NAME``
picks one; adding one is a module here plus a YAML file there."""

from __future__ import annotations

from icep.pipelines.agp import AGP
from icep.pipelines.base import PruningRun
from icep.pipelines.epi import EPI
from icep.pipelines.finetune import FineTune, FixedEpochs, Patience
from icep.pipelines.hybrid import Hybrid
from icep.pipelines.ice import ICE
from icep.pipelines.iterative import Iterative
from icep.pipelines.one_shot import OneShot

__all__ = [
    "AGP",
    "EPI",
    "ICE",
    "FineTune",
    "FixedEpochs",
    "Hybrid",
    "Iterative",
    "OneShot",
    "Patience",
    "PruningRun",
]
