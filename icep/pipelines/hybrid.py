"""Hybrid (few-shot) pruning (METHOD.md section 4): a one-shot slice ``one_shot`` of the original
channels first, then a geometric schedule over ``steps`` steps up to ``target``; a fine-tune
after every step."""

from __future__ import annotations

from dataclasses import dataclass

from icep.pipelines.cumulative import SchedulePipeline
from icep.pruning.schedules import hybrid


@dataclass(kw_only=True)
class Hybrid(SchedulePipeline):
    one_shot: float  # the first slice, 0 < one_shot < target
    steps: int  # geometric steps after the first slice

    def cumulative(self) -> list[float]:
        return hybrid(self.target, self.steps, self.one_shot)
