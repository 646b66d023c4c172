"""One-shot pruning (METHOD.md section 4): every unit (or every weight) pruned to the target in a
single step, then one fine-tune (fixed epochs or with patience)."""

from __future__ import annotations

from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.schedule import run_schedule
from icep.pruning.schedules import one_shot


def run_one_shot(run: PruningRun, cfg: Any) -> dict[str, Any]:
    return run_schedule(run, cfg, one_shot(cfg.target))
