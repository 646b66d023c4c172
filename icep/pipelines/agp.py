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

from dataclasses import dataclass
from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.cumulative import PruneTo, SchedulePruner
from icep.pipelines.finetune import Training
from icep.pruning.schedules import agp


@dataclass(kw_only=True)
class AGP(PruneTo, Training):
    target: Any  # s_f: the final pruned share, or a budget
    initial: float  # s_i: the share before the first step
    steps: int  # n: pruning steps
    start_epoch: int  # epoch of the first step (1-based)
    frequency: int  # dt: epochs between steps
    epochs: int  # all training epochs; those after the last step recover
    name: str  # the label of reports, W&B tags and run names

    def prune_epochs(self) -> dict[int, float]:
        """Epoch -> the cumulative share to prune to at its start."""
        cumulative = agp(self.target, self.steps, self.initial)
        return {self.start_epoch + k * self.frequency: share for k, share in enumerate(cumulative)}

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        run.planned_steps = self.epochs
        schedule = self.prune_epochs()
        run.start(self.decision_split)
        distill = run.teacher(self)
        pruner = SchedulePruner(run, self)
        optimizer = run.resume_optimizer(run.new_optimizer(self.optimizer, self.lr))
        for epoch in run.pending(range(1, self.epochs + 1)):
            share = schedule.get(epoch)
            if share is not None:
                pruner.prune_to(share)
                # new Parameters (structured) or new zeros (masks): a new optimizer
                optimizer = run.new_optimizer(self.optimizer, self.lr)
            run.train_epoch(optimizer, distill, f"agp epoch {epoch}/{self.epochs}")
            run.evaluate()
            run.keep_optimizer(optimizer)
            run.record(
                f"epoch {epoch}",
                epoch=epoch,
                pruned=share is not None,
                target=share,
                **pruner.measure(),
                lr=self.lr,
            )
        return run.summary(
            ratio=None,
            target=self.target,
            schedule=list(schedule.values()),
            prune_epochs=list(schedule),
            **pruner.finish(),
        )
