"""Early pruning with the early pruning indicator (EPI, Shen et al. 2022; METHOD.md section 4).

The model trains densely for ``epochs`` epochs at a constant ``lr``. After each epoch the channels
of all units are ranked globally by the criterion (scores normalised per layer, as the ``global``
scope does, with its floor), the top ``1 - alpha`` are kept and the kept count per layer, N_t, is
recorded. EPI_t is the mean similarity of N_t to each of the ``window`` counts before it. At the
first epoch where EPI_t exceeds ``tau`` and each of the ``window`` EPI values before it, the
model is pruned once, to that ranking (``alpha`` of the unit channels), and trains on.

The same ``window`` (r = 5 in the paper) sets both how many counts EPI averages over and how many
earlier EPI values it must beat, so the earliest epoch it can fire is ``2 * window + 1``.
Each epoch is one step of the run's record and checkpoint (with the optimizer's state and the
counts and EPI values so far), so ``resume=true`` continues after the last finished epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from icep.pipelines.base import PruningRun
from icep.pipelines.finetune import Training


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
    """Whether the last EPI value exceeds ``tau`` and each of the ``window`` values before it
    (all of which must exist)."""
    if len(values) <= window or any(v is None for v in values[-window - 1 :]):
        return False
    last = values[-1]
    return last > tau and all(last > v for v in values[-window - 1 : -1])


@dataclass(kw_only=True)
class EPI(Training):
    alpha: float  # share of the unit channels pruned when EPI fires
    tau: float  # threshold
    window: int  # r: counts averaged over, and earlier EPI values to beat
    epochs: int  # all training epochs
    min_channels_share: float  # each conv keeps >= ceil(share * C_orig) channels (>= 1)
    name: str  # the label of reports, W&B tags and run names

    def __call__(self, run: PruningRun) -> dict[str, Any]:
        run.planned_steps = self.epochs
        run.start()
        distill = run.teacher(self)
        # Counts N_t, EPI values and the firing epoch so far: all a resumed run needs to go on.
        history = run.state.setdefault("epi", {"counts": [], "values": [], "fired": None})
        optimizer = run.resume_optimizer(run.new_optimizer(self.optimizer, self.lr))
        for epoch in run.pending(range(1, self.epochs + 1)):
            run.train_epoch(optimizer, distill, f"epi epoch {epoch}/{self.epochs}")
            epi = None
            if history["fired"] is None:
                with run.phase("prune"):  # ranking every epoch is the method's cost
                    epi = self.rank_and_maybe_prune(run, history, epoch)
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
        return run.summary(ratio=None, target=self.alpha, epi_fired_epoch=history["fired"])

    def rank_channels(self, run: PruningRun) -> dict[str, list[int]]:
        """The channels a prune to ``alpha`` would remove now, per unit conv (one global
        ranking)."""
        return run.global_removal(self.alpha, self.min_channels_share)

    def rank_and_maybe_prune(
        self, run: PruningRun, history: dict[str, Any], epoch: int
    ) -> float | None:
        """Record this epoch's kept counts and EPI; prune to the ranking if EPI fires. Returns
        EPI."""
        removal = self.rank_channels(run)
        widths = run.engine.unit_widths()
        history["counts"].append([widths[n] - len(removal[n]) for n in widths])
        history["values"].append(epi_values(history["counts"], self.window)[-1])
        if fires(history["values"], self.tau, self.window):
            run.prune_channels(removal)
            history["fired"] = epoch
        return history["values"][-1]
