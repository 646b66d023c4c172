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
from typing import Any

from icep.pipelines.base import PruningRun
from icep.pruning import select_global
from icep.train import sgd


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


def firing_epoch(counts: Sequence[Sequence[int]], tau: float, window: int) -> int | None:
    """The first epoch (1-based) at which EPI fires for this sequence of per-layer counts."""
    values = epi_values(counts, window)
    for epoch in range(1, len(values) + 1):
        if fires(values[:epoch], tau, window):
            return epoch
    return None


def rank_channels(run: PruningRun, cfg: Any) -> dict[str, list[int]]:
    """The channels a prune to ``alpha`` would remove now, per unit conv (one global ranking)."""
    engine = run.engine
    original = engine.original_widths
    run.prepare_criterion(list(original), engine)
    scores = {name: engine.scores(name, run.criterion) for name in original}
    return select_global(scores, original, cfg.alpha, cfg.min_channels_share)


def run_epi(run: PruningRun, cfg: Any) -> dict[str, Any]:
    run.planned_steps = cfg.epochs
    run.start()
    distill = run.teacher(cfg) if cfg.distill else None
    # Counts N_t, EPI values and the firing epoch so far: all a resumed run needs to go on.
    history = run.state.setdefault("epi", {"counts": [], "values": [], "fired": None})
    optimizer = run.optimizer(cfg.lr, cfg.momentum, cfg.weight_decay)
    for epoch in run.pending(range(1, cfg.epochs + 1)):
        run.train_epoch(optimizer, distill, f"epi epoch {epoch}/{cfg.epochs}")
        epi = None
        if history["fired"] is None:
            with run.timer.phase("prune"):  # ranking every epoch is the method's cost
                epi = _rank_and_maybe_prune(run, cfg, history, epoch)
                if history["fired"] == epoch:
                    optimizer = sgd(run.model, cfg.lr, cfg.momentum, cfg.weight_decay)
        run.evaluate()
        run.keep_optimizer(optimizer)
        run.record(
            f"epoch {epoch}",
            epoch=epoch,
            epi=epi,
            pruned=history["fired"] == epoch,
            channels_pruned_share=run.engine.pruned_share(),
            lr=cfg.lr,
        )
    return run.summary(ratio=None, target=cfg.alpha, epi_fired_epoch=history["fired"])


def _rank_and_maybe_prune(
    run: PruningRun,
    cfg: Any,
    history: dict[str, Any],
    epoch: int,
) -> float | None:
    """Record this epoch's kept counts and EPI; prune to the ranking if EPI fires. Returns EPI."""
    removal = rank_channels(run, cfg)
    widths = run.engine.unit_widths()
    history["counts"].append([widths[n] - len(removal[n]) for n in widths])
    history["values"].append(epi_values(history["counts"], cfg.window)[-1])
    if fires(history["values"], cfg.tau, cfg.window):
        run.engine.prune_channels(removal)
        run.trainer.prepare(run.model)
        history["fired"] = epoch
    return history["values"][-1]
