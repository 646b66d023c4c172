"""Iterative pruning. ``schedule: blockwise`` is the baseline of METHOD.md section 2: every step
prunes one unit by ``ratio``, then fine-tunes. ``constant`` and ``geometric`` (section 4) prune
every unit at each step, to the schedule's cumulative share of ``target`` over ``steps`` steps
(:mod:`icep.pipelines.schedule`)."""

from __future__ import annotations

from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.schedule import cumulative_schedule, run_schedule


def run_iterative(run: PruningRun, cfg: Any) -> dict[str, Any]:
    if cfg.schedule != "blockwise":
        return run_schedule(run, cfg, cumulative_schedule(cfg))
    run.start()
    distill = run.teacher(cfg) if cfg.distill else None
    for unit in run.pending(run.units):
        run.prune(unit, cfg.ratio)
        epochs = run.recover(
            cfg, cfg.lr, distill, desc=f"fine-tune {unit.index + 1}/{len(run.units)}"
        )
        run.record(unit, ratio=cfg.ratio, finetuned=True, lr=cfg.lr, epochs=epochs)
    return run.summary()
