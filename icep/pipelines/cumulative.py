"""The loop the schedule pipelines share (METHOD.md section 4): every step prunes EVERY unit up to
the schedule's next cumulative share of the original channels (or weights), then fine-tunes.
The schedules themselves are :mod:`icep.pruning.schedules`.

How a step prunes is :class:`SchedulePruner`'s business:

- ``structure: structured``, ``scope: uniform``: every unit conv is cut to
  ``C - ceil(c_k * C)`` of its original C channels (at least one), the criterion's lowest first;
- ``structure: structured``, ``scope: global``: one ranking of all unit channels, each layer's
  scores divided by its largest, until ``ceil(c_k * N)`` of the N original channels are gone;
  every conv keeps at least ``ceil(min_channels_share * C)`` (and one);
- ``structure: unstructured``: global magnitude masks over every conv and linear weight,
  exactly ``ceil(c_k * W)`` of the W weights zero after step k (the criterion is not used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from icep.pipelines.base import PruningRun, Shaping
from icep.pipelines.finetune import FineTune
from icep.pruning import MagnitudePruner, uniform_widths


@dataclass(kw_only=True)
class PruneTo(Shaping):
    """How a schedule pipeline prunes to a share: the ``scope``, ``min_channels_share`` and
    ``structure`` keys of its config, and the split its evaluations use (``decision_split``)."""

    decision_split: str  # val | test
    scope: str  # uniform | global
    min_channels_share: float  # global scope: each conv keeps >= ceil(share * C_orig) channels
    structure: str  # structured | unstructured


class SchedulePruner:
    """Brings the run's model to a cumulative pruned share, structured or unstructured."""

    def __init__(self, run: PruningRun, how: PruneTo):
        self.run = run
        self.scope = how.scope
        self.min_channels_share = how.min_channels_share
        # Masks start from the weights' zeros, so a resumed run finds them again.
        self.masks = MagnitudePruner(run.model) if how.structure == "unstructured" else None
        self.label = "weights" if self.masks is not None else f"all units ({self.scope})"

    def prune_to(self, share: float) -> None:
        """Prune up to ``share`` of the original channels (weights), timed as ``prune``."""
        run = self.run
        with run.phase("prune"):
            if self.masks is not None:
                self.masks.prune_to(share)
            elif self.scope == "uniform":
                now = run.engine.unit_widths()
                original = run.engine.original_widths
                widths = uniform_widths(original, share, run.engine.channel_groups)
                run.prune_to_widths({n: min(w, now[n]) for n, w in widths.items()})
            else:
                run.prune_channels(run.global_removal(share, self.min_channels_share))

    def measure(self) -> dict[str, float]:
        """The share pruned so far, for a step row."""
        if self.masks is not None:
            return {"sparsity": self.masks.sparsity()}
        return {"channels_pruned_share": self.run.engine.pruned_share()}

    def finish(self) -> dict[str, Any]:
        """Make masks permanent; the summary fields that say how much was pruned."""
        if self.masks is None:
            return {"structure": "structured", "scope": self.scope}
        self.masks.make_permanent()
        return {"structure": "unstructured", "sparsity": self.masks.sparsity()}


@dataclass(kw_only=True)
class SchedulePipeline(PruneTo):
    """Prune to each share of :meth:`cumulative` in turn, fine-tuning after every step. A
    schedule pipeline is this plus its :meth:`cumulative`."""

    target: Any  # the share of the original channels (or weights) pruned at the end, or a budget
    finetune: FineTune  # after every step (pipeline/finetune=fixed|patience)
    name: str  # the label of reports, W&B tags and run names

    def cumulative(self) -> list[float]:
        """The cumulative pruned share after each step."""
        raise NotImplementedError

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        cumulative = self.cumulative()
        run.planned_steps = len(cumulative)
        run.start(self.decision_split)
        distill = run.teacher(self.finetune)
        pruner = SchedulePruner(run, self)
        for share in run.pending(cumulative):
            pruner.prune_to(share)
            desc = f"fine-tune {len(run.rows) + 1}/{len(cumulative)}"
            epochs = run.recover(self.finetune, distill=distill, desc=desc)
            run.record(
                pruner.label,
                target=share,
                **pruner.measure(),
                finetuned=True,
                lr=self.finetune.lr,
                epochs=epochs,
            )
        # A schedule step has no per-unit ratio: the summary's `ratio` would be a stale config key.
        return run.summary(
            ratio=None, target=self.target, schedule=list(cumulative), **pruner.finish()
        )
