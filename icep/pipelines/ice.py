"""ICE-Pruning (METHOD.md section 3): the baseline loop plus three components, each a named
function here: the fine-tuning trigger (:func:`should_finetune`), layer freezing
(:func:`freeze_scores`, :func:`select_frozen`, :func:`freeze_layers`) and the pruning-aware
learning rate (:func:`pruning_aware_lr`). Switching all three off gives the baseline at lr = base.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from torch import nn

from icep.pipelines.base import COST_PHASES, PruningRun
from icep.pruning import PruningEngine
from icep.train import Distillation

log = logging.getLogger(__name__)


# --- 3.1 Fine-tuning trigger -------------------------------------------------------------------
def should_finetune(acc_original: float, acc_now: float, thre: float) -> bool:
    """Fine-tune only once accuracy has fallen ``thre`` points or more below the unpruned one."""
    return acc_original - acc_now >= thre


# --- 3.3 Pruning-aware learning rate -----------------------------------------------------------
def pruning_aware_lr(x: float, base: float, p: float, beta: float, delta: float) -> float:
    """``base - delta / (1 + (x / (2(1-p) - x)) ** beta)``: a sigmoid in the remaining fraction x,
    about ``base`` while the network is dense, ``base - delta/2`` at x = 1 - p, about
    ``base - delta`` below. For x >= 2(1-p) the inner denominator is zero or negative and the
    formula has no real value; the sigmoid's limit there is ``base``, which is what it returns.
    """
    edge = 2.0 * (1.0 - p)
    if x >= edge:
        return base
    if x <= 0.0:
        return base - delta
    try:
        power = (x / (edge - x)) ** beta
    except OverflowError:  # x close to the edge: the fraction is ~0
        return base
    return base - delta / (1.0 + power)


# --- 3.2 Freezing ------------------------------------------------------------------------------
def _l1(model: nn.Module, names: list[str]) -> dict[str, float]:
    return {n: model.get_submodule(n).weight.detach().abs().sum().item() for n in names}


def freeze_scores(
    before: dict[str, float], after: dict[str, float], original_norm: dict[str, float]
) -> dict[str, float]:
    """``| sum|W_after| - sum|W_before| | / ||W_original||_2`` per layer: how much one fine-tune
    epoch moved it, relative to its unpruned size."""
    return {n: abs(after[n] - before[n]) / original_norm[n] for n in before}


def select_frozen(scores: dict[str, float], fr: float) -> list[str]:
    """The ``ceil(fr * N)`` layers that changed least (ties keep forward order)."""
    count = math.ceil(fr * len(scores) - 1e-9)
    return sorted(scores, key=scores.__getitem__)[:count]


def freeze_layers(model: nn.Module, engine: PruningEngine, names: list[str]) -> None:
    """No gradient for each named conv and the affine parameters of the norm that follows it.
    BatchNorm running statistics still update; the engine keeps the flags across prunes."""
    for name in names:
        model.get_submodule(name).requires_grad_(False)
        norm = engine.norm_after(name)
        if norm is not None:
            model.get_submodule(norm).requires_grad_(False)


def analyse_freezing(
    run: PruningRun, cfg: Any, distill: Distillation | None
) -> tuple[dict[str, float], list[str]]:
    """The one-off analysis: on a copy, prune only the first unit, fine-tune one epoch at
    ``base`` and score every conv the units touch. Returns the scores and the layers to freeze."""
    names = run.engine.touched_convs()
    with run.timer.phase("freeze_analysis"):
        original_norm = {n: run.model.get_submodule(n).weight.detach().norm().item() for n in names}
        trial = copy.deepcopy(run.model)
        engine = PruningEngine(trial, run.example_inputs)
        unit = engine.units[0]
        run.prepare_criterion(unit.convs, engine)
        engine.prune_unit(0, cfg.ratio, run.criterion)
        run.trainer.prepare(trial)
        before = _l1(trial, names)
    run.finetune(
        1,
        cfg.base,
        cfg.momentum,
        cfg.weight_decay,
        distill,
        desc="freeze analysis",
        model=trial,
        phase="freeze_analysis",
    )
    with run.timer.phase("freeze_analysis"):
        scores = freeze_scores(before, _l1(trial, names), original_norm)
        frozen = select_frozen(scores, cfg.fr)
    del trial, engine
    return scores, frozen


# --- The loop ----------------------------------------------------------------------------------
def run_ice(run: PruningRun, cfg: Any) -> dict[str, Any]:
    run.start(cfg.decision_split)
    distill = run.teacher(cfg) if cfg.distill else None
    frozen: list[str] = []
    if cfg.freeze:
        if "frozen" not in run.state:  # a resumed run has it from its checkpoint
            scores, frozen = analyse_freezing(run, cfg, distill)
            run.state["frozen"] = frozen
            log.info("froze %d of %d layers: %s", len(frozen), len(scores), frozen)
        frozen = run.state["frozen"]
        freeze_layers(run.model, run.engine, frozen)
    for unit in run.pending(run.units):
        run.prune(unit, cfg.ratio)
        acc_pruned = run.evaluate() if cfg.trigger else None
        triggered = not cfg.trigger or should_finetune(run.acc_original, acc_pruned, cfg.thre)
        lr, epochs = None, 0
        if triggered:
            lr = learning_rate(run, cfg)
            epochs = run.recover(
                cfg, lr, distill, desc=f"fine-tune {unit.index + 1}/{len(run.units)}"
            )
        run.record(
            unit,
            ratio=cfg.ratio,
            acc_pruned=acc_pruned,
            triggered=triggered,
            finetuned=triggered,
            lr=lr,
            epochs=epochs,
            frozen_params=run.frozen_params(),
        )
    final = {}
    if cfg.final_finetune_epochs > 0:
        lr = learning_rate(run, cfg)
        before = run.timer.total(*COST_PHASES)
        run.finetune(
            cfg.final_finetune_epochs,
            lr,
            cfg.momentum,
            cfg.weight_decay,
            distill,
            desc="recovery fine-tune",
        )
        run.evaluate()
        seconds = run.timer.total(*COST_PHASES) - before
        final = {"epochs": cfg.final_finetune_epochs, "lr": lr, "seconds": seconds}
    return run.summary(
        frozen_layers=frozen,
        frozen_params=run.frozen_params(),
        finetunes_skipped=len(run.units) - sum(r["finetuned"] for r in run.rows),
        t_freeze_analysis=run.timer.totals.get("freeze_analysis", 0.0),
        final_finetune=final,
        hyperparameters={k: cfg[k] for k in HYPERPARAMETERS},
    )


HYPERPARAMETERS = (
    "thre",
    "fr",
    "base",
    "p",
    "beta",
    "delta",
    "trigger",
    "freeze",
    "adaptive_lr",
    "decision_split",
    "finetune_epochs",
    "finetune_policy",
    "final_finetune_epochs",
    "distill",
)


def learning_rate(run: PruningRun, cfg: Any) -> float:
    if not cfg.adaptive_lr:
        return cfg.base
    return pruning_aware_lr(run.remaining(), cfg.base, cfg.p, cfg.beta, cfg.delta)


__all__ = [
    "analyse_freezing",
    "freeze_layers",
    "freeze_scores",
    "pruning_aware_lr",
    "run_ice",
    "select_frozen",
    "should_finetune",
]
