"""Early pruning with the early pruning indicator (EPI, Shen et al. 2022; METHOD.md section 4).

The model trains densely for ``epochs`` epochs at a constant ``lr``. After each epoch the channels
of all units are ranked globally by the criterion (scores normalised per layer, as the ``global``
scope does, with its floor), the top ``1 - alpha`` are kept and the kept count per layer, N_t, is
recorded. EPI_t is the mean similarity of N_t to each of the ``window`` counts before it. At the
first epoch where EPI_t is at least ``tau`` and at least each of the ``window`` EPI values before
it, the model is pruned once, to that ranking (``alpha`` of the unit channels), and trains on.

"At least", where the paper says "exceeds": a ranking that has settled gives EPI = 1.000 epoch
after epoch, the most stable case of all, and must fire (METHOD.md section 4). If EPI has not fired
when the last epoch ends, the model is pruned to that epoch's ranking all the same and the summary
says so (``epi_fired: false``): a run never ends "completed" having pruned nothing.

The same ``window`` (r = 5 in the paper) sets both how many counts EPI averages over and how many
earlier EPI values it is compared with, so the earliest epoch it can fire is ``2 * window + 1``.
Each epoch is one step of the run's record and checkpoint (with the optimizer's state and the
counts and EPI values so far), so ``resume=true`` continues after the last finished epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icep.pipelines.base import PruningRun, Shaping
from icep.pipelines.finetune import Training

log = logging.getLogger(__name__)


def similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """``psi = 1 - mean_l |a_l - b_l| / (a_l + b_l)``: 1 when every layer keeps as many channels
    in both (a layer empty in both counts as equal)."""
    distances = [abs(x - y) / (x + y) if x + y else 0.0 for x, y in zip(a, b, strict=True)]
    return 1.0 - sum(distances) / len(distances)


def epi_values(counts: Sequence[Sequence[int]], window: int) -> list[float | None]:
    """EPI after each epoch: ``mean over j = 1..window of psi(N_t, N_{t-j})``; None while fewer
    than ``window`` earlier counts exist."""
    return [
        sum(similarity(counts[t], counts[t - j]) for j in range(1, window + 1)) / window
        if t >= window
        else None
        for t in range(len(counts))
    ]


def fires(values: Sequence[float | None], tau: float, window: int) -> bool:
    """Whether the last EPI value is at least ``tau`` and at least each of the ``window`` values
    before it (all of which must exist): a plateau at or above ``tau`` fires."""
    if len(values) <= window or any(v is None for v in values[-window - 1 :]):
        return False
    last = values[-1]
    return last >= tau and all(last >= v for v in values[-window - 1 : -1])


@dataclass(kw_only=True)
class EPI(Training, Shaping):
    alpha: float  # share of the unit channels pruned when EPI fires
    tau: float  # threshold
    window: int  # r: counts averaged over, and earlier EPI values to match
    epochs: int  # all training epochs
    min_channels_share: float  # each conv keeps >= ceil(share * C_orig) channels (>= 1)
    decision_split: str  # val | test: the split each epoch's accuracy is measured on
    name: str  # the label of reports, W&B tags and run names

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        run.planned_steps = self.epochs
        run.start(self.decision_split)
        distill = run.teacher(self)
        # Counts N_t, EPI values and the firing epoch so far: all a resumed run needs to go on.
        history = run.state.setdefault("epi", {"counts": [], "values": [], "fired": None})
        optimizer = run.resume_optimizer(run.new_optimizer(self.optimizer, self.lr))
        for epoch in run.pending(range(1, self.epochs + 1)):
            run.train_epoch(optimizer, distill, f"epi epoch {epoch}/{self.epochs}")
            epi = None
            if history["fired"] is None:
                with run.phase("prune"):  # ranking every epoch is the method's cost
                    epi = self.rank_and_maybe_prune(run, history, epoch, last=epoch == self.epochs)
                if history["fired"] == epoch:  # new Parameters: a new optimizer
                    optimizer = run.new_optimizer(self.optimizer, self.lr, phase="prune")
            run.evaluate()
            run.keep_optimizer(optimizer)
            run.record(
                f"epoch {epoch}",
                epoch=epoch,
                epi=epi,
                pruned=history["fired"] == epoch,
                channels_pruned_share=run.engine.pruned_share(),
                lr=self.lr,
            )
        fired = not history.get("at_budget_end", False)
        return run.summary(
            ratio=None,
            target=self.alpha,
            epi_fired=fired,
            epi_fired_epoch=history["fired"] if fired else None,
            pruned_epoch=history["fired"],
        )

    def rank_channels(self, run: PruningRun) -> dict[str, list[int]]:
        """The channels a prune to ``alpha`` would remove now, per unit conv (one global
        ranking)."""
        return run.global_removal(self.alpha, self.min_channels_share)

    def rank_and_maybe_prune(
        self, run: PruningRun, history: dict[str, Any], epoch: int, last: bool = False
    ) -> float | None:
        """Record this epoch's kept counts and EPI; prune to the ranking if EPI fires, or if this
        is the ``last`` epoch and it has not (``history["at_budget_end"]``). Returns EPI."""
        removal = self.rank_channels(run)
        widths = run.engine.unit_widths()
        history["counts"].append([widths[n] - len(removal[n]) for n in widths])
        history["values"].append(epi_values(history["counts"], self.window)[-1])
        fired = fires(history["values"], self.tau, self.window)
        if fired or last:
            run.prune_channels(removal)
            history["fired"] = epoch
            history["at_budget_end"] = not fired
            if not fired:
                log.warning(
                    "EPI did not reach tau = %g within %d epochs (last %s); pruned to alpha at "
                    "the last epoch instead (summary: epi_fired false)",
                    self.tau,
                    self.epochs,
                    "n/a" if history["values"][-1] is None else f"{history['values'][-1]:.4f}",
                )
        return history["values"][-1]
