"""Hybrid (few-shot) pruning (METHOD.md section 4): a one-shot slice ``one_shot`` of the original
channels first, then a geometric schedule over ``steps`` steps up to ``target``; a fine-tune
after every step."""

from __future__ import annotations

from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.schedule import run_schedule
from icep.pruning.schedules import hybrid


def run_hybrid(run: PruningRun, cfg: Any) -> dict[str, Any]:
    return run_schedule(run, cfg, hybrid(cfg.target, cfg.steps, cfg.one_shot))
