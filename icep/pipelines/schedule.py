"""The loop the schedule pipelines share (METHOD.md section 4): every step prunes EVERY unit up to
the schedule's next cumulative share of the original channels (or weights), then fine-tunes.

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

from collections.abc import Sequence
from typing import Any

from icep.pipelines.base import PruningRun
from icep.pruning import MagnitudePruner, select_global, uniform_widths
from icep.pruning.schedules import agp, constant, geometric, hybrid, one_shot

# The schedules `pipeline=iterative` takes (`blockwise`: one unit per step, the baseline).
ITERATIVE_SCHEDULES = ("blockwise", "constant", "geometric")


def cumulative_schedule(cfg: Any) -> list[float]:
    """The cumulative pruned share after each step for a schedule pipeline's config."""
    kind = cfg.schedule if cfg.name == "iterative" else cfg.name
    if kind == "one_shot":
        return one_shot(cfg.target)
    if kind == "hybrid":
        return hybrid(cfg.target, cfg.steps, cfg.one_shot)
    if kind == "agp":
        return agp(cfg.target, cfg.steps, cfg.initial)
    return {"constant": constant, "geometric": geometric}[kind](cfg.target, cfg.steps)


class SchedulePruner:
    """Brings the run's model to a cumulative pruned share, structured or unstructured."""

    def __init__(self, run: PruningRun, cfg: Any):
        self.run = run
        self.scope = cfg.scope
        self.min_channels_share = cfg.min_channels_share
        # Masks start from the weights' zeros, so a resumed run finds them again.
        self.masks = MagnitudePruner(run.model) if cfg.structure == "unstructured" else None
        self.label = "weights" if self.masks is not None else f"all units ({self.scope})"

    def prune_to(self, share: float) -> None:
        """Prune up to ``share`` of the original channels (weights), timed as ``prune``."""
        run = self.run
        with run.timer.phase("prune"):
            if self.masks is not None:
                self.masks.prune_to(share)
            else:
                self._prune_channels(share)
                run.trainer.prepare(run.model)  # pruned weights come back in the default layout

    def _prune_channels(self, share: float) -> None:
        run, engine = self.run, self.run.engine
        original = engine.original_widths
        # What a criterion looks at first (gradients, activations) is pruning cost too.
        run.prepare_criterion(list(original), engine)
        if self.scope == "uniform":
            now = engine.unit_widths()
            widths = {n: min(w, now[n]) for n, w in uniform_widths(original, share).items()}
            engine.prune_to_widths(widths, run.criterion)
        else:
            scores = {name: engine.scores(name, run.criterion) for name in original}
            engine.prune_channels(select_global(scores, original, share, self.min_channels_share))

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


def run_schedule(run: PruningRun, cfg: Any, cumulative: Sequence[float]) -> dict[str, Any]:
    """Prune to each cumulative share in turn, fine-tuning after every step."""
    run.planned_steps = len(cumulative)
    run.start()
    distill = run.teacher(cfg) if cfg.distill else None
    pruner = SchedulePruner(run, cfg)
    for share in run.pending(cumulative):
        pruner.prune_to(share)
        epochs = run.recover(
            cfg, cfg.lr, distill, desc=f"fine-tune {len(run.rows) + 1}/{len(cumulative)}"
        )
        run.record(
            pruner.label,
            target=share,
            **pruner.measure(),
            finetuned=True,
            lr=cfg.lr,
            epochs=epochs,
        )
    # A schedule step has no per-unit ratio: the summary's `ratio` would be a stale config key.
    return run.summary(ratio=None, target=cfg.target, schedule=list(cumulative), **pruner.finish())
