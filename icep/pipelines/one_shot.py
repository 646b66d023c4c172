"""One-shot pruning (METHOD.md section 4): every unit (or every weight) pruned to the target in a
single step, then one fine-tune (fixed epochs or with patience)."""

from __future__ import annotations

from dataclasses import dataclass

from icep.pipelines.cumulative import SchedulePipeline
from icep.pruning.schedules import one_shot


@dataclass(kw_only=True)
class OneShot(SchedulePipeline):
    def cumulative(self) -> list[float]:
        return one_shot(self.target)
