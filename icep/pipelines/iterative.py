"""Baseline iterative pruning (METHOD.md section 2): every step prunes one unit, then fine-tunes."""

from __future__ import annotations

from typing import Any

from icep.pipelines.base import PruningRun


def run_iterative(run: PruningRun, cfg: Any) -> dict[str, Any]:
    run.start()
    distill = run.teacher(cfg) if cfg.distill else None
    for unit in run.pending(run.units):
        t_prune = run.prune(unit, cfg.ratio)
        t_finetune = run.finetune(
            cfg.finetune_epochs,
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
            distill,
            desc=f"fine-tune {unit.index + 1}/{len(run.units)}",
        )
        _, t_eval = run.evaluate()
        run.record(
            unit,
            ratio=cfg.ratio,
            finetuned=True,
            lr=cfg.lr,
            epochs=cfg.finetune_epochs,
            t_prune=t_prune,
            t_finetune=t_finetune,
            t_eval=t_eval,
        )
    return run.summary()
