"""Iterative pruning. ``schedule: blockwise`` is the baseline of METHOD.md section 2: every step
prunes one unit by ``ratio``, then fine-tunes (with the reference's DenseNet additions of
:class:`~icep.pipelines.finetune.Recovery`). ``constant`` and ``geometric`` (section 4) prune
every unit at each step, to the schedule's cumulative share of ``target`` over ``steps`` steps
(:mod:`icep.pipelines.cumulative`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.cumulative import SchedulePipeline
from icep.pipelines.finetune import Recovery
from icep.pruning.schedules import constant, geometric


@dataclass(kw_only=True)
class Iterative(SchedulePipeline, Recovery):
    schedule: str  # blockwise | constant | geometric
    ratio: float  # blockwise: share of each unit's channels removed: ceil(ratio * C)
    steps: int  # constant, geometric: number of pruning steps

    def cumulative(self) -> list[float]:
        if self.schedule == "constant":
            return constant(self.target, self.steps)
        return geometric(self.target, self.steps)

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        if self.schedule != "blockwise":
            return super().__call__(run)
        run.start(self.decision_split)
        distill = run.teacher(self.finetune)
        for unit in run.pending(run.units):
            run.prune(unit, self.ratio)
            desc = f"fine-tune {unit.index + 1}/{len(run.units)}"
            epochs = run.recover(self.policy_for(unit.name), distill=distill, desc=desc)
            lr = self.finetune.lr
            run.record(unit, ratio=self.ratio, finetuned=True, lr=lr, epochs=epochs)
        final = self.recover_after_loop(run, self.finetune.lr, distill)
        return run.summary(**({"final_finetune": final} if final else {}))
