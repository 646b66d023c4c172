"""Gradual magnitude pruning during training (AGP, Zhu & Gupta 2017; METHOD.md section 4).

The model trains for ``epochs`` epochs at a constant ``lr``. Pruning step k (k = 1..steps) comes
at the start of epoch ``start_epoch + (k - 1) * frequency`` and brings the model to AGP's cubic
cumulative share ``s_f + (s_i - s_f) * (1 - k / steps) ** 3`` (``target`` = s_f, ``initial`` =
s_i); the epochs after the last step recover. Structured steps remove channels physically, so the
optimizer is rebuilt after each one (its momentum belongs to the old Parameters); unstructured
steps mask weights, and the optimizer is rebuilt too, so masked weights start with no momentum.

Each epoch is one step of the run's record and checkpoint (with the optimizer's state), so
``resume=true`` continues after the last finished epoch.
"""

from __future__ import annotations

from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.schedule import SchedulePruner
from icep.pruning.schedules import agp
from icep.train import sgd


def prune_epochs(cfg: Any) -> dict[int, float]:
    """Epoch -> the cumulative share to prune to at its start."""
    cumulative = agp(cfg.target, cfg.steps, cfg.initial)
    return {cfg.start_epoch + k * cfg.frequency: share for k, share in enumerate(cumulative)}


def run_agp(run: PruningRun, cfg: Any) -> dict[str, Any]:
    run.planned_steps = cfg.epochs
    schedule = prune_epochs(cfg)
    run.start()
    distill = run.teacher(cfg) if cfg.distill else None
    pruner = SchedulePruner(run, cfg)
    optimizer = run.optimizer(cfg.lr, cfg.momentum, cfg.weight_decay)
    for epoch in run.pending(range(1, cfg.epochs + 1)):
        share = schedule.get(epoch)
        if share is not None:
            pruner.prune_to(share)
            # new Parameters (structured) or new zeros (masks): a new optimizer
            optimizer = sgd(run.model, cfg.lr, cfg.momentum, cfg.weight_decay)
        run.train_epoch(optimizer, distill, f"agp epoch {epoch}/{cfg.epochs}")
        run.evaluate()
        run.keep_optimizer(optimizer)
        run.record(
            f"epoch {epoch}",
            epoch=epoch,
            pruned=share is not None,
            target=share,
            **pruner.measure(),
            lr=cfg.lr,
        )
    return run.summary(
        ratio=None,
        target=cfg.target,
        schedule=list(schedule.values()),
        prune_epochs=list(schedule),
        **pruner.finish(),
    )
